import contextlib
import io
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals

from gptjax import attention, config, model
from gptjax.loss import lm_loss
from gptjax.model_config import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 97  # not a multiple of 128, so the embedding carries 31 padding rows
SEQ = 12  # one sequence length throughout, so eagerly run ops compile once
KNOWN_AXES = {None, "embed", "heads", "head_dim", "mlp", "vocab"}


def make_config(**model_fields):
    c = config.base_config()
    fields = dict(vocab_size=VOCAB, vocab_pad_multiple=128, n_layer=2, n_head=4, d_model=32, d_ff=64,
                  max_len=32, dtype="float32", attention="xla")
    fields.update(model_fields)
    for key, value in fields.items():
        c.model[key] = value
    c.train.seq_len = min(c.train.seq_len, c.model.max_len)
    config.validate(c)
    return c


def model_config(**model_fields) -> ModelConfig:
    return ModelConfig.from_config(make_config(**model_fields).model)


def n_params(m) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(m, nnx.Param)))


def expected_params(vocab, max_len, n_layer, d, ff, final_ln):
    block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * ff + ff) + (ff * d + d)
    return vocab * d + max_len * d + n_layer * block + (2 * d if final_ln else 0)


def randomize(m, seed=0):
    """Every parameter random (LN scales around 1), so zero-initialised biases and unit LN gains
    cannot hide a wrong formula in the comparisons below."""
    state = nnx.state(m, nnx.Param)
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    rng = np.random.default_rng(seed)
    new = []
    for path, leaf in paths_leaves:
        name = [str(p.key) for p in path if isinstance(p, jax.tree_util.DictKey)][-1]
        noise = rng.normal(size=leaf.shape).astype(np.float32)
        if name == "scale":
            value = 1.0 + 0.2 * noise
        elif "kernel" in name or name in ("wte", "wpe"):
            value = noise / math.sqrt(leaf.shape[0])  # keeps activations O(1)
        else:
            value = 0.2 * noise
        new.append(jnp.asarray(value))
    nnx.update(m, jax.tree.unflatten(treedef, new))
    return m


def arr(v):
    return np.asarray(v[...], dtype=np.float64)


# ---------------------------------------------------------------- numpy reference forward

def np_layer_norm(x, ln, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * arr(ln.scale) + arr(ln.bias)


def np_gelu(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def np_attention(x, attn, n_head):
    w, b = arr(attn.qkv_kernel), arr(attn.qkv_bias)  # [d, 3, H, hd], [3, H, hd]
    wo, bo = arr(attn.out_kernel), arr(attn.out_bias)  # [H, hd, d], [d]
    batch, t, _ = x.shape
    hd = w.shape[-1]
    causal = np.tril(np.ones((t, t), bool))
    out = np.zeros_like(x) + bo
    for h in range(n_head):
        q = x @ w[:, 0, h, :] + b[0, h]
        k = x @ w[:, 1, h, :] + b[1, h]
        v = x @ w[:, 2, h, :] + b[2, h]
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(hd)
        scores = np.where(causal, scores, -np.inf)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out += (p @ v) @ wo[h]
    return out


def np_mlp(x, mlp):
    h = np_gelu(x @ arr(mlp.fc_kernel) + arr(mlp.fc_bias))
    return h @ arr(mlp.proj_kernel) + arr(mlp.proj_bias)


def np_block(x, block, cfg):
    eps = cfg.ln_eps
    if cfg.block == "post_ln":
        n = np_layer_norm(x + np_attention(x, block.attn, cfg.n_head), block.ln_1, eps)
        return np_layer_norm(n + np_mlp(n, block.mlp), block.ln_2, eps)
    x = x + np_attention(np_layer_norm(x, block.ln_1, eps), block.attn, cfg.n_head)
    return x + np_mlp(np_layer_norm(x, block.ln_2, eps), block.mlp)


def np_decoder(m, tokens, cfg, final_ln):
    wte = arr(m.wte)
    h = wte[tokens] + arr(m.wpe)[np.arange(tokens.shape[1])]
    for block in m.blocks:
        h = np_block(h, block, cfg)
    if final_ln:
        h = np_layer_norm(h, m.ln_f, cfg.ln_eps)
    return h @ wte.T


# ---------------------------------------------------------------- parameter counts

GPT1_PARAMS = 116_534_784
GPT2_SMALL_PARAMS = 124_439_808


def gpt1_config():
    return make_config(block="post_ln", vocab_size=40478, vocab_pad_multiple=1, n_layer=12, n_head=12,
                       d_model=768, d_ff=3072, max_len=512)


def gpt2_small_config(pad_multiple=1):
    return make_config(block="pre_ln", vocab_size=50257, vocab_pad_multiple=pad_multiple, n_layer=12,
                       n_head=12, d_model=768, d_ff=3072, max_len=1024)


def abstract_model(cfg):
    return nnx.eval_shape(lambda: model.init_decoder(ModelConfig.from_config(cfg.model), 0))


def test_gpt1_parameter_count_matches_the_paper():
    m = abstract_model(gpt1_config())
    assert n_params(m) == GPT1_PARAMS
    assert abs(n_params(m) - 116.5e6) < 0.1e6
    assert m.wte.shape == (40478, 768) and m.wpe.shape == (512, 768)
    # The paper's breakdown: 7,087,872 per block.
    assert n_params(m.blocks[0]) == 7_087_872
    assert m.ln_f is None


def test_gpt2_small_parameter_count_counts_tied_embedding_once():
    m = abstract_model(gpt2_small_config())
    assert n_params(m) == GPT2_SMALL_PARAMS
    assert n_params(m) == expected_params(50257, 1024, 12, 768, 3072, final_ln=True)
    assert abs(n_params(m) - 124.4e6) < 0.1e6


def test_vocab_padding_adds_rows_but_stays_gpt2_small_sized():
    m = abstract_model(gpt2_small_config(pad_multiple=128))
    assert m.wte.shape == (50304, 768)
    assert n_params(m) == GPT2_SMALL_PARAMS + (50304 - 50257) * 768
    assert abs(n_params(m) - 124.4e6) < 0.1e6


@pytest.mark.parametrize("name, overrides, expected, block", [
    ("gpt1.py", ["model.vocab_size=40478", "model.vocab_pad_multiple=1"], GPT1_PARAMS, "post_ln"),
    ("gpt2_small.py", ["model.vocab_pad_multiple=1"], GPT2_SMALL_PARAMS, "pre_ln"),
])
def test_shipped_config_files_have_paper_sizes(name, overrides, expected, block):
    path = os.path.join(ROOT, "configs", name)
    if not os.path.isfile(path):
        pytest.skip(f"configs/{name} not present")
    cfg = config.load_config(path, overrides)
    assert cfg.model.block == block
    assert n_params(abstract_model(cfg)) == expected


# ---------------------------------------------------------------- forward pass against numpy

@pytest.mark.parametrize("block_type", ["post_ln", "pre_ln"])
def test_block_matches_numpy(block_type):
    # A large epsilon, so dropping or misplacing it shows at this tolerance.
    cfg = model_config(block=block_type, ln_eps=0.1)
    block = model.Block(cfg, rngs=nnx.Rngs(params=3))
    randomize(block, seed=1)
    x = np.random.default_rng(2).normal(size=(2, SEQ, cfg.d_model)).astype(np.float32)
    y = block(jnp.asarray(x))
    want = np_block(x.astype(np.float64), block, cfg)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-4, atol=1e-4)


def test_post_and_pre_ln_blocks_differ_on_the_same_weights():
    """Guards the block test above against a reference that ignores `block`."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, SEQ, 32)).astype(np.float32))
    outs = []
    for block_type in ("post_ln", "pre_ln"):
        block = randomize(model.Block(model_config(block=block_type), rngs=nnx.Rngs(params=0)), seed=0)
        outs.append(np.asarray(block(x)))
    assert np.abs(outs[0] - outs[1]).max() > 0.1


def test_gpt1_decoder_matches_numpy_with_tied_output_and_no_final_ln():
    cfg = model_config(block="post_ln")
    m = randomize(model.init_decoder(cfg, 0), seed=5)
    assert m.ln_f is None
    tokens = np.random.default_rng(0).integers(0, VOCAB, size=(2, SEQ))
    logits = np.asarray(m.lm_logits(m(jnp.asarray(tokens))))
    assert logits.shape == (2, SEQ, 128)  # padded vocabulary
    np.testing.assert_allclose(logits, np_decoder(m, tokens, cfg, final_ln=False), rtol=1e-4, atol=2e-4)


def test_gpt2_decoder_matches_numpy_with_final_ln():
    cfg = model_config(block="pre_ln")
    m = randomize(model.init_decoder(cfg, 0), seed=6)
    assert m.ln_f is not None
    tokens = np.random.default_rng(1).integers(0, VOCAB, size=(2, SEQ))
    logits = np.asarray(m.lm_logits(m(jnp.asarray(tokens))))
    np.testing.assert_allclose(logits, np_decoder(m, tokens, cfg, final_ln=True), rtol=1e-4, atol=2e-4)
    # The final LN has random gain/bias here, so leaving it out must be visible.
    assert np.abs(logits - np_decoder(m, tokens, cfg, final_ln=False)).max() > 0.1


def test_explicit_positions_are_used():
    m = randomize(model.init_decoder(model_config(), 0), seed=0)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, size=(2, SEQ)))
    default = np.asarray(m(tokens))
    positions = jnp.broadcast_to(jnp.arange(SEQ), (2, SEQ))
    same = np.asarray(m(tokens, positions=positions))
    shifted = np.asarray(m(tokens, positions=positions + 3))
    np.testing.assert_allclose(same, default, atol=1e-6)
    assert np.abs(shifted - default).max() > 1e-2


def test_packed_documents_do_not_see_each_other():
    m = randomize(model.init_decoder(model_config(), 0), seed=2)
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, VOCAB, size=(2, 5)), rng.integers(0, VOCAB, size=(2, SEQ - 5))

    def packed(first, second):
        tokens = np.concatenate([first, second], axis=1)
        segment_ids = np.repeat([[0] * first.shape[1] + [1] * second.shape[1]], 2, axis=0)
        positions = np.repeat([list(range(first.shape[1])) + list(range(second.shape[1]))], 2, axis=0)
        return np.asarray(m(*(jnp.asarray(x) for x in (tokens, positions, segment_ids))))

    ab, ba = packed(a, b), packed(b, a)
    np.testing.assert_allclose(ab[:, 5:], ba[:, :SEQ - 5], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ab[:, :5], ba[:, SEQ - 5:], rtol=1e-5, atol=1e-5)
    # Without the segment ids the second document does see the first.
    joint = np.asarray(m(jnp.asarray(np.concatenate([a, b], axis=1))))
    assert np.abs(joint[:, 5:] - ab[:, 5:]).max() > 1e-2


def test_bfloat16_compute_is_close_to_float32():
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, size=(2, SEQ)))
    out = {}
    for dtype in ("float32", "bfloat16"):
        m = model.init_decoder(model_config(dtype=dtype), 0)
        logits = jax.jit(lambda t: m.lm_logits(m(t)))(tokens)
        assert logits.dtype == jnp.dtype(dtype)
        out[dtype] = np.asarray(logits.astype(jnp.float32))
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(m, nnx.Param)))
    scale = np.abs(out["float32"]).max()
    assert np.abs(out["bfloat16"] - out["float32"]).max() < 0.05 * scale


# ---------------------------------------------------------------- causality

IMPLEMENTATIONS = [
    "xla",
    pytest.param("cudnn", marks=pytest.mark.skipif(not attention.on_nvidia_gpu(),
                                                   reason="cuDNN flash attention needs an NVIDIA GPU")),
]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("block_type", ["post_ln", "pre_ln"])
def test_logits_never_depend_on_later_tokens(block_type, impl):
    # cuDNN takes bf16 only (the tiny head dim, 8, is a multiple of 8 as it also needs).
    dtype = "bfloat16" if impl == "cudnn" else "float32"
    m = model.init_decoder(model_config(block=block_type, attention=impl, dtype=dtype), 0)

    def forward(t):
        return m.lm_logits(m(t)).astype(jnp.float32)

    rng = np.random.default_rng(0)
    seq = SEQ
    tokens = rng.integers(0, VOCAB, size=(2, seq))
    base = np.asarray(forward(jnp.asarray(tokens)))
    for t in (0, 6, seq - 2):
        changed = tokens.copy()
        changed[:, t + 1:] = (tokens[:, t + 1:] + rng.integers(1, VOCAB, size=(2, seq - t - 1))) % VOCAB
        out = np.asarray(forward(jnp.asarray(changed)))
        np.testing.assert_allclose(out[:, :t + 1], base[:, :t + 1], rtol=0, atol=1e-6)
        assert np.abs(out[:, t + 1:] - base[:, t + 1:]).max() > 1e-3


# ---------------------------------------------------------------- initialisation

# The tiny shapes (their random-number kernels are already compiled) with many layers; the
# statistics pool each kind of weight over the layers to get tens of thousands of samples.
INIT_SHAPES = dict(n_layer=8)


def pooled(m, get):
    return np.concatenate([arr(get(b)).ravel() for b in m.blocks])


def test_initialisation_scales():
    n_layer = INIT_SHAPES["n_layer"]
    cfg = model_config(**INIT_SHAPES)
    m = model.init_decoder(cfg, 0)
    resid_std = 0.02 / math.sqrt(2 * n_layer)
    for get, std in ((lambda b: b.mlp.fc_kernel, 0.02), (lambda b: b.attn.qkv_kernel, 0.02),
                     (lambda b: b.mlp.proj_kernel, resid_std), (lambda b: b.attn.out_kernel, resid_std)):
        a = pooled(m, get)
        assert a.size >= 8000
        assert abs(a.std() / std - 1) < 0.03, (a.std(), std)
        assert abs(a.mean()) < 0.05 * std
        # Normal, not merely the right spread: a uniform draw has excess kurtosis -1.2.
        excess_kurtosis = ((a - a.mean()) ** 4).mean() / a.var() ** 2 - 3
        assert abs(excess_kurtosis) < 0.2, excess_kurtosis
    for b in m.blocks:
        for bias in (b.attn.qkv_bias, b.attn.out_bias, b.mlp.fc_bias, b.mlp.proj_bias,
                     b.ln_1.bias, b.ln_2.bias):
            assert np.all(arr(bias) == 0)
        for ln in (b.ln_1, b.ln_2):
            assert np.all(arr(ln.scale) == 1)
    emb = np.concatenate([arr(m.wte).ravel(), arr(m.wpe).ravel()])
    assert abs(emb.std() / 0.02 - 1) < 0.04
    assert np.all(arr(m.ln_f.scale) == 1) and np.all(arr(m.ln_f.bias) == 0)
    # Layers and the embeddings draw independent values.
    assert not np.allclose(arr(m.blocks[0].mlp.fc_kernel), arr(m.blocks[1].mlp.fc_kernel))


def test_residual_scaling_can_be_turned_off():
    m = model.init_decoder(model_config(scale_residual_init=False, **INIT_SHAPES), 0)
    assert abs(pooled(m, lambda b: b.mlp.proj_kernel).std() / 0.02 - 1) < 0.03
    assert abs(pooled(m, lambda b: b.attn.out_kernel).std() / 0.02 - 1) < 0.03


def test_init_is_a_function_of_the_seed():
    cfg = model_config()
    a, b, c = (model.init_decoder(cfg, s) for s in (0, 0, 1))
    la, lb, lc = (jax.tree.leaves(nnx.state(x, nnx.Param)) for x in (a, b, c))
    assert all(np.array_equal(x, y) for x, y in zip(la, lb))
    assert not np.array_equal(arr(a.wte), arr(c.wte))


@pytest.mark.parametrize("block_type", ["post_ln", "pre_ln"])
def test_every_param_has_axes_matching_its_rank(block_type):
    m = model.init_decoder(model_config(block=block_type), 0)
    variables = jax.tree.leaves(nnx.state(m, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert len(variables) == 2 + 12 * 2 + (2 if block_type == "pre_ln" else 0)
    for v in variables:
        axes = v.get_metadata()["axes"]
        assert len(axes) == v[...].ndim, (axes, v[...].shape)
        assert set(axes) <= KNOWN_AXES
        assert v[...].dtype == jnp.float32
    assert m.wte.get_metadata()["axes"] == ("vocab", "embed")
    assert m.blocks[0].attn.qkv_kernel.get_metadata()["axes"] == ("embed", None, "heads", "head_dim")
    assert m.blocks[0].attn.out_kernel.get_metadata()["axes"] == ("heads", "head_dim", "embed")
    assert m.blocks[0].mlp.fc_kernel.get_metadata()["axes"] == ("embed", "mlp")


# ---------------------------------------------------------------- dropout

def test_dropout_is_off_without_a_key_and_reproducible_with_one():
    m = model.init_decoder(model_config(dropout=0.1, attn_dropout=0.1), 0)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, size=(2, SEQ)))
    det1, det2 = np.asarray(m(tokens)), np.asarray(m(tokens))
    np.testing.assert_array_equal(det1, det2)
    k1, k2 = jax.random.key(1), jax.random.key(2)
    a, a_again, b = (np.asarray(m(tokens, dropout_key=k)) for k in (k1, k1, k2))
    np.testing.assert_array_equal(a, a_again)
    assert np.abs(a - det1).max() > 1e-3
    assert np.abs(a - b).max() > 1e-3


def test_every_dropout_site_draws_its_own_key(monkeypatch):
    # Reusing one key would give identically shaped sites the same mask in every layer.
    keys = []
    original_dropout, original_attend = model._dropout, attention.attend

    def dropout(x, rate, key):
        keys.append(key)
        return original_dropout(x, rate, key)

    def attend(*args, dropout_key=None, **kwargs):
        keys.append(dropout_key)
        return original_attend(*args, dropout_key=dropout_key, **kwargs)

    monkeypatch.setattr(model, "_dropout", dropout)
    monkeypatch.setattr(attention, "attend", attend)
    m = model.init_decoder(model_config(dropout=0.1, attn_dropout=0.1), 0)
    tokens = jnp.zeros((2, SEQ), jnp.int32)
    m(tokens, dropout_key=jax.random.key(0))
    n_layer = 2
    assert len(keys) == 1 + 3 * n_layer  # embeddings; per layer attention probs, two residual branches
    raw = {np.asarray(jax.random.key_data(k)).tobytes() for k in keys}
    assert len(raw) == len(keys)
    keys.clear()
    m(tokens)
    assert keys and all(k is None for k in keys)


def test_attention_dropout_alone_changes_the_output_with_xla():
    m = model.init_decoder(model_config(dropout=0.0, attn_dropout=0.3, attention="xla"), 0)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, size=(2, SEQ)))
    det = np.asarray(m(tokens))
    dropped = np.asarray(m(tokens, dropout_key=jax.random.key(0)))
    assert np.all(np.isfinite(dropped))
    assert np.abs(dropped - det).max() > 1e-3
    # With both rates zero a key changes nothing.
    m0 = model.init_decoder(model_config(dropout=0.0, attn_dropout=0.0), 0)
    np.testing.assert_array_equal(np.asarray(m0(tokens, dropout_key=jax.random.key(0))), np.asarray(m0(tokens)))


def test_dropout_zeroes_the_rate_and_rescales_the_rest():
    x = jnp.ones((200, 500), jnp.float32)
    y = np.asarray(model._dropout(x, 0.25, jax.random.key(0)))
    kept = y != 0
    assert abs(1 - kept.mean() - 0.25) < 0.01
    np.testing.assert_allclose(y[kept], 1 / 0.75, rtol=1e-6)
    assert abs(y.mean() - 1) < 0.01


# ---------------------------------------------------------------- rematerialisation

def _loss_and_grads(remat, tokens, key):
    cfg = model_config(remat=remat, dropout=0.1)
    graphdef, params = nnx.split(model.init_decoder(cfg, 0))

    def loss_fn(p):
        m = nnx.merge(graphdef, p)
        logits = m.lm_logits(m(tokens[:, :-1], dropout_key=key))
        total, count = lm_loss(logits, tokens[:, 1:], jnp.ones(tokens[:, 1:].shape), cfg.vocab_size)
        return total / count

    # Unoptimised CPU codegen halves the compile time; remat equivalence does not depend on it.
    compiled = jax.jit(jax.value_and_grad(loss_fn)).lower(params).compile({"xla_backend_optimization_level": 0})
    return compiled(params)


def test_remat_gives_the_same_loss_and_gradients():
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, size=(2, 13)))
    key = jax.random.key(7)  # the dropout masks must be recomputed identically too
    ref_loss, ref_grads = _loss_and_grads("none", tokens, key)
    ref_leaves = jax.tree.leaves(ref_grads)
    assert any(np.abs(np.asarray(g)).max() > 1e-4 for g in ref_leaves)
    for policy in ("full", "save_dots"):
        loss, grads = _loss_and_grads(policy, tokens, key)
        np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5, atol=1e-5)
        leaves = jax.tree.leaves(grads)
        assert len(leaves) == len(ref_leaves)
        for g, r in zip(leaves, ref_leaves):
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5)


def _saved_residuals(remat, tokens):
    cfg = model_config(remat=remat)
    graphdef, params = nnx.split(model.init_decoder(cfg, 0))

    def loss_fn(p):
        m = nnx.merge(graphdef, p)
        return lm_loss(m.lm_logits(m(tokens[:, :-1])), tokens[:, 1:], jnp.ones(tokens[:, 1:].shape), VOCAB)[0]

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        print_saved_residuals(loss_fn, params)
    return [line for line in buf.getvalue().splitlines() if "from the argument" not in line]


def test_remat_policies_keep_fewer_activations_for_the_backward_pass():
    """Equal gradients alone would also pass if remat were silently ignored."""
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, size=(2, SEQ + 1)))
    saved = {policy: _saved_residuals(policy, tokens) for policy in ("none", "full", "save_dots")}
    def count(policy, op):
        return sum(f"output of {op} " in line for line in saved[policy])

    def mlp_elementwise(policy):
        # What the MLP keeps besides matmul outputs: its bias add and the GELU's intermediates.
        # Which of those JAX saves, and their names, is its choice of the tanh's derivative
        # (jax 0.10 keeps tanh and 1 - tanh**2, 0.12 one fused one_minus_square), so none is named.
        return sum("(MLP.__call__)" in line and "output of dot_general " not in line for line in saved[policy])

    n_layer = 2
    assert len(saved["full"]) < len(saved["save_dots"]) < len(saved["none"])
    # Without remat each layer keeps the GELU's input and at least one of its intermediates;
    # both policies recompute them.
    assert mlp_elementwise("none") >= 2 * n_layer
    assert mlp_elementwise("full") == mlp_elementwise("save_dots") == 0
    # save_dots keeps matmul outputs (q/k/v and the MLP input projection at least); full keeps
    # none of the blocks': the one left is the logits, which the loss's backward reads.
    assert count("save_dots", "dot_general") >= 2 * n_layer + 1
    assert count("full", "dot_general") == 1


# ---------------------------------------------------------------- loss

def np_cross_entropy(logits, targets, mask, vocab):
    z = logits[..., :vocab].astype(np.float64)
    log_z = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    nll = log_z - np.take_along_axis(z, targets[..., None], -1)[..., 0]
    return (nll * mask).sum(), mask.sum()


def test_lm_loss_matches_numpy_cross_entropy_with_mask():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, SEQ, 128)).astype(np.float32) * 3
    targets = rng.integers(0, VOCAB, size=(2, SEQ))
    mask = (rng.random((2, SEQ)) > 0.3).astype(np.float32)
    total, count = lm_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask), VOCAB)
    want_total, want_count = np_cross_entropy(logits, targets, mask, VOCAB)
    assert float(count) == want_count == mask.sum()
    np.testing.assert_allclose(float(total), want_total, rtol=1e-5)
    # A boolean mask counts the same.
    total_b, count_b = lm_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask > 0), VOCAB)
    np.testing.assert_allclose(float(total_b), want_total, rtol=1e-5)
    # Uniform logits over the real vocabulary give ln(V) per counted token.
    flat, n = lm_loss(jnp.zeros((2, SEQ, 128)), jnp.zeros((2, SEQ), jnp.int32), jnp.ones((2, SEQ)), VOCAB)
    np.testing.assert_allclose(float(flat) / float(n), math.log(VOCAB), rtol=1e-6)


def test_lm_loss_ignores_padded_vocabulary_columns():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, SEQ, 128)).astype(np.float32)
    targets = jnp.asarray(rng.integers(0, VOCAB, size=(2, SEQ)))
    mask = jnp.ones((2, SEQ))
    base, _ = lm_loss(jnp.asarray(logits), targets, mask, VOCAB)
    loud = logits.copy()
    loud[..., VOCAB:] = 1e4
    padded, _ = lm_loss(jnp.asarray(loud), targets, mask, VOCAB)
    np.testing.assert_allclose(float(padded), float(base), rtol=1e-6)
    grads = jax.grad(lambda x: lm_loss(x, targets, mask, VOCAB)[0])(jnp.asarray(loud))
    assert np.all(np.asarray(grads)[..., VOCAB:] == 0)
    assert np.all(np.isfinite(np.asarray(grads)))
    # The gradient of a cross-entropy is softmax - onehot: rows sum to zero.
    np.testing.assert_allclose(np.asarray(grads).sum(-1), 0, atol=1e-5)


def test_lm_loss_accepts_bfloat16_logits():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, SEQ, 128)).astype(np.float32)
    targets = rng.integers(0, VOCAB, size=(2, SEQ))
    mask = np.ones((2, SEQ), np.float32)
    total, count = lm_loss(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(targets), jnp.asarray(mask), VOCAB)
    assert total.dtype == jnp.float32
    rounded = np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_allclose(float(total), np_cross_entropy(rounded, targets, mask, VOCAB)[0], rtol=1e-5)


def test_lm_loss_of_an_empty_mask_is_zero_over_zero():
    total, count = lm_loss(jnp.zeros((2, SEQ, 128)), jnp.zeros((2, SEQ), jnp.int32), jnp.zeros((2, SEQ)), VOCAB)
    assert float(total) == 0.0 and float(count) == 0.0


# ---------------------------------------------------------------- FLOPs

@pytest.mark.parametrize("make, seq_len", [(lambda: make_config(), 32), (gpt1_config, 512),
                                           (gpt2_small_config, 1024)])
def test_flops_per_token(make, seq_len):
    cfg = make()
    m = abstract_model(cfg)
    mc = cfg.model
    non_embedding_position = n_params(m) - mc.max_len * mc.d_model
    want = 6 * non_embedding_position + 12 * mc.n_layer * mc.d_model * seq_len
    assert m.flops_per_token(seq_len) == want


def test_gpt2_small_flops_per_token_value():
    # 6 * (124,439,808 - 786,432) + 12 * 12 * 768 * 1024
    assert abstract_model(gpt2_small_config()).flops_per_token(1024) == 855_166_464
