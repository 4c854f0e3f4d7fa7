#!/usr/bin/env bash
# launch/local.sh N CMD... -- N processes of CMD on this machine, joined through jax.distributed
# with the coordinator on localhost. Each output line is prefixed "[i/N] " (gptjax's own lines
# already are; the rest, such as JAX warnings, get it here). A process that fails says
# "[i/N] exited with status C"; the script exits with the status of the highest-numbered process that failed.
# Statuses: 2 a mistake in the command or config, 74 the workdir's storage failed, 75 stopped by
# SIGTERM after saving (run again to resume), 76 stopped because another process of the job
# failed, 130 Ctrl-C after saving, 137 killed (kill -9, or out of memory).
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
    rc=${PIPESTATUS[0]}
    if [ "$rc" -ne 0 ]; then
      echo "[$i/$n] exited with status $rc" >&2
    fi
    exit "$rc"
  ) &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit "$status"
