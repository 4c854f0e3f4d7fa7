"""Where a train step's milliseconds go: each part of the step timed on its own.

    python -m gptjax.bench parts --config configs/gpt2_small.py --config.train.batch_size=12

Each part is jitted and timed alone, forward and backward, on the step's own shapes and params:
the embedding lookup, one block (times n_layer), the attention op inside it, the vocabulary
projection with the loss, and the optimizer update. "other" is what the whole step takes beyond
their sum: host gaps, and fusions or overlap the whole-program compile finds and the parts
cannot. For the kernel-level picture, `train.profile_steps` or `bench train --profile DIR`
writes a jax.profiler trace (TensorBoard's profile plugin or Perfetto opens it).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gptjax import attention
from gptjax.loss import projected_lm_loss
from gptjax.model import REMAT_POLICIES


def _time_ms(fn, args, repeats: int, carry: bool = False) -> float:
    """Mean ms of fn(*args). carry=True: fn returns its own next arguments (a state update with
    donated inputs, as the train step runs), fed back in each time."""
    for _ in range(2):  # compile, then one more: the first runs after compiling are slow on some backends
        out = fn(*args)
        args = out if carry else args
    jax.block_until_ready(out)
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn(*args)
        args = out if carry else args
    jax.block_until_ready(out)
    return 1000 * (time.perf_counter() - start) / repeats


def _sum_grad(f):
    """Forward and backward of f through a float32 sum of its output, for its first two
    arguments: what the step runs for it. Further arguments are data (passed, not closed over, so
    the compiler does not fold them in as constants)."""
    return jax.jit(jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32)), argnums=(0, 1)))


def time_parts(trainer, batch: dict, repeats: int) -> list[tuple[str, int, float]]:
    """[(part, times per step, ms each)] for `trainer`'s model on `batch`, ending with the whole step."""
    with jax.set_mesh(trainer.mesh):  # the model's activation constraints read it
        return _time_parts(trainer, batch, repeats)


def _time_parts(trainer, batch: dict, repeats: int) -> list[tuple[str, int, float]]:
    model = nnx.merge(trainer.graphdef, trainer.state.params)
    m = model.config
    (b, t), d = batch["tokens"].shape, m.d_model
    heads = m.n_head
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(b, t, d)), model.dtype)
    rows = []

    wte, wpe = model.wte[...], model.wpe[...]
    embed = _sum_grad(lambda wte, wpe, tokens, positions: (wte[tokens] + wpe[positions]).astype(model.dtype))
    rows.append(("embedding", 1, _time_ms(embed, (wte, wpe, batch["tokens"], batch["positions"]), repeats)))

    block_def, block_params = nnx.split(model.blocks[0], nnx.Param)

    segment_ids = batch.get("segment_ids")  # with data.document_mask: the step's masks, and its kernel

    def block(params, x):
        return nnx.merge(block_def, params)(x, segment_ids=segment_ids)

    if m.remat != "none":
        block = jax.checkpoint(block, policy=REMAT_POLICIES[m.remat])
    rows.append(("block (forward + backward)", m.n_layer,
                 _time_ms(_sum_grad(block), (block_params, x), repeats)))

    q = jnp.asarray(rng.normal(size=(b, t, heads, d // heads)), model.dtype)
    impl = m.attention

    def attend(q, k):
        return attention.attend(impl, q, k, k, segment_ids=segment_ids)

    rows.append(("  of which attention", m.n_layer, _time_ms(_sum_grad(attend), (q, q), repeats)))

    def head(x, wte, targets, loss_mask):
        def project(h):
            return jnp.einsum("btd,vd->btv", h, wte.astype(h.dtype))
        return projected_lm_loss(x, project, targets, loss_mask, m.vocab_size, m.loss_chunk_len)[0]

    head_grad = jax.jit(jax.grad(head, argnums=(0, 1)))
    rows.append(("vocabulary projection + loss", 1,
                 _time_ms(head_grad, (x, wte, batch["targets"], batch["loss_mask"]), repeats)))

    def update(grads, params, opt_state):
        updates, opt_state = trainer.tx.update(grads, opt_state, params)
        return grads, optax.apply_updates(params, updates), opt_state

    # On copies, updated in place (donated) as in the step; the trainer's own state stays as is.
    state = jax.tree.map(jnp.copy, (trainer.state.params, trainer.state.params, trainer.state.opt_state))
    update = jax.jit(update, donate_argnums=(1, 2))
    rows.append(("optimizer update", 1, _time_ms(update, state, repeats, carry=True)))
    del state

    rows.append(("whole train step", 1, _time_ms(trainer.step, (batch,), repeats)))
    return rows


def format_parts(rows: list[tuple[str, int, float]]) -> str:
    step_ms = rows[-1][2]
    lines = ["| part | x per step | ms each | ms per step | share of step |", "|---|---|---|---|---|"]
    counted = 0.0
    for name, count, ms in rows[:-1]:
        if not name.startswith(" "):
            counted += count * ms
        lines.append(f"| {name} | {count} | {ms:.2f} | {count * ms:.1f} | {100 * count * ms / step_ms:.0f}% |")
    other = step_ms - counted
    lines.append(f"| other (step - parts) | | | {other:.1f} | {100 * other / step_ms:.0f}% |")
    lines.append(f"| whole train step | 1 | {step_ms:.2f} | {step_ms:.1f} | 100% |")
    return "\n".join(lines)
