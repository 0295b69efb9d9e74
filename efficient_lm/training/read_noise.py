"""Keeps the noise of a failed Orbax/tensorstore read off the console.

Tensorstore reads that fail mid-restore leave futures and callbacks aimed at
orbax's event loop, which orbax has closed by the time they fire: each
prints a traceback (from a tensorstore or Python reader thread, at garbage
collection, or through asyncio's "exception was never retrieved"), dozens for one bad
checkpoint, all after the checkpointer's one-line message. They are
recognised here and sent to the log at debug level; everything else passes
through.
"""

from __future__ import annotations

import logging
import sys
import threading


def one_line(e: BaseException) -> str:
  # Tensorstore messages run to pages of JSON specs; the head says enough.
  text = str(e).strip().splitlines()[0] if str(e).strip() else ""
  text = text.split(" See full TensorStore details")[0]
  return f"{type(e).__name__}: {text[:300]}"


_READ_FAILED = "Encountered error while reading array index"
_noise_contained = False


def _is_failed_read_noise(e: BaseException | None) -> bool:
  return (isinstance(e, RuntimeError) and str(e) == "Event loop is closed") or (
    type(e) is Exception and str(e).startswith(_READ_FAILED)
  )


def _debug_log(what: str, e: BaseException | None) -> None:
  logging.getLogger(__name__).debug(
    "after a failed checkpoint read: %s: %s", what, one_line(e) if e else ""
  )


def contain_failed_read_noise() -> None:
  global _noise_contained
  if _noise_contained:
    return
  _noise_contained = True
  excepthook, unraisablehook = sys.excepthook, sys.unraisablehook
  thread_hook = threading.excepthook

  def on_exception(tp, value, tb):  # what tensorstore threads report
    if _is_failed_read_noise(value):
      _debug_log("callback error", value)
    else:
      excepthook(tp, value, tb)

  def on_unraisable(u):  # coroutines collected unawaited
    if _is_failed_read_noise(u.exc_value):
      _debug_log(f"unraisable in {u.object!r}", u.exc_value)
    else:
      unraisablehook(u)

  def on_thread_exception(args):  # a Python reader thread's failure
    if _is_failed_read_noise(args.exc_value):
      _debug_log(f"thread {args.thread!r}", args.exc_value)
    else:
      thread_hook(args)

  def asyncio_filter(record: logging.LogRecord) -> bool:
    e = record.exc_info[1] if record.exc_info else None
    if _is_failed_read_noise(e):
      _debug_log("asyncio", e)
      return False
    return True

  sys.excepthook, sys.unraisablehook = on_exception, on_unraisable
  threading.excepthook = on_thread_exception
  logging.getLogger("asyncio").addFilter(asyncio_filter)
