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
"""

from gptjax.config import base_config


def get_config():
    c = base_config()
    c.name = "gpt2_small"
    c.model.block = "pre_ln"
    c.model.vocab_size = 50257
    c.model.vocab_pad_multiple = 128
    c.model.n_layer = 12
    c.model.n_head = 12
    c.model.d_model = 768
    c.model.d_ff = 3072
    c.model.max_len = 1024
    c.model.dropout = 0.0
    c.model.attn_dropout = 0.0
    c.model.scale_residual_init = True
    c.train.batch_size = 32
    c.train.seq_len = 1024
    c.train.steps = 600_000
    c.train.lr = 0.0006
    c.train.warmup_steps = 2000
    c.train.schedule = "cosine"
    c.train.min_lr_ratio = 0.1
    c.train.weight_decay = 0.1
    c.train.b1 = 0.9
    c.train.b2 = 0.95
    c.train.grad_clip = 1.0
    c.train.log_every = 100
    c.train.eval_every = 2000
    c.train.checkpoint_every = 5000
    return c
