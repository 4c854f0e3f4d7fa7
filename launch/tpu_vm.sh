#!/usr/bin/env bash
# launch/tpu_vm.sh NAME ZONE CMD... -- CMD on every worker of the TPU VM slice NAME at once.
#   launch/tpu_vm.sh my-v4-32 us-central2-b .venv/bin/gptjax pretrain --config configs/gpt2_small.py \
#       --workdir /mnt/shared/runs/x
#
# Every worker runs the same command with GPTJAX_DISTRIBUTED=auto, which has gptjax call
# jax.distributed.initialize() with no arguments: JAX finds the slice's workers by itself.
# The command runs in the repository directory, assumed to be at the same path on every worker as
# here; GPTJAX_REMOTE_DIR names another path. PROJECT, when set, is passed as --project. WORKDIR
# must be on a filesystem every worker shares.
# gcloud reaches several workers through ssh-agent: run `ssh-add ~/.ssh/google_compute_engine` first.
#
# A run that stops early after saving a checkpoint exits 75; nothing here restarts it. Run the
# same command again to resume.
set -euo pipefail
if [ "$#" -lt 3 ]; then
  echo "usage: [PROJECT=...] [GPTJAX_REMOTE_DIR=...] launch/tpu_vm.sh NAME ZONE CMD..." >&2
  exit 2
fi
name=$1
zone=$2
shift 2
remote_dir=${GPTJAX_REMOTE_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}

# The command travels as one string through ssh and the worker's shell. Single quotes, with each
# embedded ' written as '\'', reach any POSIX shell with every argument intact.
sq="'"
esc="'\\''"
quote() { printf "'%s'" "${1//"$sq"/"$esc"}"; }
remote="cd $(quote "$remote_dir") && GPTJAX_DISTRIBUTED=auto"
for arg in "$@"; do
  remote+=" $(quote "$arg")"
done

project=()
if [ -n "${PROJECT:-}" ]; then
  project=(--project "$PROJECT")
fi
exec gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" ${project[@]+"${project[@]}"} \
  --worker=all --command "$remote"
