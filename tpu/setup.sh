#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Installs cnnjax with jax[tpu] on every worker of the TPU VM and copies the
# prepared tfds dataset from the bucket to each host's local disk.
#
#   tpu/setup.sh [--dry-run] [--skip-data] [--name NAME] [--zone ZONE]
#
# cnnjax comes from CNNJAX_REPO at CNNJAX_REF (cloned to ~/REMOTE_DIR), or from
# a local wheel (CNNJAX_WHEEL=dist/cnnjax-*.whl; the experiment configs are then
# copied beside it). gcsfs and google-cloud-storage let orbax, the metrics file
# and TensorBoard write to a gs:// workdir without TensorFlow. The data is
# copied because tfds' array_record reader cannot read gs:// paths:
# DATA_GCS/DATASET -> DATA_DIR/DATASET on every host.
set -euo pipefail

dry_run=0
skip_data=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --skip-data) skip_data=1 ;;
    --name) TPU_NAME="$2"; shift ;;
    --zone) ZONE="$2"; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "error: unknown argument '$1'; see $0 --help" >&2; exit 2 ;;
  esac
  shift
done

here="$(dirname "$0")"
# shellcheck source=env.sh
source "${here}/env.sh"
DRY_RUN="${dry_run}"

ssh_all() {
  run gcloud compute tpus tpu-vm ssh "${TPU_NAME}" "${SCOPE[@]}" --worker=all --command="$1"
}

# 1. Python packages (the TPU runtime images ship python3 and pip).
packages="python3 -m pip install --upgrade pip && python3 -m pip install \"jax[tpu]\" gcsfs google-cloud-storage"
ssh_all "set -e; ${packages}"

# 2. cnnjax itself.
if [[ -n "${CNNJAX_WHEEL}" ]]; then
  wheel="$(basename "${CNNJAX_WHEEL}")"
  ssh_all "mkdir -p ~/${REMOTE_DIR}/experiments"
  run gcloud compute tpus tpu-vm scp "${CNNJAX_WHEEL}" "${TPU_NAME}:~/${REMOTE_DIR}/" \
    "${SCOPE[@]}" --worker=all
  run gcloud compute tpus tpu-vm scp --recurse "${here}/../experiments/configs" \
    "${TPU_NAME}:~/${REMOTE_DIR}/experiments/" "${SCOPE[@]}" --worker=all
  ssh_all "set -e; python3 -m pip install ~/${REMOTE_DIR}/${wheel}"
else
  ssh_all "set -e; if [ ! -d ~/${REMOTE_DIR}/.git ]; then git clone ${CNNJAX_REPO} ~/${REMOTE_DIR}; fi; cd ~/${REMOTE_DIR} && git fetch origin ${CNNJAX_REF} && git checkout --detach FETCH_HEAD && python3 -m pip install -e ."
fi

# 3. The prepared dataset, from the bucket to each host's disk.
if [[ "${skip_data}" == 0 ]]; then
  ssh_all "set -e; sudo mkdir -p ${DATA_DIR} && sudo chown -R \"\$USER\" ${DATA_DIR} && df -h ${DATA_DIR} && gcloud storage cp -r ${DATA_GCS}/${DATASET} ${DATA_DIR}/"
fi

# 4. Every worker sees the TPU (all workers at once: a pod slice initializes together).
ssh_all "python3 -c 'import jax; print(jax.process_index(), jax.process_count(), jax.device_count(), jax.devices()[0].device_kind)'"
