#!/bin/bash
# A TPU VM pod for gkd: copy this repository to every worker and install it,
# or run one command on every worker (what launch/sweep.py --launcher=tpu_vm does).
#   launch/tpu_vm.sh setup NAME ZONE            # scp the repo to ~/gkd, pip install it
#   launch/tpu_vm.sh run NAME ZONE ARGS...      # python3 -m gkd.main ARGS on all workers
# On a pod every worker runs the same command; gkd.main initialises
# jax.distributed from the TPU environment. MODEL_DIR must be a path every
# worker sees (a gcsfuse or Filestore mount). Set PROJECT to pick a project.
set -euo pipefail
action="${1:?usage: tpu_vm.sh setup|run NAME ZONE [ARGS...]}"
name="${2:?TPU VM name}"
zone="${3:?zone}"
shift 3
flags=(--zone="$zone" --worker=all)
if [ -n "${PROJECT:-}" ]; then flags+=(--project="$PROJECT"); fi
repo="$(cd "$(dirname "$0")/.." && pwd)"
case "$action" in
  setup)
    gcloud compute tpus tpu-vm scp --recurse "$repo" "$name":~/gkd "${flags[@]}"
    gcloud compute tpus tpu-vm ssh "$name" "${flags[@]}" \
      --command="pip install -U 'jax[tpu]' && pip install -e ~/gkd"
    ;;
  run)
    gcloud compute tpus tpu-vm ssh "$name" "${flags[@]}" \
      --command="cd ~/gkd && python3 -m gkd.main $(printf '%q ' "$@")"
    ;;
  *)
    echo "unknown action $action; use setup or run" >&2
    exit 2
    ;;
esac
