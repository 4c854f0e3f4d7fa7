#!/usr/bin/env bash
# launch/local.sh N CMD... -- N processes of CMD on this machine, joined through jax.distributed
# with the coordinator on localhost. Each output line is prefixed "[i/N] " (gptjax's own lines
# already are; the rest, such as JAX warnings, get it here).
#   launch/local.sh 2 gptjax pretrain --config configs/tiny.py --workdir runs/two
set -euo pipefail
if [ "$#" -lt 2 ]; then
  echo "usage: launch/local.sh N CMD..." >&2
  exit 2
fi
n=$1
shift
port=${GPTJAX_PORT:-$((20000 + RANDOM % 20000))}
pids=()
for ((i = 0; i < n; i++)); do
  (
    set +e
    GPTJAX_COORDINATOR="localhost:$port" GPTJAX_NUM_PROCESSES="$n" GPTJAX_PROCESS_ID="$i" "$@" 2>&1 \
      | sed -u -E "/^\[[0-9]+\/[0-9]+\] /! s/^/[$i\/$n] /"
    exit "${PIPESTATUS[0]}"
  ) &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit "$status"
