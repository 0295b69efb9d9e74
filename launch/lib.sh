# shellcheck shell=bash
# Shared by the launch scripts (sourced, not run): flag errors, shell
# quoting, and the --dry-run switch that prints commands instead of running
# them. Each script sets USAGE (one line) before calling usage_error, and
# spells every value flag --name=value (as absl spells the train flags), so
# a bare --name is an unknown flag.

# One-line error plus the usage line, exit 2 (the convention of getopt tools).
usage_error() {
  echo "error: $1" >&2
  echo "usage: ${USAGE}" >&2
  exit 2
}

# A word as the shell reads it back: bare if it has no special characters,
# otherwise single-quoted. Used to print commands and to build the one-string
# commands that ssh / bash -c take, so both quote the same way.
shell_word() {
  case "$1" in
    '' | *[!A-Za-z0-9_./=:,@%+-]*)
      printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")" ;;
    *) printf '%s' "$1" ;;
  esac
}

# All arguments as one shell command line.
shell_line() {
  local out="" w
  for w in "$@"; do
    out="${out:+${out} }$(shell_word "$w")"
  done
  printf '%s' "$out"
}

# Runs a command, or with DRY_RUN=1 prints it (one line) and runs nothing.
run() {
  if [ "${DRY_RUN:-0}" = 1 ]; then
    shell_line "$@"
    echo
  else
    "$@"
  fi
}

# Digits-only check for count flags.
require_count() {  # NAME VALUE
  case "$2" in
    '' | *[!0-9]* | 0*) usage_error "$1=$2: expected a positive integer" ;;
  esac
}
