#!/usr/bin/env bash
# Creates a Cloud TPU VM for training.
#
# Needs: the gcloud CLI, logged in (`gcloud auth login`), a project with the Cloud TPU API enabled
# and TPU quota in the zone. See launch/common.sh for --name, --zone, --project, --dry-run.
#
#   launch/create_vm.sh [--accelerator=v4-8] [--version=tpu-ubuntu2204-base] [--spot] [common flags]
#
# --spot asks for a Spot (preemptible) VM: cheaper, and training survives preemption because a
# restart resumes from the last checkpoint (keep the workdir on a gs:// bucket).
source "$(dirname "$0")/common.sh"

ACCELERATOR="${ACCELERATOR_TYPE:-v4-8}"
VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
EXTRA=()
for arg in "${ARGS[@]+"${ARGS[@]}"}"; do
  case "$arg" in
    --accelerator=*) ACCELERATOR="${arg#*=}" ;;
    --version=*) VERSION="${arg#*=}" ;;
    --spot) EXTRA+=(--spot) ;;
    *) usage_error "unknown flag $(printf '%q' "$arg")" ;;
  esac
done

run "${GCLOUD_TPU[@]}" create "$TPU_NAME" "${LOCATION[@]}" \
  --accelerator-type="$ACCELERATOR" --version="$VERSION" "${EXTRA[@]+"${EXTRA[@]}"}"
