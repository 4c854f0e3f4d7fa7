"""The memory-lean loss: its hand-written gradient, the chunked vocabulary projection, and what
the compiled step holds in memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import targets
from gptjax.compiled import compile_train_step, memory_plan, vocabulary_buffers
from gptjax.config import load_config
from gptjax.loss import lm_loss, projected_lm_loss, projected_target_scores

VOCAB, PADDED = 100, 128


def reference_loss(logits, targets, mask, vocab):
    """The textbook cross-entropy, differentiated by autodiff: float32 throughout."""
    z = logits.astype(jnp.float32)[..., :vocab]
    nll = jax.nn.logsumexp(z, -1) - jnp.take_along_axis(z, targets[..., None], -1)[..., 0]
    return jnp.sum(nll * mask)


def inputs(seed, b=3, t=20, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(rng.normal(size=(b, t, PADDED)) * 3, dtype)
    targets = jnp.asarray(rng.integers(0, VOCAB, size=(b, t)))
    mask = jnp.asarray(rng.random((b, t)) * (rng.random((b, t)) > 0.3), jnp.float32)  # weights, some 0
    return logits, targets, mask


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_gradient_matches_autodiff_of_the_textbook_loss():
    logits, targets, mask = inputs(0)
    value, (g_logits, g_mask) = jax.value_and_grad(lambda x, m: lm_loss(x, targets, m, VOCAB)[0],
                                                   argnums=(0, 1))(logits, mask)
    want, (w_logits, w_mask) = jax.value_and_grad(reference_loss, argnums=(0, 2))(logits, targets, mask, VOCAB)
    np.testing.assert_allclose(float(value), float(want), rtol=1e-6)
    assert rel_err(g_logits, w_logits) < 1e-6
    assert rel_err(g_mask, w_mask) < 1e-6
    assert np.all(np.asarray(g_logits)[..., VOCAB:] == 0)


def test_bfloat16_logits_get_bfloat16_gradients_close_to_float32():
    logits, targets, mask = inputs(1, dtype=jnp.bfloat16)
    grads = jax.grad(lambda x: lm_loss(x, targets, mask, VOCAB)[0])(logits)
    assert grads.dtype == jnp.bfloat16
    want = jax.grad(reference_loss)(logits.astype(jnp.float32), targets, mask, VOCAB)
    assert rel_err(grads, want) < 1e-2


def projection_inputs(seed, b=2, t=20, d=16):
    """(hidden [b, t, d], embedding [PADDED, d], targets, mask weights with some zeros)."""
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
    embedding = jnp.asarray(rng.normal(size=(PADDED, d)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, VOCAB, size=(b, t)))
    mask = jnp.asarray(rng.random((b, t)) * (rng.random((b, t)) > 0.2), jnp.float32)
    return hidden, embedding, targets, mask


@pytest.mark.parametrize("chunk_len", [5, 7, 19])  # divides T, does not, leaves one position over
def test_chunked_projection_equals_the_whole_one(chunk_len):
    hidden, embedding, targets, mask = projection_inputs(2)

    def loss(h, e, m, chunk):
        total, count = projected_lm_loss(h, lambda x: jnp.einsum("btd,vd->btv", x, e), targets, m, VOCAB, chunk)
        return total / count

    whole, whole_grads = jax.value_and_grad(loss, argnums=(0, 1, 2))(hidden, embedding, mask, 0)
    chunked, chunked_grads = jax.value_and_grad(loss, argnums=(0, 1, 2))(hidden, embedding, mask, chunk_len)
    np.testing.assert_allclose(float(chunked), float(whole), rtol=1e-6)
    for got, want in zip(chunked_grads, whole_grads):
        assert rel_err(got, want) < 1e-6
    # In bfloat16 as the model runs it: the same loss to bf16 rounding.
    bf16 = loss(hidden.astype(jnp.bfloat16), embedding.astype(jnp.bfloat16), mask, chunk_len)
    np.testing.assert_allclose(float(bf16), float(whole), rtol=2e-2)


@pytest.mark.parametrize("chunk_len", [0, 7, 19])
def test_target_scores_are_the_loss_terms_and_the_argmax(chunk_len):
    hidden, embedding, targets, mask = projection_inputs(3)

    def project(x):
        return jnp.einsum("btd,vd->btv", x, embedding)

    log_softmax = jax.nn.log_softmax(project(hidden)[..., :VOCAB])  # padding columns take no mass
    # Every other target is the most likely real token, so both answers of the greedy flag occur.
    targets = jnp.where(jnp.arange(targets.shape[1]) % 2 == 0, jnp.argmax(log_softmax, -1), targets)
    logp, greedy = projected_target_scores(hidden, project, targets, VOCAB, chunk_len)
    assert logp.shape == greedy.shape == targets.shape and logp.dtype == jnp.float32 and greedy.dtype == jnp.bool_
    np.testing.assert_allclose(logp, jnp.take_along_axis(log_softmax, targets[..., None], -1)[..., 0], rtol=1e-5)
    np.testing.assert_array_equal(greedy, jnp.argmax(log_softmax, -1) == targets)
    assert 0 < int(greedy.sum()) < greedy.size
    total, _ = projected_lm_loss(hidden, project, targets, mask, VOCAB, chunk_len)
    np.testing.assert_allclose(-float(jnp.sum(logp * mask)), float(total), rtol=1e-6)


def tiny_step(*overrides, target=None):
    """The pretraining step of a one-layer bf16 model, compiled for the host or for `target`."""
    config = load_config("configs/tiny.py", ["model.dtype=bfloat16", "model.vocab_size=1000", "model.d_model=64",
                                             "model.n_layer=1", "model.d_ff=128", "train.batch_size=4",
                                             "train.seq_len=64", *overrides])
    if target is None:
        return compile_train_step(config)[0]
    return compile_train_step(config, list(target.devices), platform=target.platform)[0]


def test_backward_writes_no_float32_scatter_over_the_vocabulary():
    # Autodiff of a take_along_axis target lookup scatters into a float32 [B, T, V] zero array;
    # the hand-written backward is one elementwise expression instead.
    hlo = tiny_step().as_text()
    scatters = [line for line in hlo.splitlines() if "scatter(" in line and ",1024]" in line.split("=")[1][:40]]
    assert scatters == []


def test_chunks_keep_logits_of_the_whole_batch_out_of_memory():
    # Read from the program XLA's GPU compiler writes for an H100, where the memory plan matters:
    # the CPU's plan is another compiler's (on jax 0.10 it keeps float32 copies of bf16 matmul
    # outputs, on 0.12 it does not), so how much chunking saves there is no property of the loss.
    h100 = targets.open_target("h100")
    whole, chunked = tiny_step(target=h100), tiny_step("model.loss_chunk_len=16", target=h100)
    tokens = 4 * 64
    found = vocabulary_buffers(whole.as_text(), 1024, tokens)
    assert found, "the check must see the unchunked logits"
    assert vocabulary_buffers(chunked.as_text(), 1024, tokens) == []
    # One chunk's logits are there: [4, 16, V] (d_model is 64 too, so the [64, V] embedding is no proof).
    assert any(shape == (4, 16, 1024) for _, _, shape in vocabulary_buffers(chunked.as_text(), 1024, 64))
    saved = memory_plan(whole)["temporaries"] - memory_plan(chunked)["temporaries"]
    # At least the bf16 logits and their bf16 gradient of the 3 chunks not alive at once.
    assert saved * 2**30 >= 2 * 2 * (tokens - 4 * 16) * 1024
