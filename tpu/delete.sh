#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Deletes the TPU VM named in env.sh (billing stops). Checkpoints in the GCS
# workdir are kept.
#
#   tpu/delete.sh [--dry-run] [--queued] [--name NAME] [--zone ZONE]
#
# --queued: delete the queued resource and its VM (for VMs made by create.sh --queued).
set -euo pipefail

dry_run=0
QUEUED=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --queued) QUEUED=1 ;;
    --name) TPU_NAME="$2"; shift ;;
    --zone) ZONE="$2"; shift ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "error: unknown argument '$1'; see $0 --help" >&2; exit 2 ;;
  esac
  shift
done

# shellcheck source=env.sh
source "$(dirname "$0")/env.sh"
DRY_RUN="${dry_run}"

if [[ "${QUEUED}" == 1 ]]; then
  run gcloud compute tpus queued-resources delete "${QUEUED_RESOURCE_ID}" "${SCOPE[@]}" \
    --force --quiet
else
  run gcloud compute tpus tpu-vm delete "${TPU_NAME}" "${SCOPE[@]}" --quiet
fi
