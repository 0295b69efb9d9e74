"""The one error class of the Hugging Face converter."""


class ConvertError(ValueError):
  """A checkpoint or run that cannot be converted; the message is one line
  naming the value and what was expected."""
