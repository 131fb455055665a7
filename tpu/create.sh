#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Creates the TPU VM (one host or a pod slice) named in env.sh.
#
#   tpu/create.sh [--dry-run] [--spot] [--queued] [--name NAME] [--type TYPE] [--zone ZONE]
#
# Default: `gcloud compute tpus tpu-vm create` (fails at once when the zone has no
# capacity). --queued: a queued resource that waits for capacity
# (`gcloud compute tpus queued-resources create`; watch it with the printed
# `describe` command). --spot: Spot capacity (cheaper, may be preempted; the
# trainer resumes from its newest checkpoint). The runtime version follows the
# generation: v4 tpu-ubuntu2204-base, v5e v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5,
# v6e v2-alpha-tpuv6e (override with RUNTIME_VERSION).
set -euo pipefail

dry_run=0
SPOT=0
QUEUED=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --spot) SPOT=1 ;;
    --queued) QUEUED=1 ;;
    --name) TPU_NAME="$2"; shift ;;
    --type) ACCELERATOR_TYPE="$2"; shift ;;
    --zone) ZONE="$2"; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "error: unknown argument '$1'; see $0 --help" >&2; exit 2 ;;
  esac
  shift
done

# shellcheck source=env.sh
source "$(dirname "$0")/env.sh"
DRY_RUN="${dry_run}"

if [[ "${QUEUED}" == 1 ]]; then
  cmd=(gcloud compute tpus queued-resources create "${QUEUED_RESOURCE_ID}"
       --node-id="${TPU_NAME}" "${SCOPE[@]}"
       --accelerator-type="${ACCELERATOR_TYPE}" --runtime-version="${RUNTIME_VERSION}")
else
  cmd=(gcloud compute tpus tpu-vm create "${TPU_NAME}" "${SCOPE[@]}"
       --accelerator-type="${ACCELERATOR_TYPE}" --version="${RUNTIME_VERSION}")
fi
if [[ "${SPOT}" == 1 ]]; then
  cmd+=(--spot)
fi
run "${cmd[@]}"

if [[ "${QUEUED}" == 1 ]]; then
  echo "# the VM exists once the state below is ACTIVE:" >&2
  run gcloud compute tpus queued-resources describe "${QUEUED_RESOURCE_ID}" "${SCOPE[@]}"
fi
