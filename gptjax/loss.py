"""The language-model loss: mean next-token cross-entropy over the tokens the mask keeps."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def lm_loss(logits, targets, loss_mask, vocab_size: int):
    """Returns (sum of token losses, number of counted tokens).

    logits [B, T, V_padded] in the compute dtype; the logsumexp runs in float32 (bf16 sums over a
    50k vocabulary lose the loss's low digits). Whether XLA keeps a float32 copy of the logits is
    up to its fusion; the benchmark's peak memory shows it. Columns past
    `vocab_size` are padding rows of the embedding and never count as predictions. Returning
    the sum and the count (not the mean) lets callers weight microbatches and hosts by tokens.
    """
    logits = logits.astype(jnp.float32)
    if logits.shape[-1] > vocab_size:
        logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, logits, -jnp.inf)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    mask = loss_mask.astype(jnp.float32)
    return jnp.sum((log_z - target_logit) * mask), jnp.sum(mask)
