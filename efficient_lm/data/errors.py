"""The one error type of the data pipeline, and the UTF-8 check that raises
it (every text tokenizer shares it)."""


class DataError(ValueError):
  """Bad data input. One line: the offending value and what was expected.

  Raised while the pipeline is built (before anything compiles), never
  halfway through training.
  """


def decode_utf8(data: bytes, name: str, tokenizer: str) -> str:
  """`data` as text; DataError naming `name` and the byte offset if it is
  not UTF-8 (`tokenizer`: the kind that needs text, for the message)."""
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(
      f"{name}: not valid UTF-8 at byte offset {e.start}; the {tokenizer} "
      "tokenizer needs UTF-8 text (tokenizer='byte' reads any bytes)"
    ) from None
