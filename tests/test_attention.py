import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import attention
from gptjax.attention import resolve, xla_attention
from gptjax.errors import UserError

ON_GPU = attention.on_nvidia_gpu()
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="cuDNN flash attention needs an NVIDIA GPU")


def qkv(batch, tq, tk, heads=3, head_dim=8, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(batch, tq, heads, head_dim)).astype(np.float32)
    k = rng.normal(size=(batch, tk, heads, head_dim)).astype(np.float32)
    v = rng.normal(size=(batch, tk, heads, head_dim)).astype(np.float32)
    return q, k, v


def allowed(batch, tq, tk, q_offset=0, segment_ids=None, kv_valid=None):
    """allowed[b, i, j]: may query i (at slot q_offset + i) look at key j. Written as loops on purpose."""
    out = np.zeros((batch, tq, tk), bool)
    for b in range(batch):
        for i in range(tq):
            for j in range(tk):
                ok = j <= q_offset + i
                if segment_ids is not None:
                    ok = ok and segment_ids[b][i] == segment_ids[b][j]
                if kv_valid is not None:
                    ok = ok and bool(kv_valid[b][j])
                out[b, i, j] = ok
    return out


def naive_attention(q, k, v, mask):
    """Softmax over the allowed keys only, per (batch, query, head), in float64; NaN for a row with none."""
    batch, tq, heads, head_dim = q.shape
    out = np.full(q.shape, np.nan)
    for b in range(batch):
        for i in range(tq):
            keys = np.flatnonzero(mask[b, i])
            if len(keys) == 0:
                continue
            for h in range(heads):
                s = np.array([q[b, i, h] @ k[b, j, h] for j in keys], np.float64) / math.sqrt(head_dim)
                p = np.exp(s - s.max())
                p /= p.sum()
                out[b, i, h] = sum(pj * v[b, j, h].astype(np.float64) for pj, j in zip(p, keys))
    return out


def check(got, want, rows=None):
    got = np.asarray(got)
    assert np.all(np.isfinite(got))
    if rows is not None:
        got, want = got[rows], want[rows]
    assert not np.any(np.isnan(want))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_plain_causal_matches_naive():
    q, k, v = qkv(2, 8, 8)
    want = naive_attention(q, k, v, allowed(2, 8, 8))
    check(xla_attention(q, k, v), want)
    # The first query can only see itself, so it returns its own value row.
    np.testing.assert_allclose(np.asarray(xla_attention(q, k, v))[:, 0], v[:, 0], rtol=1e-6)


def test_causal_output_differs_from_full_attention():
    """These inputs must tell causal from full attention, or the comparisons above prove little."""
    q, k, v = qkv(2, 8, 8, seed=1)
    full = naive_attention(q, k, v, np.ones((2, 8, 8), bool))
    assert np.abs(np.asarray(xla_attention(q, k, v)) - full)[:, :-1].max() > 1e-2


def test_segment_ids_confine_queries_to_their_document():
    segment_ids = np.array([[0, 0, 0, 1, 1, 2, 2, 2], [5, 7, 7, 7, 7, 7, 9, 9]], np.int32)
    q, k, v = qkv(2, 8, 8, seed=2)
    got = np.asarray(xla_attention(q, k, v, segment_ids=jnp.asarray(segment_ids)))
    check(got, naive_attention(q, k, v, allowed(2, 8, 8, segment_ids=segment_ids)))
    # A packed document attends exactly as it would alone.
    alone = np.asarray(xla_attention(q[:1, 3:5], k[:1, 3:5], v[:1, 3:5]))
    np.testing.assert_allclose(got[:1, 3:5], alone, rtol=1e-5, atol=1e-6)
    alone = np.asarray(xla_attention(q[1:, 1:6], k[1:, 1:6], v[1:, 1:6]))
    np.testing.assert_allclose(got[1:, 1:6], alone, rtol=1e-5, atol=1e-6)
    # ...and differs from attending across the boundary.
    assert np.abs(got - np.asarray(xla_attention(q, k, v))).max() > 1e-2


def test_kv_valid_hides_padded_keys():
    kv_valid = np.array([[False, False, True, True, True, True, True, True],
                         [True, True, True, True, False, True, True, False]])
    q, k, v = qkv(2, 8, 8, seed=3)
    mask = allowed(2, 8, 8, kv_valid=kv_valid)
    got = np.asarray(xla_attention(q, k, v, kv_valid=jnp.asarray(kv_valid)))
    rows = mask.any(-1)  # queries with at least one visible key
    assert not rows.all()  # the left-padded queries of row 0 see nothing
    check(got, naive_attention(q, k, v, mask), rows)
    # Changing a hidden key or value changes nothing.
    k2, v2 = k.copy(), v.copy()
    k2[1, 4] += 5.0
    v2[1, 4] -= 5.0
    k2[0, :2] += 5.0
    v2[0, :2] -= 5.0
    got2 = np.asarray(xla_attention(q, k2, v2, kv_valid=jnp.asarray(kv_valid)))
    np.testing.assert_allclose(got2[rows], got[rows], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("q_offset", [0, 2, 5])
def test_query_offset_into_a_longer_key_buffer(q_offset):
    tq, tk = 3, 8
    q, k, v = qkv(2, tq, tk, seed=4)
    mask = allowed(2, tq, tk, q_offset=q_offset)
    want = naive_attention(q, k, v, mask)
    check(xla_attention(q, k, v, q_offset=q_offset), want)
    # Decoding passes the cache index as a traced scalar.
    traced = jax.jit(lambda q, k, v, o: xla_attention(q, k, v, q_offset=o))(q, k, v, jnp.int32(q_offset))
    check(traced, want)


def test_offset_with_padding_matches_naive():
    """The cache case in full: left-padded prompt rows, queries at the end of a longer buffer."""
    tq, tk, q_offset = 3, 8, 4
    kv_valid = np.array([[False, True, True, True, True, True, True, False],
                         [False, False, False, True, True, True, True, False]])
    q, k, v = qkv(2, tq, tk, seed=5)
    mask = allowed(2, tq, tk, q_offset=q_offset, kv_valid=kv_valid)
    check(xla_attention(q, k, v, q_offset=q_offset, kv_valid=jnp.asarray(kv_valid)), naive_attention(q, k, v, mask))


def test_the_full_causal_result_equals_chunked_queries_with_offsets():
    q, k, v = qkv(2, 9, 9, seed=6)
    full = np.asarray(xla_attention(q, k, v))
    parts = [np.asarray(xla_attention(q[:, s:s + 3], k, v, q_offset=s)) for s in (0, 3, 6)]
    np.testing.assert_allclose(np.concatenate(parts, axis=1), full, rtol=1e-5, atol=1e-6)


def test_fully_masked_rows_are_finite_with_finite_gradients():
    q, k, v = (jnp.asarray(x) for x in qkv(2, 8, 8, seed=7))
    nothing = jnp.zeros((2, 8), bool)
    out = xla_attention(q, k, v, kv_valid=nothing)
    assert np.all(np.isfinite(np.asarray(out)))
    grads = jax.grad(lambda q, k, v: xla_attention(q, k, v, kv_valid=nothing).sum(), argnums=(0, 1, 2))(q, k, v)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
    # Same with bfloat16 inputs, the compute dtype on accelerators.
    out16 = xla_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), kv_valid=nothing)
    assert out16.dtype == jnp.bfloat16
    assert np.all(np.isfinite(np.asarray(out16.astype(jnp.float32))))


def test_attention_dropout_rescales_kept_probabilities():
    # With v = 1 every output is the sum of the kept probabilities divided by (1 - rate).
    batch, t, heads = 4, 64, 4
    q, k, _ = qkv(batch, t, t, heads=heads, seed=8)
    v = np.ones((batch, t, heads, 8), np.float32)
    rate = 0.3
    out = np.asarray(xla_attention(q, k, v, dropout_rate=rate, dropout_key=jax.random.key(0)))
    np.testing.assert_allclose(np.asarray(xla_attention(q, k, v)), 1.0, rtol=1e-5)
    assert abs(out.mean() - 1.0) < 0.05
    assert out.std() > 0.1
    # The first query has a single key: it is either dropped (0) or kept (1 / (1 - rate)).
    first = out[:, 0, :, 0]
    is_zero, is_kept = first == 0, np.isclose(first, 1 / (1 - rate), rtol=1e-6)
    assert np.all(is_zero | is_kept) and is_zero.any() and is_kept.any()
    same = np.asarray(xla_attention(q, k, v, dropout_rate=rate, dropout_key=jax.random.key(0)))
    np.testing.assert_array_equal(out, same)
    # No key means no dropout, whatever the rate.
    np.testing.assert_array_equal(np.asarray(xla_attention(q, k, v, dropout_rate=rate)),
                                  np.asarray(xla_attention(q, k, v)))


def test_attend_with_xla_and_auto_equals_xla_attention_on_cpu_inputs():
    q, k, v = qkv(2, 8, 8, seed=9)
    seg = jnp.asarray(np.array([[0, 0, 1, 1, 1, 1, 1, 1], [0] * 8], np.int32))
    want = np.asarray(xla_attention(q, k, v, segment_ids=seg))
    for impl in ("xla", "auto"):
        np.testing.assert_allclose(np.asarray(attention.attend(impl, q, k, v, segment_ids=seg)), want, rtol=1e-6)


# ---------------------------------------------------------------- choosing an implementation

@pytest.mark.skipif(ON_GPU, reason="checks the behaviour without an NVIDIA GPU")
def test_cudnn_without_nvidia_gpu_is_a_user_error():
    with pytest.raises(UserError, match="NVIDIA GPU"):
        resolve("cudnn", jnp.bfloat16, 64, needs_mask=False, needs_dropout=False)
    q, k, v = (jnp.zeros((1, 4, 2, 8), jnp.bfloat16),) * 3
    with pytest.raises(UserError):
        attention.attend("cudnn", q, k, v)


@pytest.mark.skipif(ON_GPU, reason="checks the behaviour without an NVIDIA GPU")
def test_auto_is_xla_without_nvidia_gpu():
    for dtype in (jnp.float32, jnp.bfloat16):
        for needs_mask in (False, True):
            assert resolve("auto", dtype, 64, needs_mask=needs_mask, needs_dropout=False) == "xla"
    assert not attention.cudnn_applies(jnp.bfloat16, 64)


def test_xla_always_resolves_and_unknown_names_are_rejected():
    assert resolve("xla", jnp.float32, 7, needs_mask=True, needs_dropout=True) == "xla"
    with pytest.raises(UserError, match="unknown model.attention"):
        resolve("flash", jnp.float32, 64, needs_mask=False, needs_dropout=False)


@needs_gpu
def test_auto_picks_cudnn_only_where_it_applies():
    assert resolve("auto", jnp.bfloat16, 64, needs_mask=False, needs_dropout=False) == "cudnn"
    assert resolve("auto", jnp.float32, 64, needs_mask=False, needs_dropout=False) == "xla"
    assert resolve("auto", jnp.bfloat16, 64, needs_mask=True, needs_dropout=False) == "xla"
    assert resolve("auto", jnp.bfloat16, 64, needs_mask=False, needs_dropout=True) == "xla"
    assert resolve("auto", jnp.bfloat16, 12, needs_mask=False, needs_dropout=False) == "xla"
    for kwargs in (dict(needs_mask=True, needs_dropout=False), dict(needs_mask=False, needs_dropout=True)):
        with pytest.raises(UserError):
            resolve("cudnn", jnp.bfloat16, 64, **kwargs)
    with pytest.raises(UserError):
        resolve("cudnn", jnp.float32, 64, needs_mask=False, needs_dropout=False)


@needs_gpu
@pytest.mark.parametrize("head_dim", [64, 128])
def test_cudnn_matches_xla_in_bfloat16(head_dim):
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in qkv(2, 256, 256, heads=4, head_dim=head_dim, seed=10))
    got = np.asarray(attention.cudnn_attention(q, k, v).astype(jnp.float32))
    want = np.asarray(xla_attention(q, k, v).astype(jnp.float32))
    np.testing.assert_allclose(got, want, atol=2e-2, rtol=0)
    # Causal, not full, attention.
    full = jax.nn.dot_product_attention(q, k, v, is_causal=False, implementation="xla").astype(jnp.float32)
    assert np.abs(np.asarray(full) - got).max() > 0.1


# ---------------------------------------------------------------- fused kernels: wiring

def sorted_segments(batch, length, seed):
    """Packed rows: documents of random lengths, ids 1, 1, ..., 2, 2, ... per row."""
    rng = np.random.default_rng(seed)
    return np.cumsum(rng.random((batch, length)) < 6 / length, axis=1).astype(np.int32) + 1


def test_a_config_is_refused_on_load_by_the_rule_dispatch_applies():
    """One rule (attention_choices.py): what dispatch refuses whatever the target, the config
    refuses when it loads, with the same line."""
    from gptjax import config as config_lib
    for impl, dropout, document_mask in [("cudnn", 0.1, False), ("splash", 0.1, False), ("cudnn", 0.0, True),
                                         ("flash", 0.0, False)]:
        c = config_lib.base_config()
        c.model.attention, c.model.attn_dropout, c.data.document_mask = impl, dropout, document_mask
        with pytest.raises(UserError) as on_load:
            config_lib.validate(c)
        with pytest.raises(UserError) as on_dispatch:
            resolve(impl, jnp.bfloat16, 64, needs_mask=False, needs_dropout=dropout > 0, segments=document_mask)
        assert str(on_load.value) == str(on_dispatch.value)
    for impl in ("auto", "xla", "pallas"):  # each takes dropout and documents together
        c = config_lib.base_config()
        c.model.attention, c.model.attn_dropout, c.data.document_mask = impl, 0.1, True
        config_lib.validate(c)


def test_kernels_refuse_what_they_cannot_do():
    for impl in ("splash", "cudnn"):
        with pytest.raises(UserError, match="dropout"):
            resolve(impl, jnp.bfloat16, 64, needs_mask=False, needs_dropout=True)
    for impl in ("pallas", "splash", "cudnn"):
        with pytest.raises(UserError, match="auto or xla"):
            resolve(impl, jnp.bfloat16, 64, needs_mask=True, needs_dropout=False)
    assert resolve("pallas", jnp.bfloat16, 64, needs_mask=False, needs_dropout=True) == "pallas"
    with pytest.raises(UserError, match="head dims up to 256"):
        resolve("pallas", jnp.bfloat16, 512, needs_mask=False, needs_dropout=False)
    with pytest.raises(UserError, match="multiple of 128"):
        resolve("splash", jnp.bfloat16, 64, needs_mask=False, needs_dropout=False, seq_len=100)
    if not ON_GPU:
        # Without an NVIDIA GPU or TPU, auto takes XLA even for document masks.
        assert resolve("auto", jnp.bfloat16, 64, needs_mask=False, needs_dropout=False, segments=True) == "xla"


@needs_gpu
def test_auto_picks_the_pallas_kernel_for_document_masks_on_gpu():
    assert resolve("auto", jnp.bfloat16, 64, needs_mask=False, needs_dropout=False, segments=True) == "pallas"
    assert resolve("auto", jnp.bfloat16, 64, needs_mask=False, needs_dropout=True) == "pallas"
    assert resolve("auto", jnp.bfloat16, 64, needs_mask=False, needs_dropout=False) == "cudnn"
    assert resolve("auto", jnp.float32, 64, needs_mask=False, needs_dropout=False, segments=True) == "xla"
    with pytest.raises(UserError, match="packed-document"):
        resolve("cudnn", jnp.bfloat16, 64, needs_mask=False, needs_dropout=False, segments=True)


@pytest.mark.parametrize("impl", ["pallas", "splash"])
def test_kernels_match_xla_with_document_masks(impl):
    # float32 on CPU: the kernels run in Pallas interpret mode, the same code as on the device.
    q, k, v = (jnp.asarray(x) for x in qkv(2, 128, 128, heads=2, head_dim=64, seed=20))
    seg = jnp.asarray(sorted_segments(2, 128, 21))
    cot = jnp.asarray(np.random.default_rng(22).normal(size=q.shape), jnp.float32)

    def run(name, q, k, v):
        return jnp.sum(attention.attend(name, q, k, v, segment_ids=seg) * cot)

    for segment_ids in (None, seg):
        got = attention.attend(impl, q, k, v, segment_ids=segment_ids)
        want = xla_attention(q, k, v, segment_ids=segment_ids)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)
    grads = jax.grad(run, argnums=(1, 2, 3))(impl, q, k, v)
    want = jax.grad(run, argnums=(1, 2, 3))("xla", q, k, v)
    for g, w in zip(grads, want):
        assert np.linalg.norm(np.asarray(g - w)) / np.linalg.norm(np.asarray(w)) < 1e-5


@pytest.mark.parametrize("attn_dropout", [0.0, 0.1])
def test_model_with_the_pallas_kernel_equals_xla_in_loss_and_gradients(attn_dropout):
    from flax import nnx

    from gptjax.config import load_config
    from gptjax.data.packing import as_batch
    from gptjax.model import init_decoder
    from gptjax.model_config import ModelConfig
    from gptjax.train import batch_loss

    rows = np.random.default_rng(30).integers(3, 512, size=(2, 65)).astype(np.int32)
    rows[:, [10, 30, 31, 50]] = 2  # end-of-document tokens: four documents and a one-token one
    batch = {k: jnp.asarray(x) for k, x in as_batch(rows, eos_id=2, pad_id=0, document_mask=True).items()}
    results = {}
    for impl in ("xla", "pallas"):
        config = load_config("configs/tiny.py", ["model.n_layer=2", f"model.attention={impl}", "data.document_mask=true",
                                                 f"model.attn_dropout={attn_dropout}"])
        graphdef, params = nnx.split(init_decoder(ModelConfig.from_config(config.model), 0), nnx.Param)
        # With attention dropout both draw the same mask from the same key (gptjax/dropout.py).
        key = jax.random.key(3) if attn_dropout else None
        (total, aux), grads = jax.value_and_grad(lambda p: batch_loss(graphdef, p, batch, key), has_aux=True)(params)
        count = aux["count"]
        results[impl] = (float(total / count), jax.tree.leaves(grads))
    assert results["pallas"][0] == pytest.approx(results["xla"][0], rel=1e-6)
    for g, w in zip(results["pallas"][1], results["xla"][1]):
        assert np.linalg.norm(np.asarray(g - w)) <= 1e-5 * np.linalg.norm(np.asarray(w)) + 1e-9


SHARDED_KERNELS = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding
from gptjax import attention, sharding
from gptjax.config import load_config
rng = np.random.default_rng(0)
q, k, v = (jnp.asarray(rng.normal(size=(4, 128, 4, 64)), jnp.float32) for _ in range(3))
seg = jnp.asarray(np.cumsum(rng.random((4, 128)) < 0.05, axis=1).astype(np.int32))
want = attention.xla_attention(q, k, v, segment_ids=seg)
mesh = sharding.make_mesh(load_config("configs/tiny.py", ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]).mesh)
put = lambda x, axes: jax.device_put(x, NamedSharding(mesh, sharding.spec(axes)))
args = [put(x, ("batch", "length", "heads", "head_dim")) for x in (q, k, v)] + [put(seg, ("batch", "length"))]
cot = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
def grads(fn):
    return jax.grad(lambda q, k, v, s: jnp.sum(fn(q, k, v, s) * cot), argnums=(0, 1, 2))
want_grads = grads(lambda q, k, v, s: attention.xla_attention(q, k, v, segment_ids=s))(q, k, v, seg)
for impl in ("pallas", "splash"):
    f = jax.jit(lambda q, k, v, s: attention.attend(impl, q, k, v, segment_ids=s))
    g = jax.jit(grads(lambda q, k, v, s: attention.attend(impl, q, k, v, segment_ids=s)))
    with jax.set_mesh(mesh):
        got, got_grads = f(*args), g(*args)
        hlo = f.lower(*args).compile().as_text() + g.lower(*args).compile().as_text()
    error = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip((got, *got_grads), (want, *want_grads)))
    print(impl, error, hlo.count("all-gather"), got.sharding.spec == args[0].sharding.spec)
"""


def test_kernels_run_per_device_on_a_mesh():
    """On 8 devices (2 data x 2 fsdp x 2 tensor) each device attends over its own rows and heads:
    outputs and gradients equal one device's, stay sharded, and nothing is gathered."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    run = subprocess.run([sys.executable, "-c", SHARDED_KERNELS], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [line for line in run.stdout.splitlines() if line.startswith(("pallas ", "splash "))]
    assert len(lines) == 2, run.stdout
    for line in lines:
        impl, error, gathers, sharded = line.split()
        assert float(error) < 1e-5 and gathers == "0" and sharded == "True", line


DROPOUT_ON_A_MESH = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding
from gptjax import attention, sharding
from gptjax.config import load_config
one = np.random.default_rng(0).normal(size=(1, 128, 1, 64)).astype(np.float32)
x = jnp.asarray(np.tile(one, (4, 1, 4, 1)))  # 4 equal rows (one per data x fsdp shard), 4 equal heads
mesh = sharding.make_mesh(load_config("configs/tiny.py", ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]).mesh)
x = jax.device_put(x, NamedSharding(mesh, sharding.spec(("batch", "length", "heads", "head_dim"))))
f = jax.jit(lambda x: attention.attend("pallas", x, x, x, dropout_rate=0.1, dropout_key=jax.random.key(0)))
with jax.set_mesh(mesh):
    out, again = np.asarray(f(x)), np.asarray(f(x))
# Row 0 and head 0 against the same local row / head on other devices; and the same call again.
print(min(np.abs(out[0] - out[i]).max() for i in (1, 2, 3)), np.abs(out[0, :, 0] - out[0, :, 2]).max(),
      np.abs(out - again).max())
# Elementwise dropout numbers elements globally: sharded, it drops what one device drops.
from gptjax.dropout import dropout
drop = jax.jit(lambda x: dropout(x, 0.3, jax.random.key(1)))
with jax.set_mesh(mesh):
    sharded = np.asarray(drop(x))
print(np.abs(sharded - np.asarray(drop(np.asarray(x)))).max())
"""


def test_dropout_masks_differ_between_devices():
    """Equal rows on different devices must not drop the same probabilities: each device numbers
    its rows and heads from where its block sits in the whole batch, not from 0."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    run = subprocess.run([sys.executable, "-c", DROPOUT_ON_A_MESH], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rows, heads, again, elementwise = map(float, run.stdout.split()[-4:])
    assert rows > 0.1 and heads > 0.1 and again == 0.0 and elementwise == 0.0


DROPOUT_ANY_MESH = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding
from gptjax import attention, sharding
from gptjax.config import load_config
rng = np.random.default_rng(1)
q, k, v, cot = (jnp.asarray(rng.normal(size=(8, 32, 4, 16)), jnp.float32) for _ in range(4))
seg = jnp.asarray(np.cumsum(rng.random((8, 32)) < 0.1, axis=1).astype(np.int32))
key = jax.random.key(5)
def out_and_grads(impl):
    f = lambda q, k, v, s: attention.attend(impl, q, k, v, segment_ids=s, dropout_rate=0.2, dropout_key=key)
    grads = jax.grad(lambda q, k, v, s: jnp.sum(f(q, k, v, s) * cot), argnums=(0, 1, 2))
    return jax.jit(lambda q, k, v, s: (f(q, k, v, s), *grads(q, k, v, s)))
def error(got, want):
    return max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for a, b in zip(got, want))
one, xla = out_and_grads("pallas")(q, k, v, seg), out_and_grads("xla")(q, k, v, seg)
print("one-device", error(one, xla))
for sizes in ("data=2 fsdp=1 tensor=4", "data=1 fsdp=8 tensor=1", "data=2 fsdp=2 tensor=2"):
    mesh = sharding.make_mesh(load_config("configs/tiny.py", [f"mesh.{s}" for s in sizes.split()]).mesh)
    put = lambda x, axes: jax.device_put(x, NamedSharding(mesh, sharding.spec(axes)))
    args = [put(x, ("batch", "length", "heads", "head_dim")) for x in (q, k, v)] + [put(seg, ("batch", "length"))]
    with jax.set_mesh(mesh):
        got = out_and_grads("pallas")(*args)
    print(sizes.replace(" ", ","), error(got, one), error(got, xla))
"""


def test_attention_dropout_is_the_same_on_any_mesh():
    """With attention dropout on, the kernel on meshes that split rows (data, fsdp) and heads
    (tensor) gives the outputs and gradients of the kernel on one device and of XLA attention
    with the same key: every device draws its part of the one mask, so a run resumed on another
    mesh, or `auto` switching implementation, trains on the same masks."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    run = subprocess.run([sys.executable, "-c", DROPOUT_ANY_MESH], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [line.split() for line in run.stdout.splitlines() if line.startswith(("one-device", "data="))]
    assert len(lines) == 4, run.stdout
    assert float(lines[0][1]) < 1e-5, lines[0]
    for mesh, to_one_device, to_xla in lines[1:]:
        assert float(to_one_device) < 1e-5 and float(to_xla) < 1e-5, (mesh, to_one_device, to_xla)
