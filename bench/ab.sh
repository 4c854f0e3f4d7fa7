#!/usr/bin/env bash
# One benchmark command at two commits, alternating, so both see the same machine state:
#   bash bench/ab.sh REV_A REV_B ROUNDS -- train --config configs/tiny.py --batches 16
# Each round runs `python -m gptjax.bench ARGS...` at REV_A, then at REV_B (each from its own git
# worktree under ${AB_DIR:-/tmp/gptjax-ab}), and prints the output's table rows with the revision
# in front. Compare medians over rounds, not single rows.
set -euo pipefail
cd "$(dirname "$0")/.."
a=${1:?REV_A}; b=${2:?REV_B}; rounds=${3:?ROUNDS}; shift 3
[ "${1:-}" = "--" ] && shift
root=${AB_DIR:-/tmp/gptjax-ab}
python=${PYTHON:-$PWD/.venv/bin/python}
for rev in "$a" "$b"; do
  dir="$root/$(git rev-parse --short "$rev")"
  [ -d "$dir" ] || git worktree add --detach -q "$dir" "$rev"
done
for round in $(seq "$rounds"); do
  for rev in "$a" "$b"; do
    short=$(git rev-parse --short "$rev")
    (cd "$root/$short" && PYTHONPATH="$root/$short" "$python" -m gptjax.bench "$@" 2>/dev/null) |
      sed -n "s/^/$short round $round: /p"
  done
done
