"""AdamW with decoupled weight decay on >= 2-D weights, global-norm clipping and the lr schedules."""

from __future__ import annotations

import dataclasses

import jax
import optax


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The learning rate of a run: linear warmup from 0 to `peak` over `warmup_steps`, then
    `kind` (cosine or linear) decay to min_lr_ratio * peak at step `steps`."""

    peak: float
    steps: int
    warmup_steps: int
    kind: str = "cosine"
    min_lr_ratio: float = 0.0

    @classmethod
    def of_train(cls, t) -> "Schedule":
        """Pretraining's, from train section `t` (train.lr, steps, warmup_steps, schedule, min_lr_ratio)."""
        return cls(t.lr, t.steps, t.warmup_steps, t.schedule, t.min_lr_ratio)


def lr_schedule(s: Schedule) -> optax.Schedule:
    peak, steps, warmup = s.peak, s.steps, min(s.warmup_steps, s.steps)
    end = peak * s.min_lr_ratio
    warm = optax.linear_schedule(0.0, peak, max(warmup, 1))
    decay_steps = max(steps - warmup, 1)
    if s.kind == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=s.min_lr_ratio)
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


def make_optimizer(t, schedule: optax.Schedule) -> optax.GradientTransformation:
    """AdamW under `schedule`, with train section `t`'s b1, b2, eps, weight_decay and grad_clip."""
    parts = []
    if t.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(t.grad_clip))
    parts.append(optax.adamw(schedule, b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay, mask=decay_mask))
    return optax.chain(*parts)
