"""The language-model loss: next-token cross-entropy over the tokens the mask keeps.

Memory is the point of this file. The logits are [B, T, V] with V ~ 50k, the largest activation
of a GPT by far (GPT-2 small, batch 32 x 1024: 3.3 GB in bf16, 6.6 GB in float32). Two rules:

- A float32 copy of the logits never exists. The log-sum-exp reads the compute-dtype logits and
  upcasts inside the reduction (bf16 sums over 50k terms would lose the loss's low digits), and
  the backward pass is written by hand (`jax.custom_vjp`) as one elementwise expression,
  softmax - onehot, that reads the bf16 logits and writes bf16 gradients. Left to autodiff, the
  upcast's transpose and the target lookup's scatter each produce a float32 [B, T, V] array.
- `projected_lm_loss` can build the logits a few positions at a time (`model.loss_chunk_len`),
  recomputing each chunk's vocabulary projection in the backward pass, so at most one chunk of
  logits is alive: for large models on one card, where activation memory decides the batch.

Both return (sum of token losses, number of counted tokens), not the mean, so callers can weight
microbatches and hosts by tokens. `projected_target_scores` gives zero/few-shot scoring the same
per-token terms under the same chunks, so scoring a batch costs no more memory than training on it.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp


def _log_normaliser(logits, vocab_size: int):
    """log sum_v exp(logits[..., v]) in float32 over the real vocabulary: the embedding's padding
    columns (ids >= vocab_size, rows added for speed) never count as predictions."""
    x = logits.astype(jnp.float32)
    if logits.shape[-1] > vocab_size:
        x = jnp.where(jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1) < vocab_size, x, -jnp.inf)
    return jax.nn.logsumexp(x, axis=-1)


def _token_losses(logits, targets, vocab_size: int):
    """(per-token negative log-likelihood, log-normaliser), both float32 [B, T]."""
    log_z = _log_normaliser(logits, vocab_size)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0].astype(jnp.float32)
    return log_z - target_logit, log_z


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _loss_sum(logits, targets, mask, vocab_size: int):
    return jnp.sum(_token_losses(logits, targets, vocab_size)[0] * mask)


def _loss_sum_fwd(logits, targets, mask, vocab_size: int):
    nll, log_z = _token_losses(logits, targets, vocab_size)
    return jnp.sum(nll * mask), (logits, targets, mask, nll, log_z)


def _loss_sum_bwd(vocab_size: int, residuals, g):
    logits, targets, mask, nll, log_z = residuals
    columns = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    # Padding columns are zeroed after the exp rather than set to -inf before it, so this
    # expression shares only the upcast with the forward's and fuses into one elementwise pass.
    probs = jnp.exp(logits.astype(jnp.float32) - log_z[..., None])
    dlogits = jnp.where(columns < vocab_size, probs - (columns == targets[..., None]), 0.0)
    dlogits = (dlogits * (g * mask)[..., None]).astype(logits.dtype)
    return dlogits, None, g * nll


_loss_sum.defvjp(_loss_sum_fwd, _loss_sum_bwd)


def lm_loss(logits, targets, loss_mask, vocab_size: int):
    """(sum of token losses, number of counted tokens) for logits [B, T, V_padded] in the compute
    dtype, targets [B, T] int, loss_mask [B, T] (bool or float weights)."""
    mask = loss_mask.astype(jnp.float32)
    return _loss_sum(logits, targets, mask, vocab_size), jnp.sum(mask)


def _split(x, chunk_len: int):
    """[B, chunks * chunk_len, ...] -> [chunks, B, chunk_len, ...]: the scan's steps first."""
    return jnp.moveaxis(x.reshape(x.shape[0], -1, chunk_len, *x.shape[2:]), 1, 0)


def projected_lm_loss(hidden, project, targets, loss_mask, vocab_size: int, chunk_len: int = 0):
    """lm_loss(project(hidden), ...) with the logits built `chunk_len` positions at a time.

    hidden [B, T, d]; `project` maps hidden states [B, t, d] to logits [B, t, V_padded].
    chunk_len 0 (or >= T) builds them all at once. Chunks run along the sequence, not the batch,
    so each one keeps the batch's sharding. A sequence that is not a multiple of chunk_len is
    padded with uncounted positions.
    """
    t = hidden.shape[1]
    if not chunk_len or chunk_len >= t:
        return lm_loss(project(hidden), targets, loss_mask, vocab_size)
    chunks = -(-t // chunk_len)
    pad = chunks * chunk_len - t
    mask = loss_mask.astype(jnp.float32)
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets, mask = (jnp.pad(x, ((0, 0), (0, pad))) for x in (targets, mask))

    # Rematerialised, so the backward pass recomputes one chunk's logits at a time instead of
    # keeping every chunk's: the memory of one chunk for one more vocabulary matmul.
    @partial(jax.checkpoint, prevent_cse=False)
    def chunk_loss(h, tgt, m):
        return _loss_sum(project(h), tgt, m, vocab_size)

    def body(total, xs):
        return total + chunk_loss(*xs), None

    xs = tuple(_split(x, chunk_len) for x in (hidden, targets, mask))
    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)
    return total, jnp.sum(mask)


def _target_scores(logits, targets, vocab_size: int):
    """(log p(target) float32 [B, T], whether the target is the most likely token bool [B, T])."""
    nll, _ = _token_losses(logits, targets, vocab_size)
    x = logits
    if logits.shape[-1] > vocab_size:
        x = jnp.where(jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1) < vocab_size, x, -jnp.inf)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return -nll, target_logit >= jnp.max(x, axis=-1)


def projected_target_scores(hidden, project, targets, vocab_size: int, chunk_len: int = 0):
    """(log p(targets) float32 [B, T], targets that are the argmax bool [B, T]): the loss's
    per-token terms, negated, for scoring, and greedy decoding's agreement with the targets.

    The arguments are projected_lm_loss's, and so is the chunking: at most one chunk of logits,
    [B, chunk_len, V_padded] in the compute dtype, is alive at a time. No gradient flows here,
    so there is nothing to rematerialise.
    """
    t = hidden.shape[1]
    if not chunk_len or chunk_len >= t:
        return _target_scores(project(hidden), targets, vocab_size)
    chunks = -(-t // chunk_len)
    pad = chunks * chunk_len - t
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))

    def body(carry, xs):
        h, tgt = xs
        return carry, _target_scores(project(h), tgt, vocab_size)

    _, scores = jax.lax.scan(body, None, (_split(hidden, chunk_len), _split(targets, chunk_len)))
    return tuple(jnp.moveaxis(x, 0, 1).reshape(hidden.shape[0], chunks * chunk_len)[:, :t] for x in scores)
