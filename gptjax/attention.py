"""Attention dispatch: `model.attention = auto | xla | cudnn`.

Inputs are [batch, time, heads, head_dim] (the layout cuDNN wants, so no transposes). `xla` is
the reference: it takes every mask gptjax needs (causal with a query offset for the KV cache,
packed-document segment ids, key padding) and dropout on the probabilities. `cudnn` is fused
flash attention; it supports the plain causal case, which is what pretraining without document
masks and without attention dropout needs. `auto` takes cuDNN where it applies and XLA
elsewhere, so every call is correct on every machine.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gptjax.errors import UserError

# Finite, so that a row with every key masked (padding) gives a uniform softmax instead of NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def on_nvidia_gpu() -> bool:
    return jax.default_backend() == "gpu" and "nvidia" in jax.devices()[0].device_kind.lower()


def cudnn_applies(dtype, head_dim: int) -> bool:
    """Whether cuDNN flash attention can run these inputs on this machine."""
    return (on_nvidia_gpu() and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
            and head_dim % 8 == 0 and head_dim <= 128)


def resolve(implementation: str, dtype, head_dim: int, *, needs_mask: bool, needs_dropout: bool) -> str:
    """Turns `auto` into a concrete implementation and rejects one that cannot run these inputs."""
    if implementation == "xla":
        return "xla"
    if implementation == "auto":
        if cudnn_applies(dtype, head_dim) and not needs_mask and not needs_dropout:
            return "cudnn"
        return "xla"
    if implementation == "cudnn":
        if not on_nvidia_gpu():
            raise UserError(f"model.attention=cudnn needs an NVIDIA GPU, but JAX runs on "
                            f"'{jax.default_backend()}'; use model.attention=auto or xla")
        if not cudnn_applies(dtype, head_dim):
            raise UserError(f"model.attention=cudnn needs bfloat16/float16 compute and a head dim that is a "
                            f"multiple of 8 up to 128 (got {jnp.dtype(dtype).name}, {head_dim}); "
                            f"set model.dtype=bfloat16 or model.attention=auto")
        if needs_mask:
            raise UserError("model.attention=cudnn supports plain causal attention only; packed-document "
                            "masks need model.attention=auto or xla")
        if needs_dropout:
            raise UserError("model.attention=cudnn has no attention dropout; set model.attn_dropout=0 "
                            "or model.attention=xla")
        return "cudnn"
    raise UserError(f"unknown model.attention '{implementation}'; use auto, xla or cudnn")


def xla_attention(q, k, v, *, q_offset=0, segment_ids=None, kv_valid=None,
                  dropout_rate: float = 0.0, dropout_key=None):
    """Causal attention written out; the reference every other implementation is tested against.

    q: [B, Tq, H, D]; k, v: [B, Tk, H, D]. Query i sits at absolute slot `q_offset + i` and sees
    keys at slots <= its own; `segment_ids` ([B, Tq] = [B, Tk]) confine it to its own document;
    `kv_valid` ([B, Tk]) hides padded keys.
    """
    head_dim = q.shape[-1]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / head_dim ** 0.5)
    q_pos = q_offset + jnp.arange(q.shape[1])
    k_pos = jnp.arange(k.shape[1])
    mask = (q_pos[:, None] >= k_pos[None, :])[None, None]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    if kv_valid is not None:
        mask = mask & kv_valid[:, None, None, :]
    scores = jnp.where(mask, scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)
    if dropout_rate > 0.0 and dropout_key is not None:
        keep = jax.random.bernoulli(dropout_key, 1.0 - dropout_rate, probs.shape)
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)


def cudnn_attention(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


def attend(implementation: str, q, k, v, *, q_offset=0, segment_ids=None, kv_valid=None,
           dropout_rate: float = 0.0, dropout_key=None):
    """Causal self-attention through the chosen implementation (see `resolve`)."""
    needs_mask = segment_ids is not None or kv_valid is not None or not isinstance(q_offset, int) or q_offset != 0
    needs_dropout = dropout_rate > 0.0 and dropout_key is not None
    impl = resolve(implementation, q.dtype, q.shape[-1], needs_mask=needs_mask, needs_dropout=needs_dropout)
    if impl == "cudnn":
        return cudnn_attention(q, k, v)
    return xla_attention(q, k, v, q_offset=q_offset, segment_ids=segment_ids, kv_valid=kv_valid,
                         dropout_rate=dropout_rate, dropout_key=dropout_key)
