"""GPT-1 (Radford et al., 2018): the paper's model and pretraining recipe.

    gptjax pretrain --config configs/gpt1.py --workdir runs/gpt1

12 post-LN blocks (LayerNorm after each residual add, no final LN), d_model 768, 12 heads, FFN
3072, context 512, learned positions, GELU (tanh), dropout 0.1 on embeddings, attention
probabilities and residual branches, N(0, 0.02) init, output layer tied to the token embedding;
Adam(W) with lr 2.5e-4, 2000 warmup steps then cosine to 0, batches of 64 x 512 tokens,
decoupled weight decay 0.01 on non-bias, non-gain weights, gradient clipping at 1.

With the paper's 40,478-token BPE vocabulary the model has 116.5M parameters (the embedding is
padded to 40,576 rows for speed; padded ids are never predicted). The paper trained 100 epochs on
BooksCorpus and reports a token-level perplexity of 18.4 there; reaching that needs the real
corpus and far more compute than a CPU. On the built-in synthetic corpus this config runs as is.

On 8 x H100 under fsdp=8 (compiled for them, a plan, not a measurement; 59.33 GiB usable per
device; attention dropout runs the project's Pallas kernel): the paper's batch 64 x 512 plans
2.34 GiB per device; the largest batch that fits is 2016 (59.10 GiB), 2024 does not (59.71 GiB):

    gptjax compile --config configs/gpt1.py --target h100:8 \
        --config.mesh.data=1 --config.mesh.fsdp=8 --config.train.batch_size=2016
"""

from gptjax.config import base_config


def get_config():
    c = base_config()
    c.name = "gpt1"
    c.model.block = "post_ln"
    c.model.vocab_size = 40478
    c.model.n_layer = 12
    c.model.n_head = 12
    c.model.d_model = 768
    c.model.d_ff = 3072
    c.model.max_len = 512
    c.model.dropout = 0.1
    c.model.attn_dropout = 0.1
    c.model.init_std = 0.02
    c.model.scale_residual_init = False  # GPT-1 used one std for every weight
    c.train.batch_size = 64
    c.train.seq_len = 512
    c.train.steps = 100_000
    c.train.lr = 2.5e-4
    c.train.warmup_steps = 2000
    c.train.schedule = "cosine"
    c.train.min_lr_ratio = 0.0
    c.train.weight_decay = 0.01
    c.train.b1 = 0.9
    c.train.b2 = 0.999
    c.train.eps = 1e-8
    c.train.grad_clip = 1.0
    c.train.log_every = 100
    c.train.eval_every = 2000
    c.train.checkpoint_every = 5000
    return c
