#!/usr/bin/env bash
# Follows the training log on the TPU VM (Ctrl-C stops following, not training).
#
# Needs: the gcloud CLI and a VM where launch/train.sh started a run. See launch/common.sh.
#
#   launch/tail_log.sh [--lines=100] [common flags]
source "$(dirname "$0")/common.sh"

LINES=100
for arg in "${ARGS[@]+"${ARGS[@]}"}"; do
  case "$arg" in
    --lines=*) LINES="${arg#*=}" ;;
    *) usage_error "unknown flag $arg" ;;
  esac
done
vm_ssh "$(quote_words tail -n "$LINES" -F "$REMOTE_DIR/train.log")"
