#!/usr/bin/env bash
# Every GPU measurement bench/NOTES.md asks for, in three parts (each meant to run in one go):
#   bash bench/gpu_session.sh 1   # gpt2_small: throughput, loss ablation, parts, memory, flags
#   bash bench/gpu_session.sh 2   # gpt1, gpt2_xl, the loop's own cost
#   bash bench/gpu_session.sh 3   # the Pallas attention kernel: tests on the GPU, kernel and end-to-end benchmarks
#   bash bench/gpu_session.sh 4   # the kernel's tile sizes: a search at T=2048, head dims 64 and 128
# Output goes to stdout and to $OUT/part<N>.log ($OUT defaults to /tmp). Every part loads configs,
# so it needs ml_collections; part 2's loop also needs grain and sentencepiece. Install them
# first on a machine that lacks them.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
log="${OUT:-/tmp}/part${1:?give the part: 1, 2, 3 or 4}.log"
exec > >(tee "$log") 2>&1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
python -c "import jax; print(jax.__version__, jax.devices())"
small="--config configs/gpt2_small.py"
case "$1" in
1)
  python -m gptjax.bench train $small --batches 12,32
  python bench/loss_ablation.py $small --batches 12
  python -m gptjax.bench parts $small --config.train.batch_size=12
  python -m gptjax.bench memory $small --batches 12
  python -m gptjax.bench train $small --batches 12 --config.model.loss_chunk_len=256
  for flags in overlap cublas no_command_buffers; do
    python -m gptjax.bench train $small --batches 12 --xla-flags=$flags
  done
  ;;
2)
  python -m gptjax.bench train --config configs/gpt1.py
  python -m gptjax.bench train --config configs/gpt1.py --config.model.attn_dropout=0
  python -m gptjax.bench memory --config configs/gpt2_xl.py --batches 8,16
  python -m gptjax.bench train --config configs/gpt2_xl.py --batches 8,16 --steps 10
  python -m gptjax.bench loop $small --workdir /tmp/bench-loop --steps 300
  ;;
3)
  python -m pytest -q tests/test_flash_attention.py
  python -m gptjax.bench attention
  python -m gptjax.bench train $small --batches 12 --config.data.document_mask=false
  python -m gptjax.bench train $small --batches 12 --config.data.document_mask=true
  python -m gptjax.bench train $small --batches 12 --config.data.document_mask=true --config.model.attention=xla
  ;;
4)
  python -m gptjax.bench attention --tune --seq-lens 2048 --head-dims 64,128
  ;;
esac
