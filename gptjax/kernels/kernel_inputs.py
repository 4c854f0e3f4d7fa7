"""What both builds of the attention kernel (Mosaic GPU, Triton) ask of their inputs, and the
dropout counter they start from: one check, one numbering, whichever build runs."""

from __future__ import annotations

import jax.numpy as jnp


def check(q, k, v, dropout_rate: float, dropout_seed, dropout_heads) -> None:
    """Refuses shapes, rates and dropout arguments that no build takes (a ValueError)."""
    batch, seq_len, heads, head_dim = q.shape
    if k.shape != v.shape or k.shape[:2] != (batch, seq_len) or k.shape[3] != head_dim:
        raise ValueError(f"k/v must be [batch, time, kv_heads, {head_dim}] like q {q.shape}: "
                         f"got {k.shape}, {v.shape}")
    if heads % k.shape[2]:
        raise ValueError(f"kv heads ({k.shape[2]}) must divide query heads ({heads})")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
    if dropout_rate and dropout_seed is None:
        raise ValueError("dropout_rate > 0 needs a dropout_seed")
    if dropout_heads is not None and dropout_heads < heads:
        raise ValueError(f"dropout_heads ({dropout_heads}) counts the whole batch's heads, at least q's {heads}")


def dropout_counter(seq_len: int, heads: int, dropout_seed, dropout_start, dropout_heads):
    """int32 [2]: the seed, and the dropout row of this call's element (0, 0, 0) in the whole
    batch, (start row * all heads + start head) * T, which the kernels count their rows from."""
    all_heads = dropout_heads or heads
    start = jnp.asarray((0, 0) if dropout_start is None else dropout_start, jnp.int32)
    # int32 wraps like the uint32 counter it becomes (and like XLA attention's rows) past 2**31.
    first_row = (start[0] * all_heads + start[1]) * seq_len
    return jnp.stack([jnp.asarray(0 if dropout_seed is None else dropout_seed, jnp.int32), first_row])


def interpret_here(interpret: bool | None) -> bool:
    """`interpret=None`: interpret mode when the code is traced for a CPU (gptjax.targets)."""
    if interpret is None:
        from gptjax import targets
        return targets.current().name == "cpu"
    return bool(interpret)
