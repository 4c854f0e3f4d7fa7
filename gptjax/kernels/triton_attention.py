"""Document-masked flash attention with block skipping, in Pallas (Triton on GPU).

Why this exists: packed pretraining rows hold several documents, and a token must only attend
within its own document. cuDNN's fused attention does plain causal attention fast, but it cannot
take a per-token document mask, so gptjax had to fall back to XLA attention, which builds the full
[T, T] score matrix. This kernel takes `segment_ids` and, beyond masking, *skips* every
(query block, key block) tile that cannot contribute: tiles above the causal diagonal and tiles
whose query and key segment-id ranges do not overlap. With documents of average length T/8 that
is most of the causal triangle, so it does less work than causal-only cuDNN on the same rows.

Layout is gptjax's [batch, time, heads, head_dim]; k/v may have fewer (grouped) heads. Forward is
online softmax in float32 that also writes the per-row log-sum-exp; backward is FlashAttention-2
(delta = rowsum(dO * O) in XLA, one Pallas kernel over key blocks for dK/dV, one over query blocks
for dQ), wired with `jax.custom_vjp`. The [T, T] matrix is never materialised.

Masking convention: a query whose every key is masked (only possible when `segment_ids` is a
(query ids, key ids) pair, or with padding) gets output 0 and zero gradients, never NaN. Note that
`gptjax.attention.xla_attention` gives such a row the uniform average of all values instead; no
real token is ever in that situation with shared segment ids, since a token always sees itself.

On CPU (`interpret=None` there) the kernels run in Pallas interpret mode, which is how the tests
check them without a GPU. No TPU path.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

# The kernel's dropout draw: a hash of (seed, global row, key position) that XLA attention draws too.
from gptjax.dropout import attention_keep as dropout_keep
from gptjax.kernels import kernel_inputs
from gptjax.kernels.block_plan import block_plan, blocks_meet, pad_segments

# Finite, so that masked scores never make inf - inf = NaN in the online softmax.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
_LOG2E = math.log2(math.e)  # the kernels use exp2; scores are pre-multiplied by log2(e)
_SQ = getattr(pl, "squeezed", None)  # a squeezed BlockSpec dim; None on versions without it
_TritonParams = getattr(pltriton, "CompilerParams", None) or getattr(pltriton, "TritonCompilerParams")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes (powers of two, >= 16: Triton's requirement) and Triton launch parameters.

    Forward: a program holds `block_q` queries and loops over keys `block_k` at a time.
    Backward: dQ holds `block_q_bwd` queries and loops over `block_k_bwd` keys; dK/dV holds
    `block_k_bwd` keys and loops over `block_q_bwd` queries (so both share one skip plan).
    """
    block_q: int = 128
    block_k: int = 64
    block_q_bwd: int = 64
    block_k_bwd: int = 64
    num_warps: int = 4
    num_stages: int = 3
    num_warps_bwd: int = 4
    num_stages_bwd: int = 2


# Starting points, not yet tuned on a GPU (`python -m gptjax.bench attention` is how to tune
# them). Larger head dims hold more registers per row, hence more warps / fewer stages.
_DEFAULT_BLOCKS = {
    64: BlockSizes(128, 64, 64, 64, num_warps=4, num_stages=3, num_warps_bwd=4, num_stages_bwd=2),
    128: BlockSizes(128, 64, 64, 64, num_warps=8, num_stages=2, num_warps_bwd=8, num_stages_bwd=2),
    256: BlockSizes(64, 32, 32, 32, num_warps=8, num_stages=2, num_warps_bwd=8, num_stages_bwd=1),
}


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def padded_head_dim(head_dim: int) -> int:
    # Triton loads need power-of-two tiles; zero columns in q/k leave q.k unchanged.
    return max(16, _pow2(head_dim))


def default_block_sizes(head_dim: int) -> BlockSizes:
    d = padded_head_dim(head_dim)
    return _DEFAULT_BLOCKS[64] if d <= 64 else _DEFAULT_BLOCKS.get(d, _DEFAULT_BLOCKS[256])


def _fit_blocks(bs: BlockSizes, seq_len: int) -> BlockSizes:
    """Shrinks tiles for short sequences so a tiny T is not padded up to a whole 128 block."""
    cap = max(16, _pow2(seq_len))
    sizes = {f: min(getattr(bs, f), cap) for f in ("block_q", "block_k", "block_q_bwd", "block_k_bwd")}
    for f, b in sizes.items():
        if b < 16 or b & (b - 1):
            raise ValueError(f"BlockSizes.{f}={b} must be a power of two >= 16")
    return dataclasses.replace(bs, **sizes)


# ----------------------------------------------------------------------------- kernels

@dataclasses.dataclass(frozen=True)
class _Cfg:
    causal: bool
    use_segments: bool
    sm_scale: float
    seq_len: int      # real length; the arrays are padded beyond it
    padded_len: int
    group: int        # query heads per kv head
    blocks: BlockSizes
    interpret: bool
    skip: bool
    dropout: float = 0.0  # rate of attention-probability dropout
    heads: int = 1        # query heads of the whole batch, for the dropout counter


def _mask(c: _Cfg, q_pos, k_pos, q_seg, k_seg):
    """[bq, bk] bool of allowed (query, key) pairs, or None when nothing is masked."""
    mask = None
    both = lambda m, x: x if m is None else m & x
    if c.causal:
        mask = both(mask, q_pos[:, None] >= k_pos[None, :])
    elif c.padded_len != c.seq_len:
        # Causal already hides padded keys from real queries; without it, mask them explicitly.
        mask = both(mask, (k_pos < c.seq_len)[None, :])
    if c.use_segments:
        mask = both(mask, q_seg[:, None] == k_seg[None, :])
    return mask


def _scores(c: _Cfg, q, k, mask):
    """Scores in log2 units: exp2(s) == exp(sm_scale * q.k)."""
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    s = s * (c.sm_scale * _LOG2E)
    return s if mask is None else jnp.where(mask, s, MASK_VALUE)


def _tdot(a, b):
    """a.T @ b in float32 (contracting the row dim), without materialising a transpose."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dropped(c: _Cfg, drop_ref, batch_index, head, q_pos, k_pos, x):
    """x [bq, bk] with the dropped entries zeroed and the kept ones scaled by 1 / (1 - rate).

    drop_ref holds (seed, first row): the counter of this call's element (0, 0, 0) in the whole
    batch, so that a call on one device's block of rows and heads draws the whole batch's mask."""
    if not c.dropout:
        return x
    row = drop_ref[1] + (batch_index * c.heads + head) * c.seq_len + q_pos
    keep = dropout_keep(drop_ref[0], row[:, None], k_pos[None, :], c.dropout)
    return jnp.where(keep, x * (1.0 / (1.0 - c.dropout)), 0.0)


def _key_loop(c, i, lo_ref, hi_ref, qmin_ref, qmax_ref, kmin_ref, kmax_ref, n_k, body, init):
    """Runs `body(j, carry)` over the key blocks query block i needs (all of them if not skipping)."""
    if not c.skip:
        return lax.fori_loop(0, n_k, body, init)
    qmin, qmax = qmin_ref[i], qmax_ref[i]

    def maybe(j, carry):
        meet = blocks_meet(qmin, qmax, kmin_ref[j], kmax_ref[j])
        return lax.cond(meet, body, lambda _, cr: cr, j, carry)
    return lax.fori_loop(lo_ref[i], hi_ref[i], maybe, init)


def _fwd_kernel(drop_ref, lo_ref, hi_ref, qmin_ref, qmax_ref, kmin_ref, kmax_ref, qseg_ref, kseg_ref,
                q_ref, k_ref, v_ref, o_ref, lse_ref, *, c: _Cfg):
    bq, bk = c.blocks.block_q, c.blocks.block_k
    i, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    q, q_seg = q_ref[...], qseg_ref[...]
    q_pos = i * bq + jnp.arange(bq)

    def body(j, carry):
        o, m, l = carry
        ks = pl.ds(pl.multiple_of(j * bk, bk), bk)
        k, v = k_ref[ks, :], v_ref[ks, :]
        k_pos = j * bk + jnp.arange(bk)
        s = _scores(c, q, k, _mask(c, q_pos, k_pos, q_seg, kseg_ref[ks]))
        m_new = jnp.maximum(m, s.max(axis=-1))
        alpha = jnp.exp2(m - m_new)
        # While a row has seen only masked keys, m_new == MASK_VALUE and p == 1 on them; that
        # junk is multiplied by alpha == 0 as soon as a real key arrives, or dropped below.
        p = jnp.exp2(s - m_new[:, None])
        # Dropout acts on the normalised probabilities: the normaliser l sums them all.
        kept = _dropped(c, drop_ref, b, h, q_pos, k_pos, p)
        o = alpha[:, None] * o + jnp.dot(kept.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return o, m_new, alpha * l + p.sum(axis=-1)

    init = (jnp.zeros(q.shape, jnp.float32), jnp.full((bq,), MASK_VALUE, jnp.float32),
            jnp.zeros((bq,), jnp.float32))
    o, m, l = _key_loop(c, i, lo_ref, hi_ref, qmin_ref, qmax_ref, kmin_ref, kmax_ref,
                        c.padded_len // bk, body, init)
    seen = m > MASK_VALUE  # false only if every key of the row was masked (or skipped)
    o_ref[...] = jnp.where(seen[:, None], o / jnp.where(seen, l, 1.0)[:, None], 0.0).astype(o_ref.dtype)
    # +inf makes exp2(s - lse) == 0 in the backward for such rows: zero gradients, no NaN.
    lse_ref[...] = jnp.where(seen, m + jnp.log2(jnp.where(seen, l, 1.0)), jnp.inf)


def _dq_kernel(drop_ref, lo_ref, hi_ref, qmin_ref, qmax_ref, kmin_ref, kmax_ref, qseg_ref, kseg_ref,
               q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, c: _Cfg):
    bq, bk = c.blocks.block_q_bwd, c.blocks.block_k_bwd
    i, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    q, do, q_seg = q_ref[...], do_ref[...], qseg_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    q_pos = i * bq + jnp.arange(bq)

    def body(j, dq):
        ks = pl.ds(pl.multiple_of(j * bk, bk), bk)
        k, v = k_ref[ks, :], v_ref[ks, :]
        k_pos = j * bk + jnp.arange(bk)
        s = _scores(c, q, k, _mask(c, q_pos, k_pos, q_seg, kseg_ref[ks]))
        p = jnp.exp2(s - lse[:, None])
        dp = lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        # delta = rowsum(dO * O) already holds the dropout, so dS = P * (Z * dP - delta).
        ds = p * (_dropped(c, drop_ref, b, h, q_pos, k_pos, dp) - delta[:, None])
        return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    dq = _key_loop(c, i, lo_ref, hi_ref, qmin_ref, qmax_ref, kmin_ref, kmax_ref,
                   c.padded_len // bk, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * c.sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(drop_ref, klo_ref, khi_ref, qmin_ref, qmax_ref, kmin_ref, kmax_ref, qseg_ref, kseg_ref,
                q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, c: _Cfg):
    # q/do refs hold all `group` query heads that share this program's kv head, so dK/dV sum
    # over them here instead of writing per-query-head copies to be reduced afterwards.
    bq, bk = c.blocks.block_q_bwd, c.blocks.block_k_bwd
    j, b, kv_head = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    k, v, k_seg = k_ref[...], v_ref[...], kseg_ref[...]
    k_pos = j * bk + jnp.arange(bk)

    def body(i, carry):
        qs = pl.ds(pl.multiple_of(i * bq, bq), bq)
        q_pos = i * bq + jnp.arange(bq)
        mask = _mask(c, q_pos, k_pos, qseg_ref[qs], k_seg)

        def head(r, carry):
            dk, dv = carry
            q, do = q_ref[qs, r, :], do_ref[qs, r, :]
            p = jnp.exp2(_scores(c, q, k, mask) - lse_ref[r, qs][:, None])
            dp = lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
            drop = functools.partial(_dropped, c, drop_ref, b, kv_head * c.group + r, q_pos, k_pos)
            ds = p * (drop(dp) - delta_ref[r, qs][:, None])
            return dk + _tdot(ds.astype(q.dtype), q), dv + _tdot(drop(p).astype(do.dtype), do)
        return head(0, carry) if c.group == 1 else lax.fori_loop(0, c.group, head, carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    n_q = c.padded_len // bq
    if c.skip:
        kmin, kmax = kmin_ref[j], kmax_ref[j]

        def maybe(i, carry):
            meet = blocks_meet(qmin_ref[i], qmax_ref[i], kmin, kmax)
            return lax.cond(meet, body, lambda _, cr: cr, i, carry)
        dk, dv = lax.fori_loop(klo_ref[j], khi_ref[j], maybe, (zeros, zeros))
    else:
        dk, dv = lax.fori_loop(0, n_q, body, (zeros, zeros))
    dk_ref[...] = (dk * c.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------- pallas_call wiring

def _call(c: _Cfg, kernel, name, grid, in_specs, out_specs, out_shape, warps, stages, *args):
    return pl.pallas_call(
        functools.partial(kernel, c=c), grid=grid, in_specs=in_specs, out_specs=out_specs,
        out_shape=out_shape, interpret=c.interpret, name=name,
        # Explicit Triton params: they are what selects the Triton lowering (not Mosaic GPU).
        compiler_params=_TritonParams(num_warps=warps, num_stages=stages),
    )(*args)


def _row(n):
    """A per-batch-row vector [B, n] handed whole to each program (for scalar reads)."""
    return pl.BlockSpec((_SQ, n), lambda x, b, h: (b, 0))


_DROP = pl.BlockSpec((2,), lambda *_: (0,))  # (dropout seed, first row), the same for every program


def _plan_args(plan, ranges):
    return [plan[ranges[0]], plan[ranges[1]], plan["qmin"], plan["qmax"], plan["kmin"], plan["kmax"]]


def _forward(c: _Cfg, q, k, v, q_seg, kv_seg, drop):
    batch, tp, heads, d = q.shape
    bq, bk, g = c.blocks.block_q, c.blocks.block_k, c.group
    nq, nk = tp // bq, tp // bk
    plan = block_plan(q_seg, kv_seg, bq, bk, c.causal, c.seq_len, jnp)
    in_specs = [_DROP, _row(nq), _row(nq), _row(nq), _row(nq), _row(nk), _row(nk),
                pl.BlockSpec((_SQ, bq), lambda i, b, h: (b, i)),
                pl.BlockSpec((_SQ, tp), lambda i, b, h: (b, 0)),
                pl.BlockSpec((_SQ, bq, _SQ, d), lambda i, b, h: (b, i, h, 0)),
                pl.BlockSpec((_SQ, tp, _SQ, d), lambda i, b, h: (b, 0, h // g, 0)),
                pl.BlockSpec((_SQ, tp, _SQ, d), lambda i, b, h: (b, 0, h // g, 0))]
    out_specs = [pl.BlockSpec((_SQ, bq, _SQ, d), lambda i, b, h: (b, i, h, 0)),
                 pl.BlockSpec((_SQ, _SQ, bq), lambda i, b, h: (b, h, i))]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, heads, tp), jnp.float32)]
    return _call(c, _fwd_kernel, "flash_attention_fwd", (nq, batch, heads), in_specs, out_specs,
                 out_shape, c.blocks.num_warps, c.blocks.num_stages,
                 drop, *_plan_args(plan, ("lo", "hi")), q_seg, kv_seg, q, k, v)


def _backward(c: _Cfg, q, k, v, q_seg, kv_seg, drop, o, lse, do):
    batch, tp, heads, d = q.shape
    kv_heads, g = k.shape[2], c.group
    bq, bk = c.blocks.block_q_bwd, c.blocks.block_k_bwd
    nq, nk = tp // bq, tp // bk
    plan = block_plan(q_seg, kv_seg, bq, bk, c.causal, c.seq_len, jnp)
    # delta = rowsum(dO * O): one cheap fused XLA reduction, [B, H, T] like lse.
    delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
    warps, stages = c.blocks.num_warps_bwd, c.blocks.num_stages_bwd

    q_block = lambda i, b, h: (b, i, h, 0)
    dq = _call(c, _dq_kernel, "flash_attention_dq", (nq, batch, heads),
               [_DROP, _row(nq), _row(nq), _row(nq), _row(nq), _row(nk), _row(nk),
                pl.BlockSpec((_SQ, bq), lambda i, b, h: (b, i)),
                pl.BlockSpec((_SQ, tp), lambda i, b, h: (b, 0)),
                pl.BlockSpec((_SQ, bq, _SQ, d), q_block),
                pl.BlockSpec((_SQ, tp, _SQ, d), lambda i, b, h: (b, 0, h // g, 0)),
                pl.BlockSpec((_SQ, tp, _SQ, d), lambda i, b, h: (b, 0, h // g, 0)),
                pl.BlockSpec((_SQ, bq, _SQ, d), q_block),
                pl.BlockSpec((_SQ, _SQ, bq), lambda i, b, h: (b, h, i)),
                pl.BlockSpec((_SQ, _SQ, bq), lambda i, b, h: (b, h, i))],
               pl.BlockSpec((_SQ, bq, _SQ, d), q_block), jax.ShapeDtypeStruct(q.shape, q.dtype),
               warps, stages, drop, *_plan_args(plan, ("lo", "hi")), q_seg, kv_seg, q, k, v, do, lse, delta)

    kv_block = lambda j, b, h: (b, j, h, 0)
    group_rows = pl.BlockSpec((_SQ, tp, g, d), lambda j, b, h: (b, 0, h, 0))  # heads h*g .. h*g+g-1
    group_stats = pl.BlockSpec((_SQ, g, tp), lambda j, b, h: (b, h, 0))
    dk, dv = _call(c, _dkv_kernel, "flash_attention_dkv", (nk, batch, kv_heads),
                   [_DROP, _row(nk), _row(nk), _row(nq), _row(nq), _row(nk), _row(nk),
                    pl.BlockSpec((_SQ, tp), lambda j, b, h: (b, 0)),
                    pl.BlockSpec((_SQ, bk), lambda j, b, h: (b, j)),
                    group_rows, pl.BlockSpec((_SQ, bk, _SQ, d), kv_block),
                    pl.BlockSpec((_SQ, bk, _SQ, d), kv_block), group_rows, group_stats, group_stats],
                   [pl.BlockSpec((_SQ, bk, _SQ, d), kv_block)] * 2,
                   [jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2,
                   warps, stages, drop, *_plan_args(plan, ("klo", "khi")), q_seg, kv_seg, q, k, v, do, lse,
                   delta)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(c, q, k, v, q_seg, kv_seg, drop):
    return _forward(c, q, k, v, q_seg, kv_seg, drop)[0]


def _attention_fwd(c, q, k, v, q_seg, kv_seg, drop):
    o, lse = _forward(c, q, k, v, q_seg, kv_seg, drop)
    return o, (q, k, v, q_seg, kv_seg, drop, o, lse)


def _attention_bwd(c, res, do):
    dq, dk, dv = _backward(c, *res, do)
    return dq, dk, dv, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


@functools.partial(jax.jit, static_argnames=("causal", "sm_scale", "block_sizes", "interpret", "skip_blocks",
                                             "dropout_rate", "dropout_heads"))
def flash_attention(q, k, v, *, segment_ids=None, causal: bool = True, sm_scale: float | None = None,
                    block_sizes: BlockSizes | None = None, interpret: bool | None = None,
                    skip_blocks: bool = True, dropout_rate: float = 0.0, dropout_seed=None,
                    dropout_start=None, dropout_heads: int | None = None):
    """Attention over [batch, time, heads, head_dim] with optional packed-document masking.

    k, v: [batch, time, kv_heads, head_dim], kv_heads dividing heads (query head h reads kv head
    h // (heads // kv_heads)). segment_ids: int [batch, time] shared by queries and keys, or a
    (query ids, key ids) pair; a query sees only keys with its id (and, if causal, not later).
    Returns q's shape and dtype. Differentiable in q, k, v. `skip_blocks=False` computes every
    tile (masking only), for testing. `interpret=None` means interpret mode when the code is traced for a CPU
    (gptjax.targets.current()).
    dropout_rate > 0 drops attention probabilities (scaling the kept ones by 1 / (1 - rate)),
    drawn from `dropout_seed` (an int32 scalar) by `dropout_keep`. When q is one block of a larger
    batch (one device's rows and heads on a mesh), pass `dropout_start` = (batch row, head) of its
    first element in the whole batch and `dropout_heads` = the whole batch's head count: the mask
    is then this block's part of the whole batch's mask, the one XLA attention draws too.
    """
    batch, seq_len, heads, head_dim = q.shape
    kernel_inputs.check(q, k, v, dropout_rate, dropout_seed, dropout_heads)
    drop = kernel_inputs.dropout_counter(seq_len, heads, dropout_seed, dropout_start, dropout_heads)
    blocks = _fit_blocks(block_sizes or default_block_sizes(head_dim), seq_len)
    step = max(blocks.block_q, blocks.block_k, blocks.block_q_bwd, blocks.block_k_bwd)
    padded_len = -(-seq_len // step) * step
    d_pad = padded_head_dim(head_dim)
    q_seg, kv_seg = pad_segments(segment_ids, batch, seq_len, padded_len, jnp)
    pad = lambda x: jnp.pad(x, ((0, 0), (0, padded_len - seq_len), (0, 0), (0, d_pad - head_dim)))
    c = _Cfg(causal=bool(causal), use_segments=segment_ids is not None,
             sm_scale=float(sm_scale if sm_scale is not None else 1.0 / math.sqrt(head_dim)),
             seq_len=seq_len, padded_len=padded_len, group=heads // k.shape[2], blocks=blocks,
             interpret=kernel_inputs.interpret_here(interpret), skip=bool(skip_blocks), dropout=float(dropout_rate),
             heads=dropout_heads or heads)
    out = _attention(c, pad(q), pad(k), pad(v), q_seg, kv_seg, drop)
    return out[:, :seq_len, :, :head_dim]
