# The two commands a fresh machine needs:
#   make train   -- set up .venv, train the tiny byte-level decoder on CPU
#   make test    -- set up .venv (with dev extras), run the default test suite
#   make lint    -- ruff format/check, import contracts, pyrefly (seconds;
#                   the same four checks as .pre-commit-config.yaml)
#   make mutate  -- do the tests catch known bugs? (tests/mutate.py; ~45 min;
#                   ARGS="-k optim" or ARGS="--only ID,ID" to narrow it)
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/tiny
CONFIG ?= configs/tiny.py
ARGS ?=
# pytest-xdist workers for the test targets (one per core on the 2-core CI
# machine; each worker compiles its own files' tests).
WORKERS ?= 2

.PHONY: setup setup-dev train lint test test-all mutate bench-shakespeare clean

# The plot extra (matplotlib): the README's plot commands follow training.
setup:
	launch/setup_env.sh plot

setup-dev:
	launch/setup_env.sh dev

train: setup
	$(PY) -m efficient_lm.train --config=$(CONFIG) --workdir=$(WORKDIR) $(ARGS)

# Every check runs, so one run shows all that fail; the target fails if any
# did. Keep in step with .pre-commit-config.yaml.
LINT_CHECKS = \
  "$(VENV)/bin/ruff format --check ." \
  "$(VENV)/bin/ruff check ." \
  "$(VENV)/bin/lint-imports --no-logo" \
  "$(VENV)/bin/pyrefly check --python-interpreter-path $(PY)"

lint: setup-dev
	@status=0; for check in $(LINT_CHECKS); do \
	  echo "lint: $$check"; $$check || status=1; \
	done; exit $$status

test: setup-dev
	$(PY) -m pytest -q -n $(WORKERS) --dist loadfile --durations=30 $(ARGS)

test-all: setup-dev
	$(PY) -m pytest -q -n $(WORKERS) --dist loadfile -m "" $(ARGS)

mutate: setup-dev
	$(PY) tests/mutate.py $(ARGS)

bench-shakespeare: setup
	$(PY) -m benchmarks.shakespeare --data=$(DATA) $(ARGS)

clean:
	rm -rf $(VENV) runs
