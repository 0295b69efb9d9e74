"""The argparse parser of the argparse-based commands (convert, quantize,
surgery): misuse is one `error:` line and exit status 2, as absl's flag
errors are in train, evaluate and generate."""

from __future__ import annotations

import argparse


class OneLineParser(argparse.ArgumentParser):
  """An ArgumentParser whose errors are one line, `error: ...`, exit 2
  (argparse's default prints the usage first)."""

  def error(self, message: str):
    self.exit(2, f"error: {message}\n")
