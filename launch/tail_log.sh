#!/usr/bin/env bash
# Follows the training log on the TPU VM (Ctrl-C stops following, not training).
#
# Needs: the gcloud CLI and a VM where launch/train.sh started a run. See launch/common.sh.
#
#   launch/tail_log.sh [--lines=100] [common flags]
#
# --lines=N shows the last N lines (a positive integer) before following. On a pod slice worker 0
# runs process 0, the one that logs progress (the others log warnings only): --worker=all follows it.
source "$(dirname "$0")/common.sh"
if [[ "$WORKER" == all ]]; then WORKER=0; fi

LINES=100
for arg in "${ARGS[@]+"${ARGS[@]}"}"; do
  case "$arg" in
    --lines=*) LINES="${arg#*=}" ;;
    *) usage_error "unknown flag $(printf '%q' "$arg")" ;;
  esac
done
[[ "$LINES" =~ ^[1-9][0-9]*$ ]] || usage_error "--lines must be a positive integer"
vm_ssh "$(quote_words tail -n "$LINES" -F "$REMOTE_DIR/train.log")"
