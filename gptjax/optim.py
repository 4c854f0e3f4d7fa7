"""AdamW with decoupled weight decay on >= 2-D weights, global-norm clipping and the lr schedules."""

from __future__ import annotations

import jax
import optax


def lr_schedule(train_cfg) -> optax.Schedule:
    """Linear warmup from 0 to train.lr, then cosine or linear decay to min_lr_ratio * lr."""
    peak, steps, warmup = train_cfg.lr, train_cfg.steps, min(train_cfg.warmup_steps, train_cfg.steps)
    end = peak * train_cfg.min_lr_ratio
    warm = optax.linear_schedule(0.0, peak, max(warmup, 1))
    decay_steps = max(steps - warmup, 1)
    if train_cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=train_cfg.min_lr_ratio)
    else:
        decay = optax.linear_schedule(peak, end, decay_steps)
    if warmup == 0:
        return decay
    return optax.join_schedules([warm, decay], [warmup])


def decay_mask(params):
    """True for the weights that decay: matrices and embeddings, never biases or LayerNorm gains
    (GPT-1's "modified L2"). Decided by name as well as rank, since the fused QKV bias is 3-D."""
    def decays(path, p):
        # The last dict key names the parameter (Flax adds a trailing `.value` attribute step).
        keys = [k.key for k in path if hasattr(k, "key")]
        name = str(keys[-1]) if keys else ""
        return p.ndim >= 2 and not name.endswith("bias") and name != "scale"
    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(train_cfg) -> optax.GradientTransformation:
    parts = []
    if train_cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(train_cfg.grad_clip))
    parts.append(optax.adamw(lr_schedule(train_cfg), b1=train_cfg.b1, b2=train_cfg.b2, eps=train_cfg.eps,
                             weight_decay=train_cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts)
