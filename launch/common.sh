# Shared by the launch/*.sh scripts (sourced, not run). Parses the common flags and defines `run`.
#
# Flags (each also settable by the environment variable in brackets):
#   --name=NAME           TPU VM name [TPU_NAME, default ddpm]
#   --zone=ZONE           zone [ZONE, default us-central2-b]
#   --project=PROJECT     project [PROJECT, default: gcloud's configured project]
#   --worker=W            which VM worker runs ssh/scp commands [WORKER, default 0; 'all' for every host]
#   --dry-run             print the gcloud commands instead of running them
# Script-specific flags are left in the array ARGS.
set -euo pipefail

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

# The flags every `gcloud compute tpus tpu-vm` command takes.
GCLOUD_TPU=(gcloud compute tpus tpu-vm)
LOCATION=(--zone="$ZONE")
if [[ -n "$PROJECT" ]]; then LOCATION+=(--project="$PROJECT"); fi
# The project's folder on the VM (relative to the ssh user's home).
REMOTE_DIR="${REMOTE_DIR:-ddpm_jax}"

# Runs (or with --dry-run prints, shell-quoted) one command.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%q ' "$@"; echo
  else
    "$@"
  fi
}

# Runs a shell command on the VM's worker(s): vm_ssh 'command'.
vm_ssh() {
  run "${GCLOUD_TPU[@]}" ssh "$TPU_NAME" "${LOCATION[@]}" --worker="$WORKER" --command="$1"
}

usage_error() {
  echo "$0: $1" >&2
  exit 2
}
