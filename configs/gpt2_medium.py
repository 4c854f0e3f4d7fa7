"""GPT-2 medium (350M parameters): pre-LN blocks with a final LayerNorm, context 1024.

    gptjax pretrain --config configs/gpt2_medium.py --workdir runs/gpt2_medium
    python -m gptjax.bench train --config configs/gpt2_medium.py --config.train.batch_size=16

24 layers, d_model 1024, 16 heads, FFN 4096; vocabulary 50,257 (GPT-2's byte-level BPE) padded to
50,304 rows so the vocabulary matmul tiles evenly; residual output projections initialised with
0.02 / sqrt(2 x 24). AdamW (0.9, 0.95), lr 0.0003 (the GPT-3 paper's value for this size),
warmup then cosine to 10%, weight decay 0.1, clipping at 1, no dropout.

On 8 x H100 under fsdp=8 (compiled for them, a plan, not a measurement): batch 64 x 1024 plans
9.59 GiB per device of the 59.3 GiB JAX's allocator takes, batch 16 3.27 GiB:

    python -m gptjax.bench memory --config configs/gpt2_medium.py --target h100:8 \
        --config.mesh.data=1 --config.mesh.fsdp=8 --batches 16,64 --kinds pretrain

The largest batch that fits there is 416 (58.88 GiB) and 424 does not (59.89 GiB); under
data=2 x fsdp=4, 400 fits (58.70 GiB) and 408 does not (59.86 GiB):

    gptjax compile --config configs/gpt2_medium.py --target h100:8 \
        --config.mesh.data=1 --config.mesh.fsdp=8 --config.train.batch_size=416

What it should reach: not yet measured with gptjax; it needs a real corpus and a GPU. On the
built-in synthetic corpus this config runs as is.
"""

from gptjax.config import gpt2_config


def get_config():
    c = gpt2_config("gpt2_medium", n_layer=24, n_head=16, d_model=1024, lr=0.0003, batch_size=16)
    return c
