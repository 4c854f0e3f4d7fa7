"""GPT-2 xl (1.5B parameters): pre-LN blocks with a final LayerNorm, context 1024.

    gptjax pretrain --config configs/gpt2_xl.py --workdir runs/gpt2_xl
    python -m gptjax.bench train --config configs/gpt2_xl.py --batches 8,16
    python -m gptjax.bench memory --config configs/gpt2_xl.py --batches 8,16 --config.model.dtype=bfloat16

48 layers, d_model 1600, 25 heads, FFN 6400; vocabulary 50,257 (GPT-2's byte-level BPE) padded to
50,304 rows so the vocabulary matmul tiles evenly; residual output projections initialised with
0.02 / sqrt(2 x 48). AdamW (0.9, 0.95), lr 0.0002 (the GPT-3 paper's value for this size),
warmup then cosine to 10%, weight decay 0.1, clipping at 1, no dropout.

One 80 GB card: `save_dots` keeps 11.6 GiB of activations at batch 8 and 23.1 GiB at batch 16
(`bench memory`), next to 23.2 GiB of float32 params, Adam moments and gradients, so batch 16
should fit; the GPU's peak and MFU are not measured yet.

On 8 x H100 under fsdp=8 (compiled for them, a plan, not a measurement): batch 64 x 1024 plans
14.47 GiB per device of the 59.3 GiB JAX's allocator takes, batch 16 6.90 GiB:

    python -m gptjax.bench memory --config configs/gpt2_xl.py --target h100:8 \
        --config.mesh.data=1 --config.mesh.fsdp=8 --batches 16,64 --kinds pretrain

The largest batch that fits there is 320 (59.28 GiB) and 328 does not (60.70 GiB); under
data=2 x fsdp=4, 304 fits (58.61 GiB) and 312 does not (60.03 GiB). Near those batches XLA warns
that rematerialisation cannot bring memory under 60.23 GiB; leave a margin:

    gptjax compile --config configs/gpt2_xl.py --target h100:8 \
        --config.mesh.data=1 --config.mesh.fsdp=8 --config.train.batch_size=320

What it should reach: not yet measured with gptjax; it needs a real corpus and a GPU. On the
built-in synthetic corpus this config runs as is.
"""

from gptjax.config import gpt2_config


def get_config():
    c = gpt2_config("gpt2_xl", n_layer=48, n_head=25, d_model=1600, lr=0.0002, batch_size=4)
    c.model.remat = "save_dots"  # 1.5B parameters: trade recomputation for activation memory
    return c
