"""A CPU-sized GPT-2-style model for the demo and the tests.

    gptjax pretrain --config configs/tiny.py --workdir runs/tiny

On 2 CPU cores the default 300 steps take about a minute on the synthetic corpus; the training
loss falls from ln(512) = 6.2 to under a third of that.

On 8 x H100 under fsdp=8 (compiled for them, a plan, not a measurement) pretraining and
fine-tuning at batch 16 x 128 each plan 0.02 GiB per device:

    gptjax compile --config configs/tiny.py --target h100:8 --kind both \
        --config.mesh.data=1 --config.mesh.fsdp=8
"""

from gptjax.config import base_config


def get_config():
    c = base_config()
    c.name = "tiny"
    c.model.block = "pre_ln"
    c.model.vocab_size = 512
    c.model.vocab_pad_multiple = 128
    c.model.n_layer = 4
    c.model.n_head = 4
    c.model.d_model = 128
    c.model.d_ff = 512
    c.model.max_len = 128
    c.model.dropout = 0.0
    c.train.steps = 300
    c.train.batch_size = 16
    c.train.seq_len = 128
    c.train.lr = 3e-3
    c.train.warmup_steps = 30
    c.train.weight_decay = 0.1
    c.train.b2 = 0.99
    c.train.log_every = 10
    c.train.eval_every = 100
    c.data.tokenizer_vocab_size = 512
    c.data.num_documents = 4000
    return c
