"""Document-masked flash attention with tile skipping and attention dropout, on Mosaic GPU.

The same attention as `triton_attention.py` (see there for why the kernel exists): causal, with
packed-document segment ids, skipping the tiles that the causal diagonal or the documents rule
out (`block_plan.py`, one plan for both kernels), dropout on the probabilities from the global
(row, head, query, key) hash of `gptjax.dropout`, grouped-query heads, any sequence length.
Written for Mosaic GPU, Pallas's backend for Hopper (wgmma on shared-memory tiles that TMA
copies in), which JAX maintains; its Triton backend is deprecated from JAX 0.11.

One warpgroup per program. Forward: a program holds `block_q` queries of one head, copies key
and value tiles in two slots (the next tile is in flight while the current one is computed) and
keeps an online softmax in float32, writing the output and the per-row log-sum-exp.
Backward (FlashAttention-2): delta = rowsum(dO * O) in XLA, then one kernel over query blocks
for dQ and one over key blocks for dK and dV, which walks the query blocks of every query head
that shares the key head, so grouped heads are summed in the kernel. Tiles are multiples of 64
(a wgmma is 64 rows); head dims are padded up to a multiple of 64 with zero columns, which
leave q.k unchanged. A query that sees no key gets output 0 and zero gradients, as in the
Triton kernel.

On a CPU the kernels run in Mosaic GPU's interpret mode (`interpret=True`), which is how the
tests check them. JAX 0.10's interpreter lacks three of the operations used here (layout-typed
loads and casts, and wgmma on a transposed tile); under that interpreter only, those become
the plain array operations with the same values, so that the tiles, copies, barriers, loops,
masks and dropout are still run as written. The program compiled for a GPU is the same on
every JAX version (`tests/test_mosaic_attention.py` compiles it for an H100 and an H200).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from gptjax.dropout import attention_keep
from gptjax.kernels import kernel_inputs
from gptjax.kernels.block_plan import block_plan, pad_segments

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: no inf - inf in the softmax
_LOG2E = math.log2(math.e)
HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
MAX_HEAD_DIM = 256
# A TMA copy moves a multiple of 128 threads x 4 bytes on JAX 0.10: plan rows are padded to it.
_PLAN_WIDTH = 32
# Rows of the per-batch-row plan a program reads: its loop range, the blocks' id ranges, dropout.
_LO, _HI, _QMIN, _QMAX, _KMIN, _KMAX, _DROP = range(7)

try:  # public from JAX 0.11
    _InterpretParams = plgpu.InterpretGPUParams
    _FULL_INTERPRETER = True
except AttributeError:
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as _InterpretParams
    _FULL_INTERPRETER = False

_LOAD_INDEX = inspect.signature(plgpu.load).parameters.get("idx")
if _LOAD_INDEX is not None and _LOAD_INDEX.default is inspect.Parameter.empty:  # JAX 0.10: load(ref, idx, ...)
    _load = lambda ref, layout: plgpu.load(ref, (), layout=layout)
else:
    _load = lambda ref, layout: plgpu.load(ref, layout=layout)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles (multiples of 64). Forward: `block_q` queries per program, `block_k` keys per step.
    Backward: dQ holds `block_q_bwd` queries and steps over `block_k_bwd` keys; dK/dV holds
    `block_k_bwd` keys and steps over `block_q_bwd` queries (one skip plan for both)."""
    block_q: int = 64
    block_k: int = 64
    block_q_bwd: int = 64
    block_k_bwd: int = 64

    def check(self) -> None:
        for f in dataclasses.fields(self):
            b = getattr(self, f.name)
            if b < 64 or b % 64:
                raise ValueError(f"BlockSizes.{f.name}={b} must be a multiple of 64 (a wgmma tile)")


def padded_head_dim(head_dim: int) -> int:
    return -(-head_dim // 64) * 64


@dataclasses.dataclass(frozen=True)
class _Cfg:
    causal: bool
    use_segments: bool
    sm_scale: float
    seq_len: int      # real length; the arrays are padded beyond it
    padded_len: int
    head_dim: int     # padded
    group: int        # query heads per kv head
    blocks: BlockSizes
    interpret: bool
    skip: bool
    dropout: float
    heads: int        # query heads of the whole batch, for the dropout counter
    dtype: jnp.dtype

    @property
    def plain(self) -> bool:
        """Under JAX 0.10's interpreter: layouts and transposed wgmma tiles as plain arrays."""
        return self.interpret and not _FULL_INTERPRETER


# ----------------------------------------------------------------------------- in-kernel helpers

def _wgmma_layout(c: _Cfg, x, reduce: int | None = None):
    if c.plain:
        return x
    layout = plgpu.Layout.WGMMA if reduce is None else plgpu.Layout.WGMMA.reduce(reduce)
    return plgpu.layout_cast(x, layout)


def _vector(c: _Cfg, ref, reduce: int):
    """A [n] tile as a row (reduce=1: one value per accumulator row) or column (reduce=0) vector."""
    return ref[...] if c.plain else _load(ref, plgpu.Layout.WGMMA.reduce(reduce))


def _iota(c: _Cfg, shape, dim):
    if c.plain:
        return lax.broadcasted_iota(jnp.int32, shape, dim)
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


def _transposed(ref):
    return ref.transpose((1, 0))


def _dot_nt(c: _Cfg, a_ref, b_ref):
    """a @ b.T in float32 for [m, d] and [n, d] shared-memory tiles."""
    m, n = a_ref.shape[0], b_ref.shape[0]
    if c.plain:
        return lax.dot_general(a_ref[...], b_ref[...], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)

    def product(acc):
        plgpu.wgmma(acc, a_ref, _transposed(b_ref))
        return acc[...]
    return pl.run_scoped(product, plgpu.ACC((m, n), jnp.float32))


def _dot_add(c: _Cfg, acc, a, b_ref):
    """acc + a @ b for a [m, k] array in registers and a [k, n] shared-memory tile."""
    if c.interpret:  # the interpreter takes wgmma operands from shared memory only
        return acc + jnp.dot(a, b_ref[...], preferred_element_type=jnp.float32)

    def product(acc_ref):
        plgpu.wgmma(acc_ref, a, b_ref)
    return pl.run_state(product)(plgpu.ACC.init(acc))


def _mask(c: _Cfg, q_pos, k_pos, q_seg, k_seg):
    """Allowed (query, key) pairs over one tile, or None; all arguments are of the tile's shape."""
    mask = None
    both = lambda m, x: x if m is None else m & x
    if c.causal:
        mask = both(mask, q_pos >= k_pos)
    elif c.padded_len != c.seq_len:  # causal alone hides padded keys from real queries
        mask = both(mask, k_pos < c.seq_len)
    if c.use_segments:
        mask = both(mask, q_seg == k_seg)
    return mask


def _masked(s, mask):
    return s if mask is None else jnp.where(mask, s, MASK_VALUE)


def _dropped(c: _Cfg, plan_ref, batch_index, head, q_pos, k_pos, x):
    """x with the dropped probabilities zeroed and the kept ones scaled by 1 / (1 - rate). The
    counter of (batch row, head, query) is the whole batch's (see triton_attention._dropped)."""
    if not c.dropout:
        return x
    seed, first_row = plan_ref[_DROP, 0], plan_ref[_DROP, 1]
    row = first_row + (batch_index * c.heads + head) * c.seq_len + q_pos
    keep = attention_keep(seed, row, k_pos, c.dropout)
    return jnp.where(keep, x * (1.0 / (1.0 - c.dropout)), 0.0)


def _meet(plan_ref, i, j):
    """Whether query block i and key block j share a segment id (the in-loop half of the skip)."""
    return (plan_ref[_QMIN, i] <= plan_ref[_KMAX, j]) & (plan_ref[_KMIN, j] <= plan_ref[_QMAX, i])


def _key_tiles(b, kv_head, bk, k_ref, v_ref, kseg_ref, k_smem, v_smem, kseg_smem, bars):
    """(fetch, wait) for the two slots of key, value and key-id tiles that the forward and dQ
    kernels step over: fetch(j, slot) starts copying key block j, wait(slot) waits for it."""
    def fetch(j, slot):
        rows = pl.ds(j * bk, bk)
        plgpu.copy_gmem_to_smem(k_ref.at[b, rows, kv_head], k_smem.at[slot], bars.at[0, slot])
        plgpu.copy_gmem_to_smem(v_ref.at[b, rows, kv_head], v_smem.at[slot], bars.at[1, slot])
        plgpu.copy_gmem_to_smem(kseg_ref.at[b, rows], kseg_smem.at[slot], bars.at[2, slot])

    def wait(slot):
        for n in range(3):
            plgpu.barrier_wait(bars.at[n, slot])
    return fetch, wait


def _two_slot_loop(first, last, fetch, wait, compute, carry):
    """compute(n, slot, carry) for n in [first, last), the inputs of step n + 1 fetched into the
    other slot while step n computes. `wait(slot)` waits for a slot's copies."""
    @pl.when(first < last)
    def _():
        fetch(first, 0)

    def body(n, carry):
        slot = lax.rem(n - first, 2)

        @pl.when(n + 1 < last)
        def _():
            fetch(n + 1, 1 - slot)
        wait(slot)
        return compute(n, slot, carry)
    return lax.fori_loop(first, last, body, carry)


# ----------------------------------------------------------------------------- kernels

def _fwd_kernel(plan_ref, qseg_ref, kseg_ref, q_ref, k_ref, v_ref, o_ref, lse_ref,
                plan_smem, q_smem, qseg_smem, k_smem, v_smem, kseg_smem, lse_smem, bars, kv_bars, *, c: _Cfg):
    bq, bk = c.blocks.block_q, c.blocks.block_k
    i, b, h = lax.axis_index("q"), lax.axis_index("batch"), lax.axis_index("heads")
    kv_head = lax.div(h, jnp.int32(c.group))
    q_rows = pl.ds(i * bq, bq)
    plgpu.copy_gmem_to_smem(plan_ref.at[b], plan_smem, bars.at[0])
    plgpu.copy_gmem_to_smem(q_ref.at[b, q_rows, h], q_smem, bars.at[1])
    plgpu.copy_gmem_to_smem(qseg_ref.at[b, q_rows], qseg_smem, bars.at[2])
    for n in range(3):
        plgpu.barrier_wait(bars.at[n])
    first, last = ((plan_smem[_LO, i], plan_smem[_HI, i]) if c.skip else (0, c.padded_len // bk))
    shape = (bq, bk)
    q_pos = i * bq + _iota(c, shape, 0)
    q_seg = lax.broadcast_in_dim(_vector(c, qseg_smem, 1), shape, [0])

    fetch, wait = _key_tiles(b, kv_head, bk, k_ref, v_ref, kseg_ref, k_smem, v_smem, kseg_smem, kv_bars)

    def tile(j, slot, carry):
        o, m, l = carry
        k_pos = j * bk + _iota(c, shape, 1)
        k_seg = lax.broadcast_in_dim(_vector(c, kseg_smem.at[slot], 0), shape, [1])
        s = _masked(_dot_nt(c, q_smem, k_smem.at[slot]) * (c.sm_scale * _LOG2E),
                    _mask(c, q_pos, k_pos, q_seg, k_seg))
        m_new = jnp.maximum(m, s.max(axis=1))
        alpha = jnp.exp2(m - m_new)
        # While a row has seen only masked keys, m_new == MASK_VALUE and p == 1 on them; that
        # junk is multiplied by alpha == 0 as soon as a real key arrives, or dropped below.
        p = jnp.exp2(s - lax.broadcast_in_dim(m_new, shape, [0]))
        kept = _dropped(c, plan_smem, b, h, q_pos, k_pos, p)  # dropout after normalising: l sums all
        o = _dot_add(c, o * lax.broadcast_in_dim(alpha, o.shape, [0]), kept.astype(c.dtype), v_smem.at[slot])
        return o, m_new, alpha * l + p.sum(axis=1)

    def step(j, slot, carry):
        if not (c.skip and c.use_segments):  # without documents the loop range is exact
            return tile(j, slot, carry)
        meet = _meet(plan_smem, i, j)
        return lax.cond(meet, functools.partial(tile, j, slot), lambda carry: carry, carry)

    init = (_wgmma_layout(c, jnp.zeros((bq, c.head_dim), jnp.float32)),
            _wgmma_layout(c, jnp.full((bq,), MASK_VALUE, jnp.float32), 1),
            _wgmma_layout(c, jnp.zeros((bq,), jnp.float32), 1))
    o, m, l = _two_slot_loop(first, last, fetch, wait, step, init)
    seen = m > MASK_VALUE  # false only if every key of the row was masked (or skipped)
    safe_l = jnp.where(seen, l, 1.0)
    o = jnp.where(lax.broadcast_in_dim(seen, o.shape, [0]), o / lax.broadcast_in_dim(safe_l, o.shape, [0]), 0.0)
    q_smem[...] = o.astype(c.dtype)  # q is no longer needed: its tile carries the output out
    # +inf makes exp2(s - lse) == 0 in the backward for such rows: zero gradients, no NaN.
    lse_smem[...] = jnp.where(seen, m + jnp.log2(safe_l), jnp.inf)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_smem, o_ref.at[b, q_rows, h])
    plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, h, q_rows])
    plgpu.wait_smem_to_gmem(0)


def _dq_kernel(plan_ref, qseg_ref, kseg_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref,
               plan_smem, q_smem, do_smem, qseg_smem, lse_smem, delta_smem, k_smem, v_smem, kseg_smem,
               bars, kv_bars, *, c: _Cfg):
    bq, bk = c.blocks.block_q_bwd, c.blocks.block_k_bwd
    i, b, h = lax.axis_index("q"), lax.axis_index("batch"), lax.axis_index("heads")
    kv_head = lax.div(h, jnp.int32(c.group))
    q_rows = pl.ds(i * bq, bq)
    copies = ((plan_ref.at[b], plan_smem), (q_ref.at[b, q_rows, h], q_smem), (do_ref.at[b, q_rows, h], do_smem),
              (qseg_ref.at[b, q_rows], qseg_smem), (lse_ref.at[b, h, q_rows], lse_smem),
              (delta_ref.at[b, h, q_rows], delta_smem))
    for n, (src, dst) in enumerate(copies):
        plgpu.copy_gmem_to_smem(src, dst, bars.at[n])
    for n in range(len(copies)):
        plgpu.barrier_wait(bars.at[n])
    first, last = ((plan_smem[_LO, i], plan_smem[_HI, i]) if c.skip else (0, c.padded_len // bk))
    shape = (bq, bk)
    q_pos = i * bq + _iota(c, shape, 0)
    q_seg = lax.broadcast_in_dim(_vector(c, qseg_smem, 1), shape, [0])
    lse = lax.broadcast_in_dim(_vector(c, lse_smem, 1), shape, [0])
    delta = lax.broadcast_in_dim(_vector(c, delta_smem, 1), shape, [0])

    fetch, wait = _key_tiles(b, kv_head, bk, k_ref, v_ref, kseg_ref, k_smem, v_smem, kseg_smem, kv_bars)

    def tile(j, slot, dq):
        k_pos = j * bk + _iota(c, shape, 1)
        k_seg = lax.broadcast_in_dim(_vector(c, kseg_smem.at[slot], 0), shape, [1])
        s = _masked(_dot_nt(c, q_smem, k_smem.at[slot]) * (c.sm_scale * _LOG2E),
                    _mask(c, q_pos, k_pos, q_seg, k_seg))
        p = jnp.exp2(s - lse)
        dp = _dot_nt(c, do_smem, v_smem.at[slot])
        # delta = rowsum(dO * O) already holds the dropout, so dS = P * (Z * dP - delta).
        ds = p * (_dropped(c, plan_smem, b, h, q_pos, k_pos, dp) - delta)
        return _dot_add(c, dq, ds.astype(c.dtype), k_smem.at[slot])

    def step(j, slot, dq):
        if not (c.skip and c.use_segments):  # without documents the loop range is exact
            return tile(j, slot, dq)
        meet = _meet(plan_smem, i, j)
        return lax.cond(meet, functools.partial(tile, j, slot), lambda dq: dq, dq)

    dq = _two_slot_loop(first, last, fetch, wait, step, _wgmma_layout(c, jnp.zeros((bq, c.head_dim), jnp.float32)))
    q_smem[...] = (dq * c.sm_scale).astype(c.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[b, q_rows, h])
    plgpu.wait_smem_to_gmem(0)


def _dkv_kernel(plan_ref, qseg_ref, kseg_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
                plan_smem, k_smem, v_smem, kseg_smem, q_smem, do_smem, qseg_smem, lse_smem, delta_smem,
                bars, q_bars, *, c: _Cfg):
    # Tiles are transposed here: rows are this program's keys, columns a block of queries.
    bq, bk, g = c.blocks.block_q_bwd, c.blocks.block_k_bwd, c.group
    j, b, kv_head = lax.axis_index("k"), lax.axis_index("batch"), lax.axis_index("heads")
    k_rows = pl.ds(j * bk, bk)
    copies = ((plan_ref.at[b], plan_smem), (k_ref.at[b, k_rows, kv_head], k_smem),
              (v_ref.at[b, k_rows, kv_head], v_smem), (kseg_ref.at[b, k_rows], kseg_smem))
    for n, (src, dst) in enumerate(copies):
        plgpu.copy_gmem_to_smem(src, dst, bars.at[n])
    for n in range(len(copies)):
        plgpu.barrier_wait(bars.at[n])
    n_q = c.padded_len // bq
    first_block, last_block = ((plan_smem[_LO, j], plan_smem[_HI, j]) if c.skip else (0, n_q))
    shape = (bk, bq)
    k_pos = j * bk + _iota(c, shape, 0)
    k_seg = lax.broadcast_in_dim(_vector(c, kseg_smem, 1), shape, [0])

    # Step n visits query block n // g of query head kv_head * g + n % g.
    def fetch(n, slot):
        i, head = lax.div(n, jnp.int32(g)), kv_head * g + lax.rem(n, jnp.int32(g))
        rows = pl.ds(i * bq, bq)
        for m, (src, dst) in enumerate(((q_ref.at[b, rows, head], q_smem), (do_ref.at[b, rows, head], do_smem),
                                        (qseg_ref.at[b, rows], qseg_smem), (lse_ref.at[b, head, rows], lse_smem),
                                        (delta_ref.at[b, head, rows], delta_smem))):
            plgpu.copy_gmem_to_smem(src, dst.at[slot], q_bars.at[m, slot])

    def wait(slot):
        for m in range(5):
            plgpu.barrier_wait(q_bars.at[m, slot])

    def tile(n, slot, carry):
        dk, dv = carry
        i, head = lax.div(n, jnp.int32(g)), kv_head * g + lax.rem(n, jnp.int32(g))
        q_pos = i * bq + _iota(c, shape, 1)
        q_seg = lax.broadcast_in_dim(_vector(c, qseg_smem.at[slot], 0), shape, [1])
        s = _masked(_dot_nt(c, k_smem, q_smem.at[slot]) * (c.sm_scale * _LOG2E),
                    _mask(c, q_pos, k_pos, q_seg, k_seg))
        p = jnp.exp2(s - lax.broadcast_in_dim(_vector(c, lse_smem.at[slot], 0), shape, [1]))
        dp = _dot_nt(c, v_smem, do_smem.at[slot])
        drop = functools.partial(_dropped, c, plan_smem, b, head, q_pos, k_pos)
        ds = p * (drop(dp) - lax.broadcast_in_dim(_vector(c, delta_smem.at[slot], 0), shape, [1]))
        dv = _dot_add(c, dv, drop(p).astype(c.dtype), do_smem.at[slot])
        dk = _dot_add(c, dk, ds.astype(c.dtype), q_smem.at[slot])
        return dk, dv

    def step(n, slot, carry):
        if not (c.skip and c.use_segments):  # without documents the loop range is exact
            return tile(n, slot, carry)
        i = lax.div(n, jnp.int32(g))
        meet = _meet(plan_smem, i, j)
        return lax.cond(meet, functools.partial(tile, n, slot), lambda carry: carry, carry)

    zeros = _wgmma_layout(c, jnp.zeros((bk, c.head_dim), jnp.float32))
    dk, dv = _two_slot_loop(first_block * g, last_block * g, fetch, wait, step, (zeros, zeros))
    k_smem[...] = (dk * c.sm_scale).astype(c.dtype)
    v_smem[...] = dv.astype(c.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[b, k_rows, kv_head])
    plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[b, k_rows, kv_head])
    plgpu.wait_smem_to_gmem(0)


# ----------------------------------------------------------------------------- wiring

def _tile(c: _Cfg, shape):
    """A shared-memory tile of q/k/v rows, laid out as wgmma reads it (128-byte swizzle)."""
    swizzle = 128
    return plgpu.SMEM(shape, c.dtype, transforms=(plgpu.TilingTransform((8, swizzle // c.dtype.itemsize)),
                                                  plgpu.SwizzleTransform(swizzle)))


def _call(c: _Cfg, kernel, name, grid, grid_names, out_type, scratch, *args):
    return plgpu.kernel(
        functools.partial(kernel, c=c), out_type=out_type, scratch_types=scratch, grid=grid,
        grid_names=grid_names, compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=_InterpretParams() if c.interpret else None, kernel_name=name)(*args)


def _plan(c: _Cfg, q_seg, kv_seg, drop, block_q, block_k, by_key: bool):
    """int32 [B, 7, width]: per batch row the loop ranges (per query block, or per key block if
    `by_key`), the blocks' id ranges and (seed, first dropout row), one copy per program."""
    p = block_plan(q_seg, kv_seg, block_q, block_k, c.causal, c.seq_len, jnp)
    batch = q_seg.shape[0]
    rows = [p["klo"], p["khi"]] if by_key else [p["lo"], p["hi"]]
    rows += [p["qmin"], p["qmax"], p["kmin"], p["kmax"], jnp.broadcast_to(drop, (batch, 2))]
    width = -(-max(r.shape[1] for r in rows) // _PLAN_WIDTH) * _PLAN_WIDTH
    return jnp.stack([jnp.pad(r, ((0, 0), (0, width - r.shape[1]))) for r in rows], axis=1)


def _forward(c: _Cfg, q, k, v, q_seg, kv_seg, drop):
    batch, tp, heads, d = q.shape
    bq, bk = c.blocks.block_q, c.blocks.block_k
    plan = _plan(c, q_seg, kv_seg, drop, bq, bk, by_key=False)
    scratch = [plgpu.SMEM(plan.shape[1:], jnp.int32), _tile(c, (bq, d)), plgpu.SMEM((bq,), jnp.int32),
               _tile(c, (2, bk, d)), _tile(c, (2, bk, d)), plgpu.SMEM((2, bk), jnp.int32),
               plgpu.SMEM((bq,), jnp.float32), plgpu.Barrier(num_barriers=3), plgpu.Barrier(num_barriers=6)]
    out_type = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((batch, heads, tp), jnp.float32)]
    return _call(c, _fwd_kernel_2d, "mosaic_attention_fwd", (tp // bq, batch, heads), ("q", "batch", "heads"),
                 out_type, scratch, plan, q_seg, kv_seg, q, k, v)


def _backward(c: _Cfg, q, k, v, q_seg, kv_seg, drop, o, lse, do):
    batch, tp, heads, d = q.shape
    kv_heads = k.shape[2]
    bq, bk = c.blocks.block_q_bwd, c.blocks.block_k_bwd
    # delta = rowsum(dO * O): one fused XLA reduction, [B, H, T] like lse.
    delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
    plan = _plan(c, q_seg, kv_seg, drop, bq, bk, by_key=False)
    scratch = [plgpu.SMEM(plan.shape[1:], jnp.int32), _tile(c, (bq, d)), _tile(c, (bq, d)),
               plgpu.SMEM((bq,), jnp.int32), plgpu.SMEM((bq,), jnp.float32), plgpu.SMEM((bq,), jnp.float32),
               _tile(c, (2, bk, d)), _tile(c, (2, bk, d)), plgpu.SMEM((2, bk), jnp.int32),
               plgpu.Barrier(num_barriers=6), plgpu.Barrier(num_barriers=6)]
    dq = _call(c, _dq_kernel_2d, "mosaic_attention_dq", (tp // bq, batch, heads), ("q", "batch", "heads"),
               jax.ShapeDtypeStruct(q.shape, q.dtype), scratch, plan, q_seg, kv_seg, q, k, v, do, lse, delta)
    plan = _plan(c, q_seg, kv_seg, drop, bq, bk, by_key=True)
    scratch = [plgpu.SMEM(plan.shape[1:], jnp.int32), _tile(c, (bk, d)), _tile(c, (bk, d)),
               plgpu.SMEM((bk,), jnp.int32), _tile(c, (2, bq, d)), _tile(c, (2, bq, d)),
               plgpu.SMEM((2, bq), jnp.int32), plgpu.SMEM((2, bq), jnp.float32), plgpu.SMEM((2, bq), jnp.float32),
               plgpu.Barrier(num_barriers=4), plgpu.Barrier(num_barriers=10)]
    dk, dv = _call(c, _dkv_kernel_2d, "mosaic_attention_dkv", (tp // bk, batch, kv_heads), ("k", "batch", "heads"),
                   [jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2, scratch, plan, q_seg, kv_seg, q, k, v, do, lse,
                   delta)
    return dq, dk, dv


def _two_dim_barriers(kernel, n_rows):
    """The kernels index their double-buffer barriers as [kind, slot]; Mosaic allocates them flat."""
    def wrapped(*refs, c):
        *rest, bars = refs
        return kernel(*rest, _Rows(bars, n_rows), c=c)
    return wrapped


class _Rows:
    """bars.at[kind, slot] over a flat group of 2 * kinds barriers."""

    def __init__(self, bars, kinds):
        self.bars, self.kinds = bars, kinds

    @property
    def at(self):
        return self

    def __getitem__(self, index):
        kind, slot = index
        return self.bars.at[kind * 2 + slot]


_fwd_kernel_2d = _two_dim_barriers(_fwd_kernel, 3)
_dq_kernel_2d = _two_dim_barriers(_dq_kernel, 3)
_dkv_kernel_2d = _two_dim_barriers(_dkv_kernel, 5)


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
    """Attention over [batch, time, heads, head_dim] in bfloat16 or float16; the arguments and
    their meaning are `triton_attention.flash_attention`'s. `interpret=None` means interpret
    mode when the code is traced for a CPU (gptjax.targets.current())."""
    batch, seq_len, heads, head_dim = q.shape
    kernel_inputs.check(q, k, v, dropout_rate, dropout_seed, dropout_heads)
    if jnp.dtype(q.dtype) not in HALF:
        raise ValueError(f"q, k, v must all be bfloat16 or all float16 (wgmma's inputs), got {q.dtype}")
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head dims up to {MAX_HEAD_DIM}, got {head_dim}")
    drop = kernel_inputs.dropout_counter(seq_len, heads, dropout_seed, dropout_start, dropout_heads)
    blocks = block_sizes or BlockSizes()
    blocks.check()
    step = max(blocks.block_q, blocks.block_k, blocks.block_q_bwd, blocks.block_k_bwd)
    padded_len = -(-seq_len // step) * step
    d_pad = padded_head_dim(head_dim)
    q_seg, kv_seg = pad_segments(segment_ids, batch, seq_len, padded_len, jnp)
    pad = lambda x: jnp.pad(x, ((0, 0), (0, padded_len - seq_len), (0, 0), (0, d_pad - head_dim)))
    c = _Cfg(causal=bool(causal), use_segments=segment_ids is not None,
             sm_scale=float(sm_scale if sm_scale is not None else 1.0 / math.sqrt(head_dim)),
             seq_len=seq_len, padded_len=padded_len, head_dim=d_pad, group=heads // k.shape[2], blocks=blocks,
             interpret=kernel_inputs.interpret_here(interpret), skip=bool(skip_blocks), dropout=float(dropout_rate),
             heads=dropout_heads or heads,
             dtype=jnp.dtype(q.dtype))
    out = _attention(c, pad(q), pad(k), pad(v), q_seg, kv_seg, drop)
    return out[:, :seq_len, :, :head_dim]
