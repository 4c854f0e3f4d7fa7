"""KV-cache sampling with temperature, top-k and top-p, for batches of prompts.

Prompts of different lengths are left-padded to a common length; padded slots are hidden from
attention and positions count real tokens only, so each row decodes exactly as it would alone.
The prompt is run once (prefill), then one token per step through a jitted `lax.scan`, each
step attending over the cache instead of recomputing the whole prefix.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptjax.errors import UserError


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [B, P], valid [B, P]) with each prompt right-aligned."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    valid = np.zeros((len(prompts), width), bool)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p):] = p
        valid[i, width - len(p):] = True
    return tokens, valid


def filter_logits(logits, temperature: float, top_k: int, top_p: float):
    """Scaled logits with everything outside the top-k / nucleus set to -inf (float32)."""
    logits = logits.astype(jnp.float32) / max(temperature, 1e-6)
    if top_k > 0:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if 0.0 < top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # Keep the smallest set whose mass reaches top_p: a token stays if the mass before it is < top_p.
        keep_sorted = (cumulative - jax.nn.softmax(sorted_logits, axis=-1)) < top_p
        threshold = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


@partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k", "top_p", "vocab_size"))
def _generate(graphdef, params, tokens, valid, key, *, max_new_tokens, temperature, top_k, top_p, vocab_size):
    model = nnx.merge(graphdef, params)
    batch, width = tokens.shape
    cache = model.init_cache(batch, width + max_new_tokens)
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
    hidden, cache = model(tokens, positions, cache=cache, valid=valid)
    next_pos = positions[:, -1] + 1

    def sample(hidden_last, step_key):
        logits = model.lm_logits(hidden_last[:, None])[:, 0, :vocab_size]
        if temperature == 0.0:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return jax.random.categorical(step_key, filter_logits(logits, temperature, top_k, top_p)).astype(jnp.int32)

    def step(carry, step_key):
        hidden_last, cache, pos = carry
        token = sample(hidden_last, step_key)
        hidden, cache = model(token[:, None], pos[:, None], cache=cache, valid=jnp.ones((batch, 1), bool))
        return (hidden[:, -1], cache, pos + 1), token

    keys = jax.random.split(key, max_new_tokens)
    _, new_tokens = jax.lax.scan(step, (hidden[:, -1], cache, next_pos), keys)
    return new_tokens.T


def generate_tokens(model, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 1.0,
                    top_k: int = 0, top_p: float = 1.0, seed: int = 0, pad_id: int = 0,
                    vocab_size: int | None = None) -> np.ndarray:
    """New tokens [B, max_new_tokens] for each prompt (temperature 0 = greedy)."""
    tokens, valid = left_pad(prompts, pad_id)
    max_len = model.config.max_len
    if tokens.shape[1] + max_new_tokens > max_len:
        raise UserError(f"prompt ({tokens.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                        f"model's context of {max_len}; shorten the prompt or lower max_new_tokens")
    if not (0 <= temperature < float("inf")) or not 0.0 < top_p <= 1.0 or top_k < 0:
        raise UserError("need a finite temperature >= 0, 0 < top_p <= 1 and top_k >= 0")
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not 0 <= seed < 2**32:
        raise UserError(f"seed must be in [0, 2**32), got {seed}")
    graphdef, params = nnx.split(model, nnx.Param)
    out = _generate(graphdef, params, jnp.asarray(tokens), jnp.asarray(valid), jax.random.key(seed),
                    max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=int(top_k),
                    top_p=float(top_p), vocab_size=vocab_size or model.config.vocab_size)
    return np.asarray(out)
