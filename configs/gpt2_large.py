"""GPT-2 large (774M parameters): pre-LN blocks with a final LayerNorm, context 1024.

    gptjax pretrain --config configs/gpt2_large.py --workdir runs/gpt2_large
    python -m gptjax.bench train --config configs/gpt2_large.py --config.train.batch_size=8

36 layers, d_model 1280, 20 heads, FFN 5120; vocabulary 50,257 (GPT-2's byte-level BPE) padded to
50,304 rows so the vocabulary matmul tiles evenly; residual output projections initialised with
0.02 / sqrt(2 x 36). AdamW (0.9, 0.95), lr 0.00025 (the GPT-3 paper's value for this size),
warmup then cosine to 10%, weight decay 0.1, clipping at 1, no dropout.

What it should reach: not yet measured with gptjax; it needs a real corpus and a GPU. On the
built-in synthetic corpus this config runs as is.
"""

from gptjax.config import base_config


def get_config():
    c = base_config()
    c.name = "gpt2_large"
    c.model.block = "pre_ln"
    c.model.vocab_size = 50257
    c.model.vocab_pad_multiple = 128
    c.model.n_layer = 36
    c.model.n_head = 20
    c.model.d_model = 1280
    c.model.d_ff = 5120
    c.model.max_len = 1024
    c.model.dropout = 0.0
    c.model.attn_dropout = 0.0
    c.model.scale_residual_init = True
    c.train.batch_size = 8
    c.train.seq_len = 1024
    c.train.steps = 600_000
    c.train.lr = 0.00025
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
