#!/usr/bin/env bash
# Deletes the TPU VM (and with it its local disk: keep workdirs on a gs:// bucket).
#
# Needs: the gcloud CLI. See launch/common.sh for --name, --zone, --project, --dry-run.
#
#   launch/delete_vm.sh [common flags]
source "$(dirname "$0")/common.sh"
[[ ${#ARGS[@]} -eq 0 ]] || usage_error "unknown flag $(printf '%q' "${ARGS[0]}")"

run "${GCLOUD_TPU[@]}" delete "$TPU_NAME" "${LOCATION[@]}" --quiet
