# Shared by the Cloud TPU VM scripts launch/*.sh (sourced, not run). Parses the common flags and
# defines `vm_ssh`; `run` and `quote_words` come from launch/shell.sh.
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
source "$(dirname "${BASH_SOURCE[0]}")/shell.sh"

TPU_NAME="${TPU_NAME:-ddpm}"
ZONE="${ZONE:-us-central2-b}"
PROJECT="${PROJECT:-}"
WORKER="${WORKER:-0}"
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

# Runs a shell command line on the VM's worker(s): vm_ssh 'command'. Build it with quote_words for
# every value that comes from the user, so that the VM's shell reads each as one literal word.
vm_ssh() {
  run "${GCLOUD_TPU[@]}" ssh "$TPU_NAME" "${LOCATION[@]}" --worker="$WORKER" --command="$1"
}
