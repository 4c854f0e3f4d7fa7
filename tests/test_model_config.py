import dataclasses
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from gptjax import config, model_config
from gptjax.errors import UserError
from gptjax.model import init_decoder, init_task_model
from gptjax.model_config import ModelConfig

# Small enough to build in a blink; every dimension differs, so a swapped one shows in the shapes.
TINY = dict(vocab_size=97, vocab_pad_multiple=64, n_layer=2, n_head=4, d_model=32, d_ff=48, max_len=24,
            dtype="float32", attention="xla")


def tiny_section() -> ml_collections.ConfigDict:
    c = config.base_config()
    c.model.update(**TINY)
    c.train.seq_len = TINY["max_len"]
    config.validate(c)
    return c.model


def test_fields_are_exactly_the_schema_model_fields_with_their_types():
    schema = config.base_config().model
    fields = dataclasses.fields(ModelConfig)
    assert {f.name for f in fields} == set(schema.keys())
    # ConfigDict sorts its keys; FIELD_DOCS keeps the schema's own order, which the class follows.
    assert [f"model.{f.name}" for f in fields] == [key for key in config.FIELD_DOCS if key.startswith("model.")]
    for f in fields:
        assert f.type is type(schema[f.name]), f.name


def test_field_docs_are_the_schema_docs():
    config.base_config()  # FIELD_DOCS fills as the schema is built
    docs = {f"model.{f.name}": f.metadata["doc"] for f in dataclasses.fields(ModelConfig)}
    assert docs == {key: doc for key, doc in config.FIELD_DOCS.items() if key.startswith("model.")}


def test_from_config_takes_a_config_dict_or_a_plain_dict_alike():
    section = tiny_section()
    mc = ModelConfig.from_config(section)
    assert ModelConfig.from_config(section.to_dict()) == mc
    assert dataclasses.asdict(mc) == section.to_dict()
    assert ModelConfig.from_config(config.base_config().model).n_layer == 12


def test_frozen():
    mc = ModelConfig.from_config(tiny_section())
    with pytest.raises(dataclasses.FrozenInstanceError):
        mc.n_layer = 3
    assert dataclasses.replace(mc, n_layer=3).n_layer == 3 and mc.n_layer == 2


def test_hashable_and_usable_as_a_static_jit_argument():
    a, b = ModelConfig.from_config(tiny_section()), ModelConfig.from_config(tiny_section())
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert dataclasses.replace(a, d_ff=64) != a

    traces = []

    def scale(x, *, cfg):
        traces.append(cfg)
        return x * cfg.d_model

    width = jax.jit(scale, static_argnames="cfg")
    assert int(width(np.int32(2), cfg=a)) == 64
    width(np.int32(3), cfg=b)  # equal config: the cached trace, no second one
    assert len(traces) == 1


def test_unknown_key_is_a_user_error_naming_it():
    section = tiny_section()
    with section.unlocked():
        section.n_layers = 2
    with pytest.raises(UserError, match="'n_layers'"):
        ModelConfig.from_config(section)
    with pytest.raises(UserError, match="'heads'"):
        ModelConfig.from_config(dict(tiny_section().to_dict(), heads=2))


def test_missing_key_and_wrong_type_are_user_errors_naming_them():
    values = tiny_section().to_dict()
    del values["d_ff"]
    with pytest.raises(UserError, match="'d_ff'"):
        ModelConfig.from_config(values)
    for key, bad in (("n_layer", 2.0), ("n_layer", True), ("scale_residual_init", 1), ("block", None)):
        with pytest.raises(UserError, match=f"model.{key}"):
            ModelConfig.from_config(dict(tiny_section().to_dict(), **{key: bad}))


def test_an_int_for_a_float_field_is_stored_as_that_float():
    # A config.json written with dropout 0 (an int in JSON) is the same model as dropout 0.0.
    mc = ModelConfig.from_config(dict(tiny_section().to_dict(), dropout=0, ln_eps=1))
    assert type(mc.dropout) is float and type(mc.ln_eps) is float
    assert mc == dataclasses.replace(ModelConfig.from_config(tiny_section()), ln_eps=1.0)


def test_derived_sizes():
    mc = ModelConfig.from_config(tiny_section())
    assert mc.padded_vocab == config.padded_vocab_size(97, 64) == 128
    assert mc.head_dim == 8
    gpt2 = ModelConfig.from_config(config.gpt2_config("small", 12, 12, 768, 6e-4, 512).model)
    assert (gpt2.padded_vocab, gpt2.head_dim) == (50304, 64)


def test_the_model_takes_only_a_model_config():
    with pytest.raises(TypeError, match="ModelConfig.from_config"):
        init_decoder(tiny_section(), 0)


def _params(module) -> dict:
    return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(module, nnx.Param)))}


def test_builds_from_one_section_are_bitwise_equal_and_shaped_by_the_config():
    a = _params(init_decoder(ModelConfig.from_config(tiny_section()), 0))
    b = _params(init_decoder(ModelConfig.from_config(tiny_section().to_dict()), 0))
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].tobytes() == b[name].tobytes(), name

    mc = ModelConfig.from_config(tiny_section())
    d, h, hd, f = mc.d_model, mc.n_head, mc.head_dim, mc.d_ff
    shapes = {name.split("/", 2)[-1] if name.startswith("blocks/") else name: v.shape for name, v in a.items()}
    assert shapes == {
        "wte": (mc.padded_vocab, d), "wpe": (mc.max_len, d), "ln_f/scale": (d,), "ln_f/bias": (d,),
        "ln_1/scale": (d,), "ln_1/bias": (d,), "ln_2/scale": (d,), "ln_2/bias": (d,),
        "attn/qkv_kernel": (d, 3, h, hd), "attn/qkv_bias": (3, h, hd), "attn/out_kernel": (h, hd, d),
        "attn/out_bias": (d,), "mlp/fc_kernel": (d, f), "mlp/fc_bias": (f,), "mlp/proj_kernel": (f, d),
        "mlp/proj_bias": (d,)}
    assert {name.split("/")[1] for name in a if name.startswith("blocks/")} == {str(i) for i in range(mc.n_layer)}

    task = init_task_model(mc, 3, "single", 0)
    assert task.head_kernel.shape == (d, 3)
    # The task model's decoder is the same decoder: same seed, same params.
    for name, value in _params(task.decoder).items():
        assert value.tobytes() == a[name].tobytes(), name


def test_model_config_imports_no_jax_and_no_model_side_module():
    code = ("import sys, gptjax.model_config; "
            "print(sorted(m for m in ('jax', 'flax', 'gptjax.model', 'gptjax.sharding', 'gptjax.train') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# For each field, a value other than TINY's (valid with the rest of TINY).
_OTHER = dict(block="post_ln", vocab_size=200, vocab_pad_multiple=8, n_layer=1, n_head=2, d_model=40, d_ff=56, max_len=16,
              init_std=0.05, scale_residual_init=False, ln_eps=0.5, dropout=0.3, attn_dropout=0.2, dtype="bfloat16",
              attention="cudnn", remat="full", loss_chunk_len=8)


def _logits(module, tokens):
    return np.asarray(module.lm_logits(module(tokens)), np.float32)


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(ModelConfig)])
def test_each_field_is_of_the_kind_its_effect_on_the_weights_says(name):
    """An architecture field changes the initial weights (shapes or values) or what they compute
    in float32; an execution field changes neither, so it may change on resume."""
    base = ModelConfig.from_config(tiny_section())
    other = dataclasses.replace(base, **{name: _OTHER[name]})
    run = config.base_config()
    run.model.update(**dict(TINY, **{name: _OTHER[name]}))
    run.train.seq_len = min(TINY["max_len"], run.model.max_len)
    config.validate(run)  # a value a user may set
    assert other != base
    a, b = _params(init_decoder(base, 0)), _params(init_decoder(other, 0))
    same_weights = a.keys() == b.keys() and all(a[k].shape == b[k].shape and np.array_equal(a[k], b[k]) for k in a)
    if name in model_config.EXECUTION_FIELDS:
        assert same_weights and other.architecture() == base.architecture(), name
        return
    assert other.architecture() != base.architecture(), name
    if same_weights:  # only what the weights compute can tell (ln_eps)
        tokens = np.arange(12, dtype=np.int32).reshape(1, 12) % 90
        assert not np.allclose(_logits(init_decoder(base, 0), tokens), _logits(init_decoder(other, 0), tokens)), name
