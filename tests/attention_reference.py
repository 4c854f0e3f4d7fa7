"""The float32 attention every kernel test compares against, and the random inputs they share."""

import jax
import jax.numpy as jnp
import numpy as np

from gptjax.dropout import attention_keep as dropout_keep


def reference(q, k, v, segment_ids=None, causal=True, dropout_rate=0.0, dropout_seed=0):
    """Float32 attention written out; a query with every key masked outputs 0 (kernel's rule).
    Dropout draws its whole [B, H, T, T] mask from the kernel's `dropout_keep` at once."""
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    _, t, heads, d = q.shape
    group = heads // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision="highest") / np.sqrt(d)
    mask = jnp.ones((1, 1, t, t), bool)
    if causal:
        mask = mask & jnp.tril(jnp.ones((t, t), bool))
    if segment_ids is not None:
        q_seg, kv_seg = segment_ids if isinstance(segment_ids, tuple) else (segment_ids, segment_ids)
        mask = mask & (q_seg[:, None, :, None] == kv_seg[:, None, None, :])
    p = jax.nn.softmax(jnp.where(mask, s, -1e30), axis=-1) * mask.any(-1, keepdims=True)
    if dropout_rate:
        b = q.shape[0]
        rows = (jnp.arange(b)[:, None, None] * heads + jnp.arange(heads)[None, :, None]) * t + jnp.arange(t)
        keep = dropout_keep(jnp.asarray(dropout_seed, jnp.int32), rows[..., None], jnp.arange(t), dropout_rate)
        p = jnp.where(keep, p / (1 - dropout_rate), 0.0)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v, precision="highest")


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def inputs(seed, batch, t, heads, kv_heads, d, dtype):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal((batch, t, h, d)), dtype)
               for h in (heads, kv_heads, kv_heads))
    ct = jnp.asarray(rng.standard_normal((batch, t, heads, d)), dtype)
    return rng, q, k, v, ct
