# Shared by the launch scripts (sourced, not run): strict mode, `usage_error`, `quote_words` and
# `run`, which with DRY_RUN=1 prints a command instead of running it.
set -euo pipefail

usage_error() {
  echo "$0: $1" >&2
  exit 2
}

DRY_RUN=0

# Prints its arguments as one command line for a POSIX shell, each argument one literal word: bare
# if it has only safe characters, else in single quotes (a ' inside becomes '\''); a --flag= prefix
# stays outside the quotes to read better. Not printf %q: its $'...' is bash-only, and the shells
# on the VM (the login shell, the one tmux starts) need not be bash.
quote_words() {
  local word flag sq="'" esc="'\\''" sep=""
  for word in "$@"; do
    flag=""
    if [[ "$word" =~ ^--[A-Za-z0-9_.-]+= ]]; then flag="${BASH_REMATCH[0]}"; word="${word#"$flag"}"; fi
    if [[ "$word" =~ ^[A-Za-z0-9_./:@%+,-][A-Za-z0-9_./:=@%+,-]*$ ]]; then
      printf '%s%s%s' "$sep" "$flag" "$word"
    else
      printf "%s%s'%s'" "$sep" "$flag" "${word//$sq/$esc}"
    fi
    sep=" "
  done
}

# Runs (or with --dry-run prints) one command. The printed line is the same argv, quoted by
# quote_words except that a word with a control character (a newline) gets bash's $'...', which
# keeps it on one line.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    local word words=()
    for word in "$@"; do
      if [[ "$word" == *[[:cntrl:]]* ]]; then words+=("$(printf '%q' "$word")")
      else words+=("$(quote_words "$word")"); fi
    done
    printf '%s\n' "${words[*]}"
  else
    "$@"
  fi
}
