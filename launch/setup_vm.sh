#!/usr/bin/env bash
# Installs this project on the TPU VM: copies the committed tree (git archive HEAD), installs JAX for
# TPU, the requirements and the package, and tmux.
#
# Needs: the gcloud CLI, a VM made by launch/create_vm.sh, git (run from a checkout of this repo).
# See launch/common.sh for --name, --zone, --project, --worker (all: every host of a pod), --dry-run.
#
#   launch/setup_vm.sh [common flags]
source "$(dirname "$0")/common.sh"
[[ ${#ARGS[@]} -eq 0 ]] || usage_error "unknown flag $(printf '%q' "${ARGS[0]}")"

REPO="$(cd "$(dirname "$0")/.." && pwd)"
TARBALL="${TMPDIR:-/tmp}/ddpm_jax.tar.gz"
run git -C "$REPO" archive --format=tar.gz -o "$TARBALL" HEAD
run "${GCLOUD_TPU[@]}" scp "$TARBALL" "$TPU_NAME:ddpm_jax.tar.gz" "${LOCATION[@]}" --worker="$WORKER"
DIR="$(quote_words "$REMOTE_DIR")"
vm_ssh "set -e; mkdir -p $DIR && tar -xzf ddpm_jax.tar.gz -C $DIR && cd $DIR \
&& (command -v tmux >/dev/null || sudo apt-get install -y tmux) \
&& python3 -m pip install -U pip && python3 -m pip install 'jax[tpu]' \
&& python3 -m pip install -r requirements.txt -e . && python3 -c 'import jax; print(jax.devices())'"
