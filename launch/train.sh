#!/usr/bin/env bash
# Starts training on the TPU VM inside tmux (default) or nohup, logging to train.log in the project's
# folder there (~/ddpm_jax, or REMOTE_DIR: see launch/common.sh).
# Running it again after a stop or preemption resumes from the workdir's last checkpoint.
# On a pod slice (e.g. --accelerator=v4-32) pass --worker=all: every host runs the same command, and
# the processes find each other (JAX reads the slice's hosts from the VM metadata); the workdir must
# be a gs:// bucket, which every host reaches.
#
# Needs: the gcloud CLI and a VM set up by launch/setup_vm.sh. For a workdir on a bucket, a gs://
# bucket the VM's service account can write to. See launch/common.sh for the common flags.
#
#   launch/train.sh --workdir=gs://BUCKET/runs/cifar10 [--config=configs/cifar10.py] [--nohup] \
#       [common flags] [-- --config.training.batch_size=64 ...]
source "$(dirname "$0")/common.sh"

CONFIG=configs/cifar10.py
WORKDIR=""
MODE=tmux
OVERRIDES=()
seen_dashes=0
for arg in "${ARGS[@]+"${ARGS[@]}"}"; do
  if [[ "$seen_dashes" == 1 ]]; then OVERRIDES+=("$arg"); continue; fi
  case "$arg" in
    --config=*) CONFIG="${arg#*=}" ;;
    --workdir=*) WORKDIR="${arg#*=}" ;;
    --nohup) MODE=nohup ;;
    --) seen_dashes=1 ;;
    *) usage_error "unknown flag $(printf '%q' "$arg") (pass config overrides after --)" ;;
  esac
done
[[ -n "$WORKDIR" ]] || usage_error "--workdir=DIR is required and must not be empty (a gs:// bucket path survives the VM)"
[[ -n "$CONFIG" ]] || usage_error "--config must not be empty (a config file such as configs/cifar10.py)"

TRAIN="$(quote_words python3 -m ddpm_jax.main --config="$CONFIG" --workdir="$WORKDIR" \
  "${OVERRIDES[@]+"${OVERRIDES[@]}"}") >> train.log 2>&1"
DIR="$(quote_words "$REMOTE_DIR")"
if [[ "$MODE" == tmux ]]; then
  # tmux hands its command line to a second shell, so TRAIN goes to the first as one quoted word.
  vm_ssh "cd $DIR && tmux new-session -d -s ddpm $(quote_words "$TRAIN") && echo started in tmux session ddpm"
else
  vm_ssh "cd $DIR && { nohup $TRAIN < /dev/null & } && echo started with nohup"
fi
