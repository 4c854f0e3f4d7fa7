"""The Python API: from_config overrides, save / from_pretrained round trip, logits, generate."""

import numpy as np
import pytest

from gptjax import GPT
from gptjax.errors import UserError

SMALL = {"model.n_layer": 2, "model.d_model": 32, "model.n_head": 2, "model.d_ff": 64, "model.max_len": 24,
         "model.vocab_size": 97, "train.seq_len": 24}


def test_from_config_overrides_in_both_forms():
    a = GPT.from_config("configs/tiny.py", **SMALL)
    b = GPT.from_config("configs/tiny.py", model=dict(n_layer=2, d_model=32, n_head=2, d_ff=64, max_len=24,
                                                       vocab_size=97), train=dict(seq_len=24))
    assert a.config.to_dict() == b.config.to_dict()
    assert a.num_params() == b.num_params()
    # 128 padded vocab rows x 32 + 24 x 32 positions + 2 blocks + final LN.
    per_block = 32 * 96 + 96 + 32 * 32 + 32 + 32 * 64 + 64 + 64 * 32 + 32 + 4 * 32
    assert a.num_params() == 128 * 32 + 24 * 32 + 2 * per_block + 2 * 32
    with pytest.raises(UserError, match="unknown config key 'model.layers'"):
        GPT.from_config("configs/tiny.py", model=dict(layers=2))


def test_save_and_from_pretrained_round_trip(tmp_path):
    model = GPT.from_config("configs/tiny.py", seed=3, **SMALL)
    tokens = np.random.default_rng(0).integers(0, 97, size=(2, 24))
    logits = np.asarray(model.logits(tokens))
    assert logits.shape == (2, 24, 97) and logits.dtype == np.float32
    model.save(str(tmp_path / "m"))
    again = GPT.from_pretrained(str(tmp_path / "m"))
    np.testing.assert_array_equal(np.asarray(again.logits(tokens)), logits)
    assert again.config.to_dict() == model.config.to_dict()
    with pytest.raises(UserError, match="already holds checkpoints"):
        model.save(str(tmp_path / "m"))
    # A different seed is a different model: the round trip above is not trivially equal.
    other = GPT.from_config("configs/tiny.py", seed=4, **SMALL)
    assert not np.allclose(np.asarray(other.logits(tokens)), logits)


def test_input_errors():
    model = GPT.from_config("configs/tiny.py", **SMALL)
    with pytest.raises(UserError, match="exceed the context of 24"):
        model.logits(np.zeros((1, 25), np.int32))
    with pytest.raises(UserError, match=r"\[batch, time\]"):
        model.logits(np.zeros((25,), np.int32))
    with pytest.raises(UserError, match="no tokenizer"):
        model.generate("text without a tokenizer")
    with pytest.raises(UserError, match="not a gptjax workdir"):
        GPT.from_pretrained("/nonexistent/run")


def test_generate_token_ids():
    model = GPT.from_config("configs/tiny.py", **SMALL)
    out = model.generate([5, 6, 7], max_new_tokens=4, temperature=0)
    assert len(out) == 4 and all(0 <= t < 97 for t in out)
    batch = model.generate([[5, 6, 7], [8]], max_new_tokens=4, temperature=0)
    assert batch[0] == out
