# Shared by the launch/*.sh scripts (sourced, not run). Parses the common flags and defines `run`,
# `vm_ssh` and `quote_words`.
#
# Flags (each also settable by the environment variable in brackets):
#   --name=NAME           TPU VM name [TPU_NAME, default ddpm]
#   --zone=ZONE           zone [ZONE, default us-central2-b]
#   --project=PROJECT     project [PROJECT, default: gcloud's configured project]
#   --worker=W            which VM worker runs ssh/scp commands: a number, or all for every host
#                         [WORKER, default 0]
#   --dry-run             print the commands instead of running them, one a line, shell-quoted:
#                         pasting a line into bash runs exactly what the script would have run
# The project's folder on the VM is [REMOTE_DIR, default ddpm_jax], relative to the ssh user's home.
# Every value (flags, config overrides, REMOTE_DIR) reaches the VM's shell quoted, as one literal
# word: no ~, $VAR or glob expansion there.
# Script-specific flags are left in the array ARGS. A bad flag or value exits with status 2.
set -euo pipefail

usage_error() {
  echo "$0: $1" >&2
  exit 2
}

TPU_NAME="${TPU_NAME:-ddpm}"
ZONE="${ZONE:-us-central2-b}"
PROJECT="${PROJECT:-}"
WORKER="${WORKER:-0}"
DRY_RUN=0
ARGS=()
for arg in "$@"; do
  case "$arg" in
    --name=*) TPU_NAME="${arg#*=}" ;;
    --zone=*) ZONE="${arg#*=}" ;;
    --project=*) PROJECT="${arg#*=}" ;;
    --worker=*) WORKER="${arg#*=}" ;;
    --dry-run) DRY_RUN=1 ;;
    *) ARGS+=("$arg") ;;
  esac
done
[[ -n "$TPU_NAME" ]] || usage_error "--name must not be empty"
[[ "$WORKER" == all || "$WORKER" =~ ^[0-9]+$ ]] || usage_error "--worker must be all or a non-negative integer"

# The flags every `gcloud compute tpus tpu-vm` command takes.
GCLOUD_TPU=(gcloud compute tpus tpu-vm)
LOCATION=(--zone="$ZONE")
if [[ -n "$PROJECT" ]]; then LOCATION+=(--project="$PROJECT"); fi
REMOTE_DIR="${REMOTE_DIR:-ddpm_jax}"
# A leading - would make cd/tar/tail read it as an option (cd - even changes to another folder).
[[ "$REMOTE_DIR" != -* ]] || usage_error "REMOTE_DIR must not start with -"

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

# Runs a shell command line on the VM's worker(s): vm_ssh 'command'. Build it with quote_words for
# every value that comes from the user, so that the VM's shell reads each as one literal word.
vm_ssh() {
  run "${GCLOUD_TPU[@]}" ssh "$TPU_NAME" "${LOCATION[@]}" --worker="$WORKER" --command="$1"
}
