"""Benchmarks, each run as a module from the repository root:

  python -m benchmarks.<name> [flags]    # e.g. benchmarks.shakespeare

(each module's docstring has its usage). The root then comes first on
sys.path, so `kernels`, `efficient_lm` and `configs` are this tree's; no
benchmark edits sys.path.
"""
