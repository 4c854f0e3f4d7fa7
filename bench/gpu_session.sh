#!/usr/bin/env bash
# Every GPU measurement bench/NOTES.md asks for, in parts of a few compilations each:
#   bash bench/gpu_session.sh 1   # gpt2_small: throughput at batch 12 and 32, the loss ablation
#   bash bench/gpu_session.sh 2   # gpt2_small: parts, memory, loss chunks, XLA flag presets
#   bash bench/gpu_session.sh 3   # gpt1, gpt2_xl
#   bash bench/gpu_session.sh 4   # the loop's own cost; document masks end to end
#   bash bench/gpu_session.sh 5   # the attention kernel, Mosaic GPU and Triton builds: tests on the GPU, the benchmark
#   bash bench/gpu_session.sh 6   # the kernel's tile sizes, both builds: a search at T=2048, head dims 64 and 128
# Output goes to stdout and to $OUT/part<N>.log ($OUT defaults to /tmp). Every part loads configs,
# so it needs ml_collections; part 4's loop also needs grain and sentencepiece. Install them
# first on a machine that lacks them.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
log="${OUT:-/tmp}/part${1:?give the part: 1 to 6}.log"
exec > >(tee "$log") 2>&1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
python -c "import jax; print(jax.__version__, jax.devices())"
small="--config configs/gpt2_small.py"
case "$1" in
1)
  python -m gptjax.bench train $small --batches 12,32
  python bench/loss_ablation.py $small --batches 12
  ;;
2)
  python -m gptjax.bench parts $small --config.train.batch_size=12
  python -m gptjax.bench memory $small --batches 12
  python -m gptjax.bench train $small --batches 12 --config.model.loss_chunk_len=256
  for flags in overlap cublas no_command_buffers; do
    python -m gptjax.bench train $small --batches 12 --xla-flags=$flags
  done
  ;;
3)
  python -m gptjax.bench train --config configs/gpt1.py
  python -m gptjax.bench train --config configs/gpt1.py --config.model.attn_dropout=0
  python -m gptjax.bench memory --config configs/gpt2_xl.py --batches 8,16
  python -m gptjax.bench train --config configs/gpt2_xl.py --batches 8,16 --steps 10
  ;;
4)
  python -m gptjax.bench loop $small --workdir /tmp/bench-loop --steps 300
  python -m gptjax.bench train $small --batches 12 --config.data.document_mask=true
  python -m gptjax.bench train $small --batches 12 --config.data.document_mask=true --config.model.attention=xla
  ;;
5)
  python -m pytest -q tests/test_mosaic_attention.py tests/test_triton_attention.py tests/test_attention.py
  python -m gptjax.bench attention
  ;;
6)
  python -m gptjax.bench attention --tune --kernel mosaic --seq-lens 2048 --head-dims 64,128
  python -m gptjax.bench attention --tune --kernel triton --seq-lens 2048 --head-dims 64,128
  ;;
*)
  echo "part must be 1 to 6" >&2; exit 2
  ;;
esac
