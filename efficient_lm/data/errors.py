"""The one error type of the data pipeline."""


class DataError(ValueError):
  """Bad data input. One line: the offending value and what was expected.

  Raised while the pipeline is built (before anything compiles), never
  halfway through training.
  """
