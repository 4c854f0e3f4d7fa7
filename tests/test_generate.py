from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gptjax import config, generate, model as model_lib
from gptjax.errors import UserError
from gptjax.model_config import ModelConfig

VOCAB = 97  # pads to 128 embedding rows, so 31 ids exist in `wte` but must never be produced
MAX_LEN = 32
# Prompt lengths 3, 9 and 14 force two rows of left padding in a batch.
PROMPTS = [list(map(int, np.random.default_rng(i).integers(0, VOCAB, n))) for i, n in enumerate((3, 9, 14))]
# prompt + new tokens == max_len: the longest request allowed, which must run (and match the
# full recompute) right up to the last position embedding.
MAX_NEW = MAX_LEN - max(len(p) for p in PROMPTS)


def tiny_config(block="pre_ln"):
    c = config.base_config()
    c.model.block = block
    c.model.vocab_size = VOCAB
    c.model.vocab_pad_multiple = 128
    c.model.n_layer = 2
    c.model.n_head = 4
    c.model.d_model = 32
    c.model.d_ff = 64
    c.model.max_len = MAX_LEN
    c.model.dtype = "float32"
    # At the default 0.02 the residual stream is nearly just the current token's embedding, so a
    # wrong position or a leaking pad slot would barely move the logits; 0.3 makes context matter.
    c.model.init_std = 0.3
    c.train.seq_len = MAX_LEN
    config.validate(c)
    return c


def make_model(block="pre_ln", seed=0):
    return model_lib.init_decoder(ModelConfig.from_config(tiny_config(block).model), seed)


@partial(jax.jit, static_argnums=0)
def _full_logits(graphdef, state, tokens):
    m = nnx.merge(graphdef, state)
    return m.lm_logits(m(tokens))


@partial(jax.jit, static_argnums=0)
def _extend_logits(graphdef, state, tokens, positions, valid, cache):
    m = nnx.merge(graphdef, state)
    hidden, cache = m(tokens, positions, cache=cache, valid=valid)
    return m.lm_logits(hidden), cache


# Jitted rather than eager: dispatching every op eagerly costs more than compiling these shapes,
# and keying on the graphdef lets models of one architecture share the compilation.
def full_logits(model, tokens):
    return _full_logits(*nnx.split(model), tokens)


def extend_logits(model, tokens, positions, valid, cache):
    return _extend_logits(*nnx.split(model), tokens, positions, valid, cache)


def last_logits(model, prompts):
    """Full-forward logits at each prompt's last token, over the whole padded vocabulary.

    Every prompt sits at the start of one [B, MAX_LEN] buffer (one compilation for any lengths);
    the filler after it is random so that a model looking ahead would give itself away."""
    buf = np.random.default_rng(9).integers(0, VOCAB, (len(prompts), MAX_LEN)).astype(np.int32)
    for i, prompt in enumerate(prompts):
        buf[i, :len(prompt)] = prompt
    logits = np.asarray(full_logits(model, jnp.asarray(buf)))
    return np.stack([logits[i, len(p) - 1] for i, p in enumerate(prompts)])


def assert_close(actual, expected):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- KV cache


@pytest.fixture(scope="module", params=["post_ln", "pre_ln"])
def cache_setup(request):
    model = make_model(request.param, seed=1)
    tokens = jax.random.randint(jax.random.key(2), (2, 20), 0, VOCAB)
    return model, tokens, full_logits(model, tokens)


def test_cached_decoding_one_token_at_a_time_matches_full_forward(cache_setup):
    model, tokens, expected = cache_setup
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    p = 6
    # The cache is longer than the sequence, so never-written slots must stay invisible too.
    cache = model.init_cache(b)
    logits, cache = extend_logits(model, tokens[:, :p], positions[:, :p], jnp.ones((b, p), bool), cache)
    outs = [logits]
    for i in range(p, t):
        logits, cache = extend_logits(model, tokens[:, i:i + 1], positions[:, i:i + 1],
                                      jnp.ones((b, 1), bool), cache)
        outs.append(logits)
    assert int(cache["index"]) == t
    assert_close(jnp.concatenate(outs, axis=1), expected)


def test_cached_decoding_in_chunks_matches_full_forward(cache_setup):
    model, tokens, expected = cache_setup
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    cache = model.init_cache(b)
    outs = []
    # A 6-token prefill then two 7-token chunks: a chunk must be causal inside itself as well as
    # over the cache.
    for start, stop in ((0, 6), (6, 13), (13, 20)):
        logits, cache = extend_logits(model, tokens[:, start:stop], positions[:, start:stop],
                                      jnp.ones((b, stop - start), bool), cache)
        outs.append(logits)
    assert int(cache["index"]) == t
    assert_close(jnp.concatenate(outs, axis=1), expected)


def test_left_padded_prefill_matches_unpadded_full_forward(cache_setup):
    model, tokens, expected = cache_setup
    pad = 3
    width, steps = 6, 14
    # Row 1 holds only 3 real tokens behind 3 pad slots filled with arbitrary ids: neither the
    # pad contents nor the slots may shift its positions or leak into attention.
    junk = jnp.array([50, 7, 91])
    prefill = jnp.stack([tokens[0, :width], jnp.concatenate([junk, tokens[1, :width - pad]])])
    valid = jnp.array([[True] * width, [False] * pad + [True] * (width - pad)])
    positions = jnp.array([list(range(width)), [0] * pad + list(range(width - pad))])
    cache = model.init_cache(2)
    logits, cache = extend_logits(model, prefill, positions, valid, cache)
    row0, row1 = [logits[0]], [logits[1, pad:]]
    for i in range(steps):
        pos = jnp.array([[width + i], [width - pad + i]])
        tok = jnp.stack([tokens[0, width + i], tokens[1, width - pad + i]])[:, None]
        logits, cache = extend_logits(model, tok, pos, jnp.ones((2, 1), bool), cache)
        row0.append(logits[0])
        row1.append(logits[1])
    assert_close(jnp.concatenate(row0), expected[0, :width + steps])
    assert_close(jnp.concatenate(row1), expected[1, :width - pad + steps])


# --------------------------------------------------------------------------- generation


@pytest.fixture(scope="module")
def model():
    return make_model("pre_ln", seed=0)


@pytest.fixture(scope="module")
def greedy(model):
    return generate.generate_tokens(model, PROMPTS, max_new_tokens=MAX_NEW, temperature=0, pad_id=0)


def test_batched_left_padded_prompts_generate_as_if_alone(model, greedy):
    assert greedy.shape == (len(PROMPTS), MAX_NEW)
    # The longest prompt has no padding in the batch; the full-recompute test below covers it.
    for i, prompt in enumerate(PROMPTS[:-1]):
        alone = generate.generate_tokens(model, [prompt], max_new_tokens=MAX_NEW, temperature=0, pad_id=0)
        np.testing.assert_array_equal(greedy[i], alone[0], err_msg=f"prompt {i}")


def test_greedy_is_deterministic_and_matches_full_recompute(model, greedy):
    again = generate.generate_tokens(model, PROMPTS, max_new_tokens=MAX_NEW, temperature=0, pad_id=0)
    np.testing.assert_array_equal(greedy, again)

    # Reference decoder without the cache or the sampler: rerun the whole forward pass each step
    # and take the argmax of the real-vocabulary logits at each row's last token.
    sequences = [list(p) for p in PROMPTS]
    for _ in range(MAX_NEW):
        logits = last_logits(model, sequences)
        for seq, row in zip(sequences, logits):
            seq.append(int(np.argmax(row[:VOCAB])))
    expected = np.array([seq[len(p):] for seq, p in zip(sequences, PROMPTS)])
    np.testing.assert_array_equal(greedy, expected)
    # Guard against a degenerate model for which every row would trivially agree.
    assert len({tuple(row) for row in expected}) == len(PROMPTS)


def sample(model, seed, **kw):
    kw = {"temperature": 2.0, **kw}
    return generate.generate_tokens(model, PROMPTS, max_new_tokens=MAX_NEW, seed=seed, pad_id=0, **kw)


def test_sampling_is_reproducible_per_seed(model, greedy):
    a, b, c = sample(model, 0), sample(model, 0), sample(model, 1)
    np.testing.assert_array_equal(a, b)
    assert (a != c).mean() > 0.5  # at temperature 2 most draws from a random model differ
    assert (a != greedy).any()


def test_top_k_1_samples_the_greedy_tokens(model, greedy):
    np.testing.assert_array_equal(sample(model, 5, top_k=1), greedy)


def test_first_sampled_token_follows_the_nucleus_of_the_scaled_softmax(model):
    prompt, n, temperature, top_p = PROMPTS[2], 4000, 0.7, 0.72
    drawn = generate.generate_tokens(model, [prompt] * n, max_new_tokens=1, temperature=temperature,
                                     top_p=top_p, seed=11)[:, 0]
    logits = last_logits(model, [prompt])[0, :VOCAB].astype(np.float64)

    def probs(t):
        keep = nucleus_mask(logits[None] / temperature, top_p)[0]
        z = np.where(keep, np.exp((logits - logits.max()) / t), 0.0)
        return z / z.sum()

    expected = probs(temperature)
    support = np.flatnonzero(expected)
    assert 3 <= len(support) <= 6
    assert set(np.unique(drawn)) <= set(support.tolist())
    freq = np.bincount(drawn, minlength=VOCAB) / n
    # Sampling standard error is <= 0.008 here. Unscaled logits would give a different nucleus and,
    # even on this one, probabilities off by more than 0.1, so an ignored temperature would fail.
    assert np.abs(freq - expected).max() < 0.035
    assert np.abs(probs(1.0) - expected).max() > 0.1
    assert nucleus_mask(logits[None], top_p).sum() > len(support)


def test_each_step_draws_fresh_randomness():
    # A zero embedding makes every logit exactly 0: all steps see the same uniform distribution,
    # so only the per-step key can make the draws differ (a reused key repeats one token).
    flat = make_model("pre_ln", seed=0)
    flat.wte[...] = jnp.zeros_like(flat.wte[...])
    assert np.abs(last_logits(flat, PROMPTS)).max() == 0.0
    drawn = sample(flat, 0)
    assert drawn.max() < VOCAB
    for row in drawn:
        assert len(set(row.tolist())) >= MAX_NEW // 2
    assert len({tuple(row) for row in drawn}) == len(PROMPTS)


def test_padded_vocabulary_rows_are_never_generated(model, greedy):
    rigged = make_model("pre_ln", seed=0)
    wte = np.array(rigged.wte[...])
    pad_rows = wte.shape[0] - VOCAB
    assert pad_rows == 31
    # Large random rows: whatever the hidden state, some padded id gets the largest logit.
    wte[VOCAB:] = 1e3 * np.random.default_rng(0).standard_normal((pad_rows, wte.shape[1]))
    rigged.wte[...] = jnp.asarray(wte)
    assert (last_logits(rigged, PROMPTS).argmax(-1) >= VOCAB).all()

    rigged_greedy = generate.generate_tokens(rigged, PROMPTS, max_new_tokens=MAX_NEW, temperature=0, pad_id=0)
    rigged_sampled = sample(rigged, 0)
    assert rigged_greedy.max() < VOCAB and rigged_sampled.max() < VOCAB
    # Real-vocabulary logits do not depend on the padded rows, so nothing else may change either.
    np.testing.assert_array_equal(rigged_greedy, greedy)
    np.testing.assert_array_equal(rigged_sampled, sample(model, 0))


def test_prompt_plus_new_tokens_beyond_max_len_is_a_user_error(model):
    with pytest.raises(UserError, match="exceeds"):
        generate.generate_tokens(model, PROMPTS, max_new_tokens=MAX_NEW + 1, temperature=0)
    with pytest.raises(UserError, match="exceeds"):
        generate.generate_tokens(model, [[1] * MAX_LEN], max_new_tokens=1, temperature=0)


@pytest.mark.parametrize("prompts", [[[]], [[1, 2], []], []])
def test_empty_prompt_is_a_user_error(model, prompts):
    with pytest.raises(UserError, match="at least one token"):
        generate.generate_tokens(model, prompts, max_new_tokens=2, temperature=0)


@pytest.mark.parametrize("kw", [{"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -1}])
def test_invalid_sampling_settings_are_a_user_error(model, kw):
    with pytest.raises(UserError):
        generate.generate_tokens(model, PROMPTS, max_new_tokens=2, **kw)


# --------------------------------------------------------------------------- filter_logits


@pytest.fixture(scope="module")
def logits():
    # Continuous random values: no ties, so the kept sets below are unambiguous.
    # 24 columns: with the full vocabulary some cumulative mass lands within float32 rounding of
    # almost any p, and the nucleus there would be decided by rounding.
    return np.random.default_rng(3).normal(0.0, 2.0, (8, 24)).astype(np.float32)


def test_temperature_divides_logits(logits):
    for t in (0.5, 1.0, 3.0):
        out = np.asarray(generate.filter_logits(jnp.asarray(logits), t, 0, 1.0))
        np.testing.assert_allclose(out, logits / t, rtol=1e-6)


@pytest.mark.parametrize("k", [1, 5, 17])
def test_top_k_keeps_exactly_the_k_largest(logits, k):
    out = np.asarray(generate.filter_logits(jnp.asarray(logits), 1.0, k, 1.0))
    kept = np.isfinite(out)
    assert (kept.sum(-1) == k).all()
    expected = np.zeros_like(kept)
    np.put_along_axis(expected, np.argsort(-logits, axis=-1)[:, :k], True, axis=-1)
    np.testing.assert_array_equal(kept, expected)
    np.testing.assert_array_equal(out[kept], logits[kept])
    assert (out[~kept] == -np.inf).all()


def test_top_k_larger_than_the_vocabulary_keeps_everything(logits):
    out = np.asarray(generate.filter_logits(jnp.asarray(logits), 1.0, 1000, 1.0))
    np.testing.assert_array_equal(out, logits)


def nucleus_mask(logits, p):
    """The smallest set of highest-probability ids whose total probability reaches p."""
    mask = np.zeros(logits.shape, bool)
    for row, x in enumerate(logits.astype(np.float64)):
        probs = np.exp(x - x[np.isfinite(x)].max())
        probs /= probs.sum()
        order = np.argsort(-x)
        cumulative = np.cumsum(probs[order])
        assert np.abs(cumulative - p).min() > 1e-5, "p on a boundary: float32 rounding would decide"
        size = int(np.searchsorted(cumulative, p)) + 1  # first index whose cumulative mass >= p
        mask[row, order[:size]] = True
    return mask


@pytest.mark.parametrize("p", [0.05, 0.3, 0.6, 0.9, 0.99])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_top_p_keeps_the_smallest_set_reaching_p(logits, p, temperature):
    out = np.asarray(generate.filter_logits(jnp.asarray(logits), temperature, 0, p))
    kept = np.isfinite(out)
    expected = nucleus_mask(logits / temperature, p)
    np.testing.assert_array_equal(kept, expected)
    np.testing.assert_allclose(out[kept], (logits / temperature)[kept], rtol=1e-6)
    if p == 0.3:
        # Non-trivial: neither only the top id nor everything.
        assert (kept.sum(-1) > 1).any() and (kept.sum(-1) < logits.shape[1]).all()


def test_top_p_applies_to_the_top_k_renormalised_distribution(logits):
    k, p = 10, 0.5
    out = np.asarray(generate.filter_logits(jnp.asarray(logits), 1.0, k, p))
    kth = np.sort(logits, axis=-1)[:, -k:-k + 1]
    top_k_only = np.where(logits >= kth, logits, -np.inf)
    np.testing.assert_array_equal(np.isfinite(out), nucleus_mask(top_k_only, p))
    assert (np.isfinite(out).sum(-1) < k).any()


def test_a_model_configured_for_cudnn_still_decodes_through_the_cache():
    # Decoding needs masks only the XLA path takes, so it must not depend on model.attention.
    from gptjax.config import load_config
    from gptjax.model import init_decoder
    cfg = load_config("configs/tiny.py", ["model.n_layer=1", "model.attention=cudnn"])
    decoder = init_decoder(ModelConfig.from_config(cfg.model), 0)
    out = generate.generate_tokens(decoder, [[5, 6, 7]], max_new_tokens=3, temperature=0)
    assert out.shape == (1, 3)
