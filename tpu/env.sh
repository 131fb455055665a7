# shellcheck shell=bash
# Settings shared by the tpu/ scripts. Source it; every variable can be set in
# the environment first (e.g. `ACCELERATOR_TYPE=v4-32 ZONE=us-central2-b tpu/create.sh`).

# --- the TPU VM
: "${PROJECT:=}"                              # empty: gcloud's configured project
: "${ZONE:=us-west4-a}"                       # must offer ACCELERATOR_TYPE (see README)
: "${ACCELERATOR_TYPE:=v5litepod-8}"          # v4-8, v4-32, v5litepod-8, v5p-8, v6e-8, ...
: "${TPU_NAME:=cnnjax-${ACCELERATOR_TYPE}}"
: "${RUNTIME_VERSION:=}"                      # empty: derived from ACCELERATOR_TYPE below
: "${QUEUED_RESOURCE_ID:=${TPU_NAME}-qr}"     # used with create.sh/delete.sh --queued

# --- code, data and outputs
: "${BUCKET:=gs://YOUR-BUCKET}"               # a bucket in the TPU's region
: "${CNNJAX_REPO:=https://github.com/YOUR-ORG/cnnjax.git}"
: "${CNNJAX_REF:=main}"                       # branch, tag or commit to install
: "${CNNJAX_WHEEL:=}"                         # a local wheel to install instead of the repo
: "${REMOTE_DIR:=cnnjax}"                     # checkout on each worker, relative to ~
: "${DATASET:=imagenet2012}"                  # tfds name of the prepared dataset
: "${DATA_GCS:=${BUCKET}/tensorflow_datasets}"    # prepared tfds data in the bucket
: "${DATA_DIR:=/mnt/disks/data/tensorflow_datasets}"  # local copy on every host
: "${CONFIG:=experiments/configs/vgg16_imagenet_tpu.py}"
: "${RUN_NAME:=vgg16_imagenet_tpu}"
: "${WORKDIR:=${BUCKET}/runs/${RUN_NAME}}"    # checkpoints and metrics (gs:// needs gcsfs)
: "${LOG_DIR:=cnnjax_logs}"                   # per-worker logs, relative to ~ on each host

# The TPU software version for a generation (gcloud's --version / --runtime-version).
runtime_version_for() {
  case "$1" in
    v4-*) echo "tpu-ubuntu2204-base" ;;
    v5litepod-*|v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) echo "error: no runtime version known for accelerator type '$1'; set RUNTIME_VERSION" >&2
       return 1 ;;
  esac
}

# Number of hosts (workers) of a slice. v4/v5p: the suffix counts TensorCores, 2 per
# chip, 4 chips per host; v5e/v6e: the suffix counts chips, one host up to 8 chips,
# 4 chips per host beyond.
workers_for() {
  local size="${1##*-}"
  case "$1" in
    v4-*|v5p-*) echo $(( size > 8 ? size / 8 : 1 )) ;;
    v5litepod-*|v5e-*|v6e-*) echo $(( size > 8 ? size / 4 : 1 )) ;;
    *) echo 1 ;;
  esac
}

if [[ -z "${RUNTIME_VERSION}" ]]; then
  RUNTIME_VERSION="$(runtime_version_for "${ACCELERATOR_TYPE}")" || exit 2
fi
: "${NUM_WORKERS:=$(workers_for "${ACCELERATOR_TYPE}")}"

DRY_RUN=0

# Runs a command, or with --dry-run prints it (shell-quoted, one line) instead.
run() {
  if [[ "${DRY_RUN}" == 1 ]]; then
    local arg line=""
    for arg in "$@"; do
      line+=" $(shell_quote "${arg}")"
    done
    echo "${line# }"
  else
    "$@"
  fi
}

# One argument as the shell reads it back: bare when safe, else in single quotes.
shell_quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then
    printf '%s' "$1"
  elif [[ "$1" =~ ^(--[A-Za-z0-9_.-]+=)(.*)$ ]]; then  # --flag='value'
    printf '%s' "${BASH_REMATCH[1]}"
    shell_quote "${BASH_REMATCH[2]}"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# The flags every gcloud tpu command takes.
gcloud_scope() {
  SCOPE=(--zone="${ZONE}")
  if [[ -n "${PROJECT}" ]]; then
    SCOPE+=(--project="${PROJECT}")
  fi
}
gcloud_scope
