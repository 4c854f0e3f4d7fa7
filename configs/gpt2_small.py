"""GPT-2 small (124M parameters): pre-LN blocks with a final LayerNorm, context 1024.

    gptjax pretrain --config configs/gpt2_small.py --workdir runs/gpt2_small
    python -m gptjax.bench train --config configs/gpt2_small.py --config.train.batch_size=32

12 layers, d_model 768, 12 heads, FFN 3072; vocabulary 50,257 (GPT-2's byte-level BPE) padded to
50,304 rows so the vocabulary matmul tiles evenly; residual output projections initialised with
0.02 / sqrt(2 x 12). AdamW (0.9, 0.95), lr 0.0006 (the GPT-3 paper's value for this size),
warmup then cosine to 10%, weight decay 0.1, clipping at 1, no dropout.

What it should reach: not yet measured with gptjax. For scale, nanoGPT reports a validation
loss of about 2.85 on OpenWebText for GPT-2 small trained on ~300B tokens with 0.5M-token
batches, a far longer run than this config's 600k steps of 32 x 1024 tokens (~20B). It needs a
real corpus (data.source) and a GPU; on the built-in synthetic corpus this config runs as is.

On 8 x H100 under fsdp=8 (compiled for them, a plan, not a measurement; 59.33 GiB usable per
device): batch 64 x 1024 plans 4.13 GiB per device; the largest batch that fits is 968 (58.96 GiB),
976 does not (59.44 GiB):

    gptjax compile --config configs/gpt2_small.py --target h100:8 \
        --config.mesh.data=1 --config.mesh.fsdp=8 --config.train.batch_size=968
"""

from gptjax.config import gpt2_config


def get_config():
    c = gpt2_config("gpt2_small", n_layer=12, n_head=12, d_model=768, lr=0.0006, batch_size=32)
    return c
