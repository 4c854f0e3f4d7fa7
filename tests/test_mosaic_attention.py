"""The Mosaic GPU flash-attention kernel: against the float32 reference in Mosaic GPU's interpret
mode on the CPU (fresh random inputs each run, the seed in the failure message), and compiled
for an H100 and an H200 without the hardware. On a mesh it runs under `attention.per_device`,
whose placement of each device's block the Triton kernel's mesh tests check (tests/
test_attention.py); the interpreter keeps one state for all devices, so it cannot run the
kernel on several CPU devices at once.

Interpret mode is slow (tens of seconds a case on 2 cores), so the shapes are small: 64-wide
tiles, T of 100 to 200, so that every case still has several query and key blocks, a ragged last
block and grouped heads.
"""

import os
import re
import subprocess
import sys

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from gptjax import attention, targets
from gptjax.kernels.block_plan import visited_blocks
from gptjax.kernels.mosaic_attention import BlockSizes, flash_attention
from attention_reference import reference, rel
from segments import packed_segment_ids


def fresh_inputs(batch, t, heads, kv_heads, d, dtype):
    seed = int(np.random.SeedSequence().entropy % 2 ** 32)
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal((batch, t, h, d)), dtype) for h in (heads, kv_heads, kv_heads))
    ct = jnp.asarray(rng.standard_normal((batch, t, heads, d)), dtype)
    return seed, rng, q, k, v, ct


def kernel_and_reference(q, k, v, ct, segment_ids, rate=0.0, seed=0, **kw):
    """(out, dq, dk, dv) of the kernel and of the float32 reference on the same rounded inputs."""
    f = lambda *a: flash_attention(*a, segment_ids=segment_ids, dropout_rate=rate,
                                   dropout_seed=seed if rate else None, **kw)
    out, vjp = jax.jit(lambda *a: jax.vjp(f, *a))(q, k, v)
    got = (out, *vjp(ct))
    q32, k32, v32, ct32 = (x.astype(jnp.float32) for x in (q, k, v, ct))
    out, vjp = jax.vjp(lambda *a: reference(*a, segment_ids=segment_ids, dropout_rate=rate, dropout_seed=seed),
                       q32, k32, v32)
    return got, (out, *vjp(ct32))


CASES = [  # (t, heads, kv_heads, head_dim, documents, dropout, dtype)
    (100, 4, 2, 64, "several", 0.0, jnp.bfloat16),   # T not a multiple of the block, 2 q heads per kv head
    (150, 4, 1, 128, "several", 0.1, jnp.bfloat16),  # head dim 128, dropout on, all q heads on one kv head
    (130, 2, 2, 40, None, 0.2, jnp.float16),         # causal only, head dim padded to 64, float16
    (128, 2, 2, 64, "padding row", 0.1, jnp.bfloat16),  # row 1 is padding only (one id)
]


@pytest.mark.parametrize("t,heads,kv_heads,d,documents,rate,dtype", CASES)
def test_outputs_and_gradients_match_the_float32_reference(t, heads, kv_heads, d, documents, rate, dtype):
    seed, rng, q, k, v, ct = fresh_inputs(2, t, heads, kv_heads, d, dtype)
    seg = None
    if documents is not None:
        seg = packed_segment_ids(rng, 2, t, t // 4)
        assert len(np.unique(seg[0])) >= 3  # several documents per row
        if documents == "padding row":
            seg[1] = 0
        seg = jnp.asarray(seg)
    got, want = kernel_and_reference(q, k, v, ct, seg, rate, seed=int(seed % 1000))
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.shape == b.shape and a.dtype == dtype, name
        assert np.isfinite(np.asarray(a, np.float32)).all(), (name, seed)
        # bfloat16 inputs and outputs: the reference sees the same rounded inputs, so what is
        # left is the kernel's rounding of P and dS to half precision (about 3e-3 here).
        assert rel(a, b) < 2e-2, (name, rel(a, b), seed)


def test_queries_that_see_no_key_get_zeros_not_nans():
    # Row 0: queries with id 9 have no key with id 9. Row 1: no key matches any query at all.
    seed, rng, q, k, v, ct = fresh_inputs(2, 128, 2, 2, 64, jnp.bfloat16)
    q_seg = np.zeros((2, 128), np.int32)
    q_seg[0, 70:] = 9
    q_seg[1] = 5
    seg = (jnp.asarray(q_seg), jnp.zeros((2, 128), jnp.int32))
    got, want = kernel_and_reference(q, k, v, ct, seg, 0.1, seed=3)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert np.isfinite(np.asarray(a, np.float32)).all(), name
        assert rel(a, b) < 2e-2, (name, rel(a, b), seed)
    out, dq = np.asarray(got[0], np.float32), np.asarray(got[1], np.float32)
    assert (out[1] == 0).all() and (out[0, 70:] == 0).all() and (dq[1] == 0).all()
    assert np.abs(out[0, :70]).sum() > 0


@pytest.mark.parametrize("causal", [True, False])
def test_skipping_tiles_changes_nothing(causal):
    # Unsorted ids overlap in almost every tile pair: the in-loop check, not the range, skips.
    seed, rng, q, k, v, ct = fresh_inputs(1, 200, 2, 2, 64, jnp.bfloat16)
    unsorted = jnp.asarray(rng.integers(0, 3, (1, 200)).astype(np.int32))
    results = []
    for skip in (True, False):
        f = lambda *a: flash_attention(*a, segment_ids=unsorted, causal=causal, skip_blocks=skip, dropout_rate=0.1,
                                       dropout_seed=4)
        out, vjp = jax.jit(lambda *a: jax.vjp(f, *a))(q, k, v)
        results.append((out, *vjp(ct)))
    for a, b in zip(*results):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    q32, k32, v32, ct32 = (x.astype(jnp.float32) for x in (q, k, v, ct))
    out, vjp = jax.vjp(lambda *a: reference(*a, segment_ids=unsorted, causal=causal, dropout_rate=0.1,
                                            dropout_seed=4), q32, k32, v32)
    for name, a, b in zip(("out", "dq", "dk", "dv"), results[0], (out, *vjp(ct32))):
        assert rel(a, b) < 2e-2, (name, rel(a, b), seed)


def test_a_block_of_rows_and_heads_draws_its_part_of_the_whole_batch_mask():
    """What per_device relies on: the call on batch row 1 and heads 2..3 (kv head 1), told where
    it sits, equals that part of the call on the whole batch, dropout included."""
    seed, rng, q, k, v, ct = fresh_inputs(2, 100, 4, 2, 64, jnp.bfloat16)
    seg = jnp.asarray(packed_segment_ids(rng, 2, 100, 30))
    f = lambda q, k, v, s, **kw: flash_attention(q, k, v, segment_ids=s, dropout_rate=0.2, dropout_seed=11, **kw)
    whole = np.asarray(jax.jit(f)(q, k, v, seg), np.float32)
    part = jax.jit(lambda *a: f(*a, dropout_start=jnp.asarray([1, 2], jnp.int32), dropout_heads=4))(
        q[1:, :, 2:], k[1:, :, 1:], v[1:, :, 1:], seg[1:])
    np.testing.assert_array_equal(np.asarray(part, np.float32), whole[1:, :, 2:])


def test_tiles_must_be_wgmma_sized():
    q = jnp.zeros((1, 64, 1, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="multiple of 64"):
        flash_attention(q, q, q, block_sizes=BlockSizes(block_q=32))
    with pytest.raises(ValueError, match="bfloat16 or all float16"):
        flash_attention(q.astype(jnp.float32), q.astype(jnp.float32), q.astype(jnp.float32))


def test_packed_rows_skip_most_of_the_causal_tiles():
    """The kernel's grid with its default 64 x 64 tiles, T = 2048 and documents of mean length
    T/8: the share of tiles computed, against causal attention alone."""
    rng = np.random.default_rng(0)
    t, b = BlockSizes(), 4
    docs = packed_segment_ids(rng, b, 2048, 2048 // 8)
    plain = np.zeros((b, 2048), np.int32)
    causal = visited_blocks(plain, t.block_q, t.block_k).sum()
    packed = visited_blocks(docs, t.block_q, t.block_k).sum()
    every = visited_blocks(plain, t.block_q, t.block_k, skip_blocks=False).sum()
    assert causal / every == pytest.approx((32 * 33 / 2) / 32 ** 2)
    assert packed / causal < 0.25, packed / causal


def test_dropout_drops_what_xla_attention_drops_for_the_same_key():
    """The kernel as `attend` calls it (seed from the step's key) against XLA attention with that
    key: the same probabilities dropped, so `auto` may switch between them, or a run resume on
    another mesh (per_device hands each device its block's place, as the test above checks)."""
    seed, rng, q, k, v, ct = fresh_inputs(2, 100, 4, 4, 64, jnp.bfloat16)
    seg = jnp.asarray(packed_segment_ids(rng, 2, 100, 30))
    key = jax.random.key(seed)
    kernel = lambda q, k, v: attention.pallas_attention(
        q, k, v, seg, jax.lax.bitcast_convert_type(attention.seed_of(key), jnp.int32), dropout_rate=0.3,
        heads=4, backend="mosaic")
    xla = lambda q, k, v: attention.xla_attention(q, k, v, segment_ids=seg, dropout_rate=0.3, dropout_key=key)
    got = jax.jit(kernel)(q, k, v).astype(jnp.float32)
    want = jax.jit(xla)(*(x.astype(jnp.float32) for x in (q, k, v)))
    assert rel(got, want) < 2e-2, (rel(got, want), seed)
    # Dropped probabilities are what tell the two apart: another key gives another output.
    other = jax.jit(lambda *a: attention.xla_attention(*a, segment_ids=seg, dropout_rate=0.3,
                                                       dropout_key=jax.random.key(seed + 1)))
    assert rel(got, other(*(x.astype(jnp.float32) for x in (q, k, v)))) > 0.2


def test_auto_takes_the_mosaic_kernel_on_hopper_and_triton_elsewhere():
    h100 = targets.Platform("gpu", targets.GPUS["h100"].name, (9, 0))
    a100 = targets.Platform("gpu", "NVIDIA A100-SXM4-80GB", (8, 0))
    for platform, half, full in ((h100, "mosaic", "triton"), (a100, "triton", "triton")):
        with targets.compiling_for(platform):
            assert attention.resolve("auto", jnp.bfloat16, 64, needs_mask=False, needs_dropout=False,
                                     segments=True) == "pallas"
            assert attention.pallas_backend(jnp.bfloat16) == half
            assert attention.pallas_backend(jnp.float32) == full
    assert attention.pallas_backend(jnp.bfloat16) == "triton" or targets.current().hopper


COMPILE_FOR = """
import re, sys
from gptjax import targets
targets.prepare_host(sys.argv[1])
import jax, jax.numpy as jnp
from gptjax.kernels.mosaic_attention import flash_attention
target = targets.open_target(sys.argv[1])
on = jax.sharding.SingleDeviceSharding(target.devices[0])
d, rate = int(sys.argv[2]), float(sys.argv[3])
q = jax.ShapeDtypeStruct((2, 1000, 8, d), jnp.bfloat16, sharding=on)
kv = jax.ShapeDtypeStruct((2, 1000, 2, d), jnp.bfloat16, sharding=on)
seg = jax.ShapeDtypeStruct((2, 1000), jnp.int32, sharding=on)
fwd = lambda q, k, v, s: flash_attention(q, k, v, segment_ids=s, dropout_rate=rate, dropout_seed=jnp.int32(3))
grad = jax.grad(lambda *a: fwd(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2))
for name, fn in (("forward", fwd), ("gradient", grad)):
    with targets.compiling_for(target.platform):
        text = jax.jit(fn).lower(q, kv, kv, seg).compile().as_text()
    print(name, " ".join(sorted(re.findall(r'custom_call_target="([^"]+)"', text))))
"""


@pytest.mark.parametrize("target,d,rate", [("h100", 64, 0.1), ("h200", 128, 0.0)])
def test_compiles_for_hopper_without_a_gpu(target, d, rate):
    """Compiled for the GPU (Mosaic GPU lowers to PTX and ptxas assembles it): one kernel forward,
    three in the gradient, and no Triton call."""
    pytest.importorskip("jax_plugins.xla_cuda13", reason="needs the [targets] extra (JAX's CUDA plugin)")
    run = subprocess.run([sys.executable, "-c", COMPILE_FOR, target, str(d), str(rate)], capture_output=True,
                         text=True, timeout=600, env={k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"})
    assert run.returncode == 0, run.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in run.stdout.splitlines() if line.startswith(("forward", "gradient")))
    assert lines["forward"].split() == ["mosaic_gpu_v2"], run.stdout
    assert lines["gradient"].split() == ["mosaic_gpu_v2"] * 3, run.stdout
