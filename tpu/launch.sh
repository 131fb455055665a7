#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Starts `cnnjax train` on every worker of the TPU VM at once, in the background,
# with a gs:// workdir; each worker logs to ~/LOG_DIR/train.log and copies that
# log to WORKDIR/logs/HOSTNAME.log when the run ends.
#
#   tpu/launch.sh [--dry-run] [--config FILE] [--workdir gs://...] [-- TRAIN ARGS...]
#   tpu/launch.sh [--dry-run] --logs     # fetch every worker's log to ./logs/worker-N.log
#   tpu/launch.sh [--dry-run] --stop     # stop the run on every worker
#
# Arguments after -- go to `cnnjax train`, e.g. -- --config.num_epochs=1.
# A restarted launch resumes from the newest checkpoint in the workdir.
set -euo pipefail

dry_run=0
action=start
extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --logs) action=logs ;;
    --stop) action=stop ;;
    --config) CONFIG="$2"; shift ;;
    --workdir) WORKDIR="$2"; shift ;;
    --name) TPU_NAME="$2"; shift ;;
    --zone) ZONE="$2"; shift ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "error: unknown argument '$1'; see $0 --help" >&2; exit 2 ;;
  esac
  shift
done

# shellcheck source=env.sh
source "$(dirname "$0")/env.sh"
DRY_RUN="${dry_run}"

log="\$HOME/${LOG_DIR}/train.log"
pid="\$HOME/${LOG_DIR}/train.pid"

case "${action}" in
  start)
    train=(cnnjax train --config "${CONFIG}" --workdir "${WORKDIR}"
           "--config.data_dir=${DATA_DIR}" ${extra[@]+"${extra[@]}"})
    train_text=""
    for arg in "${train[@]}"; do
      train_text+=" $(shell_quote "${arg}")"
    done
    distributed=""
    if [[ "${NUM_WORKERS}" -gt 1 ]]; then
      distributed="CNNJAX_DISTRIBUTED=1 "
    fi
    body="cd ~/${REMOTE_DIR} && ${distributed}PATH=\$HOME/.local/bin:\$PATH${train_text} > ${log} 2>&1; gcloud storage cp ${log} ${WORKDIR}/logs/\$(hostname).log"
    remote="mkdir -p ~/${LOG_DIR} && setsid nohup bash -c \"${body}\" > /dev/null 2>&1 < /dev/null & echo \$! > ${pid}; echo \"\$(hostname): started, log ${log}\""
    run gcloud compute tpus tpu-vm ssh "${TPU_NAME}" "${SCOPE[@]}" --worker=all \
      --command="${remote}"
    ;;
  logs)
    run mkdir -p logs
    for ((i = 0; i < NUM_WORKERS; i++)); do
      run gcloud compute tpus tpu-vm scp "${TPU_NAME}:~/${LOG_DIR}/train.log" \
        "logs/worker-${i}.log" "${SCOPE[@]}" --worker="${i}"
    done
    ;;
  stop)
    run gcloud compute tpus tpu-vm ssh "${TPU_NAME}" "${SCOPE[@]}" --worker=all \
      --command="if [ -f ${pid} ]; then kill -- -\$(cat ${pid}) 2>/dev/null || kill \$(cat ${pid}); fi"
    ;;
esac
