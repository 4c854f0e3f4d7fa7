"""The Triton build of the flash-attention kernel against a float32 reference (CPU, interpret
mode), and the tile plan both builds share.

Small shapes with small blocks so every case has several query and key blocks; the CUDA tests
compile the kernel for an H100 without a GPU.
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from gptjax.kernels.block_plan import visited_blocks
from gptjax.kernels.triton_attention import BlockSizes, dropout_keep, flash_attention
from attention_reference import inputs, reference, rel
from segments import packed_segment_ids as sorted_segments

SMALL = BlockSizes(block_q=32, block_k=16, block_q_bwd=16, block_k_bwd=32)


def run_both(q, k, v, ct, segment_ids, causal, dropout=(0.0, 0), **kw):
    """(output, dq, dk, dv) of the kernel and of the reference (on the same, possibly rounded, inputs)."""
    rate, seed = dropout
    kernel = jax.jit(lambda q, k, v: jax.vjp(lambda *a: flash_attention(
        *a, segment_ids=segment_ids, causal=causal, dropout_rate=rate, dropout_seed=seed, **kw), q, k, v))
    out, vjp = kernel(q, k, v)
    got = (out, *vjp(ct))
    q32, k32, v32, ct32 = (x.astype(jnp.float32) for x in (q, k, v, ct))
    out, vjp = jax.vjp(lambda *a: reference(*a, segment_ids=segment_ids, causal=causal, dropout_rate=rate,
                                            dropout_seed=seed), q32, k32, v32)
    return got, (out, *vjp(ct32))


CASES = [  # (t, heads, kv_heads, head_dim, causal, segments)
    (128, 2, 2, 64, True, "sorted"),      # T a multiple of every block
    (100, 4, 2, 40, True, "sorted"),      # ragged T, odd head dim, 2 q heads per kv head
    (96, 4, 1, 128, False, "unsorted"),   # non-causal, all q heads on one kv head
    (100, 2, 2, 72, True, None),          # causal only, head dim padded to 128
    (100, 4, 1, 64, False, None),         # no mask at all: padded keys must still be hidden
    (80, 4, 2, 64, True, "unsorted"),
]


@pytest.mark.parametrize("t,heads,kv_heads,d,causal,segments", CASES)
def test_float32_matches_reference(t, heads, kv_heads, d, causal, segments):
    rng, q, k, v, ct = inputs(t + d, 2, t, heads, kv_heads, d, jnp.float32)
    seg = {None: None, "sorted": lambda: sorted_segments(rng, 2, t, t // 4),
           "unsorted": lambda: rng.integers(0, 3, (2, t)).astype(np.int32)}[segments]
    seg = None if seg is None else jnp.asarray(seg())
    got, want = run_both(q, k, v, ct, seg, causal, block_sizes=SMALL)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.shape == b.shape and a.dtype == jnp.float32, name
        assert rel(a, b) < 1e-5, (name, rel(a, b))


@pytest.mark.parametrize("dtype,d", [(jnp.bfloat16, 64), (jnp.bfloat16, 128), (jnp.float16, 64)])
def test_half_precision_matches_reference(dtype, d):
    rng, q, k, v, ct = inputs(d, 2, 112, 4, 2, d, dtype)
    seg = jnp.asarray(sorted_segments(rng, 2, 112, 28))
    got, want = run_both(q, k, v, ct, seg, True, block_sizes=SMALL)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.dtype == dtype, name
        assert rel(a, b) < 2e-2, (name, rel(a, b))


def test_default_block_sizes_run():
    rng, q, k, v, ct = inputs(7, 1, 100, 2, 2, 64, jnp.float32)
    seg = jnp.asarray(sorted_segments(rng, 1, 100, 30))
    got, want = run_both(q, k, v, ct, seg, True)
    assert max(rel(a, b) for a, b in zip(got, want)) < 1e-5


def test_fully_masked_rows_are_zero_and_finite():
    # Row 0: queries with id 9 have no key with id 9. Row 1: no key matches any query at all.
    rng, q, k, v, ct = inputs(3, 2, 64, 2, 2, 64, jnp.float32)
    q_seg = np.zeros((2, 64), np.int32)
    q_seg[0, 40:] = 9
    q_seg[1] = 5
    kv_seg = np.zeros((2, 64), np.int32)
    seg = (jnp.asarray(q_seg), jnp.asarray(kv_seg))
    for skip in (True, False):
        got, want = run_both(q, k, v, ct, seg, False, block_sizes=SMALL, skip_blocks=skip)
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
            assert np.isfinite(np.asarray(a)).all(), name
            assert rel(a, b) < 1e-5, (name, rel(a, b))
        out, dq = np.asarray(got[0]), np.asarray(got[1])
        assert (out[1] == 0).all() and (out[0, 40:] == 0).all() and (dq[1] == 0).all()
        assert np.abs(out[0, :40]).sum() > 0


@pytest.mark.parametrize("segments", ["sorted", "unsorted"])
def test_block_skipping_does_not_change_results(segments):
    # T = 100 pads to 128: with 16-wide tiles the last key and query blocks are padding only.
    rng, q, k, v, ct = inputs(11, 2, 100, 4, 2, 64, jnp.float32)
    seg = (sorted_segments(rng, 2, 100, 16) if segments == "sorted"
           else rng.integers(0, 4, (2, 100)).astype(np.int32))
    seg = jnp.asarray(seg)
    results = []
    for skip in (True, False):
        f = jax.jit(lambda q, k, v: jax.vjp(lambda *a: flash_attention(
            *a, segment_ids=seg, block_sizes=SMALL, skip_blocks=skip), q, k, v))
        out, vjp = f(q, k, v)
        results.append((out, *vjp(ct)))
    for a, b in zip(*results):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_block_skipping_skips():
    rng = np.random.default_rng(0)
    t = 4096
    docs = sorted_segments(rng, 4, t, t // 8)
    none = np.zeros((4, t), np.int32)
    for bq, bk in ((128, 64), (64, 64), (32, 32)):
        full = visited_blocks(none, bq, bk, causal=True, skip_blocks=False).sum()
        causal = visited_blocks(none, bq, bk, causal=True).sum()
        packed = visited_blocks(docs, bq, bk, causal=True).sum()
        assert 0.5 <= causal / full < 0.53, (bq, bk, causal / full)
        assert packed / causal < 0.4, (bq, bk, packed / causal)
    # Unsorted ids overlap almost every block: skipping then falls back to causal only.
    unsorted = rng.integers(0, 3, (2, 512)).astype(np.int32)
    assert visited_blocks(unsorted, 64, 64).sum() == visited_blocks(np.zeros((2, 512)), 64, 64).sum()
    # Non-causal with two halves: only the two diagonal quarters are visited.
    halves = np.repeat([[0, 1]], 256, axis=1)
    assert visited_blocks(halves, 64, 64, causal=False).sum() == 2 * 4 * 4


# JAX >= 0.11 warns that its Triton backend is deprecated: expected here, where the Triton build
# is compiled on purpose (it is what runs on NVIDIA GPUs other than Hopper).
@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")
@pytest.mark.parametrize("d, rate", [(64, 0.0), (128, 0.0), (64, 0.1)])
def test_lowers_for_cuda_without_a_gpu(d, rate):
    """Compiled for an H100 this host does not have (gptjax.targets): Pallas lowers the kernel
    to Triton for the device's compute capability and XLA's GPU compiler takes the result."""
    from gptjax import targets
    from gptjax.compiled import program_ops

    h100 = targets.open_target("h100")
    # Pallas asks the mesh being traced under which GPU it lowers for (jax >= 0.11 refuses a
    # CUDA lowering otherwise), as gptjax compile's steps are traced.
    mesh = jax.sharding.Mesh(np.array(h100.devices), ("data",))
    on_h100 = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    q = jax.ShapeDtypeStruct((2, 512, 8, d), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 512, 2, d), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((2, 512), jnp.int32)
    fwd = lambda q, k, v, s: flash_attention(q, k, v, segment_ids=s, interpret=False, dropout_rate=rate,
                                             dropout_seed=jnp.int32(3))
    grad = jax.grad(lambda *a: fwd(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2))
    for fn, n_kernels in ((fwd, 1), (grad, 3)):  # the backward: the forward's statistics, dq, dk/dv
        with targets.compiling_for(h100.platform), jax.set_mesh(mesh):
            compiled = jax.jit(fn, in_shardings=(on_h100,) * 4).trace(q, kv, kv, seg).lower().compile()
        calls = program_ops(compiled.as_text())["custom_calls"]
        assert calls.get("__gpu$xla.gpu.triton", 0) == n_kernels, calls


def test_attention_bench_runs_on_cpu():
    from gptjax.bench.attention import bench_attention, format_rows
    rows = bench_attention(seq_lens=(128,), head_dims=(64,), batch=1, heads=2, dtype=jnp.float32, repeats=1)
    by_impl = {(r["case"], r["impl"]): r for r in rows}
    assert by_impl[("causal", "triton (gptjax)")]["status"] == "ok"
    assert by_impl[("packed", "xla (dense mask)")]["fwd_bwd_tflops"] > 0
    assert by_impl[("packed", "mosaic (gptjax)")]["status"] == "unavailable: needs-half"  # wgmma's inputs
    if jax.default_backend() == "cpu":
        assert by_impl[("causal", "cudnn")]["status"].startswith("unavailable")
    assert format_rows(rows).count("\n") == len(rows) + 1


def test_tuning_keeps_the_fastest_tiles_and_rules_out_invalid_ones():
    from gptjax.bench.attention import tune
    best, trials = tune(128, 64, batch=1, heads=2, dtype=jnp.float32, repeats=1,
                        forward_grid=[dict(block_q=32, block_k=32), dict(block_q=64, block_k=32)],
                        backward_grid=[dict(block_q_bwd=32, block_k_bwd=32), dict(block_q_bwd=48, block_k_bwd=32)])
    forward = [t for t in trials if t["part"] == "fwd"]
    fastest = min(forward, key=lambda t: t["ms"])
    assert (best.block_q, best.block_k) == (fastest["block_q"], fastest["block_k"])
    backward = [t for t in trials if t["part"] == "fwd+bwd"]
    assert "ms" in backward[0] and "power of two" in backward[1]["error"]
    assert (best.block_q_bwd, best.block_k_bwd) == (32, 32)


def test_tuning_the_mosaic_build_rules_out_tiles_that_are_not_wgmma_sized():
    from gptjax.bench.attention import tune
    best, trials = tune(128, 64, batch=1, heads=2, dtype=jnp.bfloat16, repeats=1, kernel="mosaic",
                        forward_grid=[dict(block_q=64, block_k=64), dict(block_q=96, block_k=64)],
                        backward_grid=[dict(block_q_bwd=64, block_k_bwd=64)])
    forward = [t for t in trials if t["part"] == "fwd"]
    assert forward[0]["ms"] > 0 and "multiple of 64" in forward[1]["error"]
    assert best.block_q == 64 and [t["part"] for t in trials] == ["fwd", "fwd", "fwd+bwd"]



@pytest.mark.parametrize("t, heads, kv_heads, segments", [(100, 4, 2, True), (64, 2, 2, False)])
def test_dropout_matches_the_reference_with_the_same_mask(t, heads, kv_heads, segments):
    rng, q, k, v, ct = inputs(40, 2, t, heads, kv_heads, 64, jnp.float32)
    seg = jnp.asarray(sorted_segments(rng, 2, t, t // 4)) if segments else None
    got, want = run_both(q, k, v, ct, seg, True, dropout=(0.1, 1234), block_sizes=SMALL)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert rel(a, b) < 1e-5, name
    # Dropout is applied: without it the output differs.
    no_drop, _ = run_both(q, k, v, ct, seg, True, block_sizes=SMALL)
    assert rel(got[0], no_drop[0]) > 1e-2


def test_dropout_masks_keep_the_right_share_and_change_with_the_seed():
    rows = jnp.arange(4 * 2 * 256)[:, None]
    cols = jnp.arange(256)[None, :]
    for rate in (0.1, 0.5):
        keep = np.asarray(dropout_keep(jnp.int32(7), rows, cols, rate))
        assert abs(keep.mean() - (1 - rate)) < 0.005
        # Neighbouring rows and columns are not copies of each other.
        assert (keep[1:] != keep[:-1]).mean() > 0.9 * 2 * rate * (1 - rate)
        assert (keep[:, 1:] != keep[:, :-1]).mean() > 0.9 * 2 * rate * (1 - rate)
    other = np.asarray(dropout_keep(jnp.int32(8), rows, cols, 0.1))
    assert (other != np.asarray(dropout_keep(jnp.int32(7), rows, cols, 0.1))).mean() > 0.15


def test_dropout_on_a_block_of_the_batch_draws_that_block_of_the_whole_mask():
    # A mesh hands each device's kernel one block of rows and heads (gptjax.attention.per_device);
    # placed by dropout_start and dropout_heads, the block drops what the whole batch drops there.
    rng, q, k, v, ct = inputs(50, 4, 48, 4, 2, 32, jnp.float32)
    seg = jnp.asarray(sorted_segments(rng, 4, 48, 12))

    def run(q, k, v, seg, ct, **kw):
        out, vjp = jax.vjp(lambda *a: flash_attention(*a, segment_ids=seg, dropout_rate=0.2, dropout_seed=99,
                                                      block_sizes=SMALL, **kw), q, k, v)
        return (out, *vjp(ct))

    whole = run(q, k, v, seg, ct)
    rows, heads, kv_heads = slice(2, 4), slice(2, 4), slice(1, 2)  # q heads 2, 3 read kv head 1
    block = (q[rows, :, heads], k[rows, :, kv_heads], v[rows, :, kv_heads], seg[rows], ct[rows, :, heads])
    placed = run(*block, dropout_start=jnp.asarray([2, 2]), dropout_heads=4)
    for name, a, b, index in zip(("out", "dq", "dk", "dv"), placed, whole, (heads, heads, kv_heads, kv_heads)):
        assert rel(a, b[rows, :, index]) < 1e-6, (name, rel(a, b[rows, :, index]))
    # Counted from (0, 0) instead, the block would draw another mask.
    assert rel(run(*block)[0], whole[0][rows, :, heads]) > 1e-2
