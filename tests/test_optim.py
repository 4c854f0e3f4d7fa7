"""Learning-rate schedules and decoupled weight decay on >= 2-D weights only."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gptjax.config import base_config
from gptjax.optim import Schedule, lr_schedule, make_optimizer


def _train_cfg(**kw):
    t = base_config().train
    for k, v in kw.items():
        t[k] = v
    return t


def test_warmup_then_cosine_to_zero():
    t = _train_cfg(lr=2.5e-4, warmup_steps=2000, steps=10000, schedule="cosine", min_lr_ratio=0.0)
    s = lr_schedule(Schedule.of_train(t))
    assert float(s(0)) == 0.0
    assert float(s(1000)) == pytest.approx(1.25e-4)
    assert float(s(2000)) == pytest.approx(2.5e-4)
    mid = 2000 + 4000
    assert float(s(mid)) == pytest.approx(2.5e-4 * 0.5, rel=1e-4)  # cosine is at half height halfway
    assert float(s(10000)) == pytest.approx(0.0, abs=1e-12)


def test_warmup_then_linear_decay_to_floor():
    t = _train_cfg(lr=1e-3, warmup_steps=10, steps=110, schedule="linear", min_lr_ratio=0.1)
    s = lr_schedule(Schedule.of_train(t))
    assert float(s(5)) == pytest.approx(5e-4)
    assert float(s(60)) == pytest.approx(1e-3 - 0.5 * 0.9e-3)
    assert float(s(110)) == pytest.approx(1e-4)


def test_weight_decay_skips_biases_and_gains():
    t = _train_cfg(lr=0.1, warmup_steps=0, steps=10, weight_decay=0.5, grad_clip=0.0)
    params = {"kernel": jnp.ones((2, 3)), "bias": jnp.ones((3,)), "scale": jnp.ones((3,))}
    tx = make_optimizer(t, lr_schedule(Schedule.of_train(t)))
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    # With zero gradients only decoupled decay moves weights: w <- w - lr * wd * w.
    np.testing.assert_allclose(new["kernel"], 1 - 0.1 * 0.5, rtol=1e-6)
    np.testing.assert_array_equal(new["bias"], 1.0)
    np.testing.assert_array_equal(new["scale"], 1.0)



def test_decay_mask_on_the_real_model_skips_every_bias_and_gain():
    from flax import nnx

    from gptjax.config import load_config
    from gptjax.model import init_decoder
    from gptjax.model_config import ModelConfig
    from gptjax.optim import decay_mask

    config = load_config("configs/tiny.py", ["model.n_layer=1"])
    params = nnx.state(init_decoder(ModelConfig.from_config(config.model), 0), nnx.Param)
    flat = {".".join(str(getattr(k, "key", k)) for k in path): v
            for path, v in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(decay_mask(params)))}
    decayed = sorted(name for name, on in flat.items() if on)
    assert decayed == ["blocks.0.attn.out_kernel", "blocks.0.attn.qkv_kernel", "blocks.0.mlp.fc_kernel",
                       "blocks.0.mlp.proj_kernel", "wpe", "wte"]
    assert not flat["blocks.0.attn.qkv_bias"]  # 3-D, but a bias
