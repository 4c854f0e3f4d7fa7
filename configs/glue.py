"""Fine-tuning on GLUE the GPT-1 way, with the paper's recipe.

    gptjax finetune --config configs/glue.py --config.task=rte --config.init_from=runs/gpt1 --workdir runs/rte
    gptjax eval     --config configs/glue.py --config.task=rte --workdir runs/rte

The paper's settings for most tasks (and so the default for all of them): lr 6.25e-5, batch 32,
3 epochs, linear warmup over 0.2% of the updates then linear decay to 0, dropout 0.1 in the
decoder and before the task head, weight decay 0.01 on weights, and the auxiliary LM loss with
weight 0.5. The paper gives no per-task values beyond "most tasks"; change them with
`--config.train.lr=...`, `--config.finetune.epochs=...`.

The model's shape (layers, width, vocabulary, context) comes from `init_from`; the model section
here only sets what fine-tuning chooses itself (dropout, compute dtype, attention, remat). Data:
`--config.task_data=tfds` (default for GLUE; prepared `glue/<task>` under TFDS_DATA_DIR), `tsv:<the
GLUE folder>` or `jsonl:<folder>`. Every task: `--config.task=all` with `gptjax eval` scores the
runs WORKDIR/<task> together and writes the GLUE submission folder.

On 8 x H100 under fsdp=8 (compiled for them, a plan, not a measurement), fine-tuning a model of
GPT-1's shape at the paper's batch 32 x 512 plans 1.32 GiB per device of the 59.33 GiB usable:

    gptjax compile --config configs/glue.py --target h100:8 --kind finetune \
        --config.mesh.data=1 --config.mesh.fsdp=8 --config.model.block=post_ln \
        --config.model.vocab_size=40478 --config.model.n_layer=12 --config.model.n_head=12 \
        --config.model.d_model=768 --config.model.d_ff=3072 --config.model.max_len=512 \
        --config.train.seq_len=512
"""

from gptjax.config import base_config


def get_config():
    c = base_config()
    c.name = "glue"
    c.model.dropout = 0.1
    c.model.attn_dropout = 0.1
    c.train.lr = 6.25e-5
    c.train.batch_size = 32
    c.train.weight_decay = 0.01
    c.train.b1 = 0.9
    c.train.b2 = 0.999
    c.train.eps = 1e-8
    c.train.grad_clip = 1.0
    c.train.log_every = 50
    c.finetune.epochs = 3
    c.finetune.warmup_fraction = 0.002
    c.finetune.clf_dropout = 0.1
    c.finetune.lm_weight = 0.5
    return c
