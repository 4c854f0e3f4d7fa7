"""GPT-2 large (774M parameters): pre-LN blocks with a final LayerNorm, context 1024.

    gptjax pretrain --config configs/gpt2_large.py --workdir runs/gpt2_large
    python -m gptjax.bench train --config configs/gpt2_large.py --config.train.batch_size=8

36 layers, d_model 1280, 20 heads, FFN 5120; vocabulary 50,257 (GPT-2's byte-level BPE) padded to
50,304 rows so the vocabulary matmul tiles evenly; residual output projections initialised with
0.02 / sqrt(2 x 36). AdamW (0.9, 0.95), lr 0.00025 (the GPT-3 paper's value for this size),
warmup then cosine to 10%, weight decay 0.1, clipping at 1, no dropout.

On 8 x H100 under fsdp=8 (compiled for them, a plan, not a measurement; 59.33 GiB usable per
device): batch 8 x 1024 plans 4.40 GiB per device; the largest batch that fits is 232 (58.63 GiB),
240 does not (60.91 GiB):

    gptjax compile --config configs/gpt2_large.py --target h100:8 \
        --config.mesh.data=1 --config.mesh.fsdp=8 --config.train.batch_size=232

What it should reach: not yet measured with gptjax; it needs a real corpus and a GPU. On the
built-in synthetic corpus this config runs as is.
"""

from gptjax.config import gpt2_config


def get_config():
    c = gpt2_config("gpt2_large", n_layer=36, n_head=20, d_model=1280, lr=0.00025, batch_size=8)
    return c
