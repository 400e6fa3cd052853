#!/usr/bin/env bash
# Follows the training log on the TPU VM (Ctrl-C stops following, not training).
#
# Needs: the gcloud CLI and a VM where launch/train.sh started a run. See launch/common.sh.
#
#   launch/tail_log.sh [--lines=100] [common flags]
#
# --lines=N shows the last N lines (a positive integer) before following.
source "$(dirname "$0")/common.sh"

LINES=100
for arg in "${ARGS[@]+"${ARGS[@]}"}"; do
  case "$arg" in
    --lines=*) LINES="${arg#*=}" ;;
    *) usage_error "unknown flag $(printf '%q' "$arg")" ;;
  esac
done
[[ "$LINES" =~ ^[1-9][0-9]*$ ]] || usage_error "--lines must be a positive integer"
vm_ssh "$(quote_words tail -n "$LINES" -F "$REMOTE_DIR/train.log")"
