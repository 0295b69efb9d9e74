#!/usr/bin/env bash
# Creates (or reuses) the project virtual environment and installs the package.
#   launch/setup_env.sh [EXTRAS]      e.g. launch/setup_env.sh dev
# Finds a Python >= 3.12: python3.13 / python3.12 on PATH, then pyenv's
# versions; otherwise stops with a one-line message.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
EXTRAS="${1:-}"

works() {  # prints the interpreter path if it runs and is >= 3.12
  "$1" -c 'import sys; assert sys.version_info >= (3, 12)' >/dev/null 2>&1 \
    && echo "$1"
}

find_python() {
  local c
  for c in "${PYTHON:-}" python3.13 python3.12 python3; do
    [ -n "$c" ] && command -v "$c" >/dev/null 2>&1 && works "$(command -v "$c")" && return
  done
  local root="${PYENV_ROOT:-$HOME/.pyenv}"
  for c in $(printf '%s\n' "$root"/versions/3.1[2-9]* | sort -Vr); do
    [ -x "$c/bin/python" ] && works "$c/bin/python" && return
  done
  return 1
}

if [ ! -x "$VENV/bin/python" ]; then
  PY=$(find_python) || {
    echo "setup: need Python >= 3.12 (JAX >= 0.11); found none on PATH (python3.13, python3.12, python3) or under \$PYENV_ROOT/versions — install one or set PYTHON=/path/to/python3.12" >&2
    exit 1
  }
  echo "setup: creating $VENV with $PY ($("$PY" -V 2>&1))"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi

# Reinstall only when pyproject.toml or the requested extras change.
stamp="$VENV/.installed-$(cat pyproject.toml | sha1sum | cut -c1-12)-${EXTRAS:-base}"
if [ ! -f "$stamp" ]; then
  spec="."
  [ -n "$EXTRAS" ] && spec=".[$EXTRAS]"
  echo "setup: installing $spec into $VENV"
  "$VENV/bin/python" -m pip install -q -e "$spec"
  touch "$stamp"
fi
