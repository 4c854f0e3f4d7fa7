"""`Architecture`: its defaults and fields against the schema and ModelConfig, and its mapping to
and from Hugging Face config.json (no transformers needed; tests/test_hf.py checks what
transformers makes of it)."""

import dataclasses

import pytest

from gptjax import config, hf
from gptjax.architecture import Architecture
from gptjax.errors import UserError
from gptjax.model_config import ARCHITECTURE_FIELDS, EXECUTION_FIELDS, ModelConfig

# The config.json files of the released gpt2-medium and openai-gpt, as transformers writes them.
GPT2_MEDIUM = {"activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
               "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02,
               "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 1024, "n_embd": 1024, "n_head": 16,
               "n_layer": 24, "n_positions": 1024, "n_special": 0, "predict_special_tokens": True,
               "resid_pdrop": 0.1, "summary_activation": None, "summary_first_dropout": 0.1,
               "summary_proj_to_labels": True, "summary_type": "cls_index", "summary_use_proj": True,
               "vocab_size": 50257}
OPENAI_GPT = {"afn": "gelu", "architectures": ["OpenAIGPTLMHeadModel"], "attn_pdrop": 0.1, "embd_pdrop": 0.1,
              "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "model_type": "openai-gpt", "n_ctx": 512,
              "n_embd": 768, "n_head": 12, "n_layer": 12, "n_positions": 512, "n_special": 0,
              "predict_special_tokens": True, "resid_pdrop": 0.1, "summary_activation": None,
              "summary_first_dropout": 0.1, "summary_proj_to_labels": True, "summary_type": "cls_index",
              "summary_use_proj": True, "vocab_size": 40478}


def test_defaults_are_the_schema_defaults_field_by_field():
    schema = config.base_config().model
    fields = dataclasses.fields(Architecture)
    for f in fields:
        assert f.default == schema[f.name] and type(f.default) is type(schema[f.name]), f.name
    assert Architecture() == ModelConfig.from_config(schema).architecture()


def test_fields_are_model_configs_architecture_fields_with_their_types():
    types = {f.name: f.type for f in dataclasses.fields(ModelConfig)}
    assert {f.name for f in dataclasses.fields(Architecture)} == set(ARCHITECTURE_FIELDS)
    assert set(ARCHITECTURE_FIELDS) | set(EXECUTION_FIELDS) == set(types)
    assert not set(ARCHITECTURE_FIELDS) & set(EXECUTION_FIELDS)
    for f in dataclasses.fields(Architecture):
        assert f.type is types[f.name], f.name


def test_frozen_hashable_and_typed_as_model_config_is():
    arch = Architecture(n_layer=2, ln_eps=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        arch.n_layer = 3
    assert type(arch.ln_eps) is float and arch == Architecture(n_layer=2, ln_eps=1.0)
    assert hash(arch) == hash(Architecture(n_layer=2, ln_eps=1.0))
    for key, bad in (("n_layer", 2.0), ("n_layer", True), ("scale_residual_init", 1), ("block", None)):
        with pytest.raises(UserError, match=f"model.{key} expects"):
            Architecture(**{key: bad})


def test_model_configs_architecture_is_the_typed_value():
    mc = ModelConfig.from_config(config.base_config().model)
    assert isinstance(mc.architecture(), Architecture)
    assert dataclasses.replace(mc, dropout=0.3, dtype="float32").architecture() == mc.architecture()
    assert dataclasses.replace(mc, d_ff=64).architecture() == Architecture(d_ff=64)


def test_gpt2_config():
    assert Architecture.from_hf_config(GPT2_MEDIUM) == Architecture(
        block="pre_ln", vocab_size=50257, n_layer=24, n_head=16, d_model=1024, d_ff=4096, max_len=1024,
        init_std=0.02, scale_residual_init=True, ln_eps=1e-5)
    wide = dict(GPT2_MEDIUM, n_inner=3000, layer_norm_epsilon=1e-6, initializer_range=0.05)
    assert Architecture.from_hf_config(wide) == Architecture(
        vocab_size=50257, n_layer=24, n_head=16, d_model=1024, d_ff=3000, ln_eps=1e-6, init_std=0.05)
    # Newer configs may name the sizes generically.
    generic = {"model_type": "gpt2", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
               "max_position_embeddings": 32, "vocab_size": 100}
    assert Architecture.from_hf_config(generic) == Architecture(
        vocab_size=100, n_layer=2, n_head=4, d_model=64, d_ff=256, max_len=32)


def test_openai_gpt_config():
    assert Architecture.from_hf_config(OPENAI_GPT) == Architecture(
        block="post_ln", vocab_size=40478, n_layer=12, n_head=12, d_model=768, d_ff=3072, max_len=512,
        init_std=0.02, scale_residual_init=False, ln_eps=1e-5)


@pytest.mark.parametrize("arch", [
    Architecture(),
    Architecture(vocab_size=99, n_layer=2, n_head=4, d_model=32, d_ff=48, max_len=16, init_std=0.05, ln_eps=1e-6),
    Architecture(block="post_ln", vocab_size=99, n_layer=3, n_head=2, d_model=32, d_ff=128, max_len=24,
                 scale_residual_init=False),
])
def test_round_trip_through_the_hf_config(arch):
    assert Architecture.from_hf_config(arch.hf_config()) == arch


def test_what_hugging_face_has_no_field_for_comes_back_as_gptjax_gives_it():
    # Only the initialisation and gptjax's padding rows differ: the exported weights are the same.
    assert Architecture.from_hf_config(Architecture(vocab_pad_multiple=8).hf_config()) == Architecture()
    assert Architecture.from_hf_config(Architecture(scale_residual_init=False).hf_config()) == Architecture()


@pytest.mark.parametrize("values, message", [
    ({"model_type": "llama"}, "unsupported Hugging Face model_type 'llama': gptjax reads gpt2 and openai-gpt"),
    ({"model_type": None}, "unsupported Hugging Face model_type 'None'"),
    ({"activation_function": "gelu"}, "activation 'gelu' is not supported: gptjax's MLP uses the tanh GELU"),
    ({"scale_attn_weights": False}, "scale_attn_weights=False is not supported"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=True is not supported"),
    ({"add_cross_attention": True}, "add_cross_attention=True is not supported"),
    ({"tie_word_embeddings": False}, "tie_word_embeddings=False is not supported"),
    ({"n_layer": None}, "config.json has no 'n_layer'"),
    ({"n_layer": "24"}, "model.n_layer expects int, got '24'"),
    ({"model_type": "openai-gpt", "afn": "relu"}, "activation 'relu' is not supported"),
])
def test_unsupported_hf_settings_are_user_errors(values, message):
    with pytest.raises(UserError, match=message):
        Architecture.from_hf_config(dict(GPT2_MEDIUM, **values))


def test_post_ln_with_another_mlp_width_has_no_openai_gpt_config():
    with pytest.raises(UserError, match="openai-gpt has no MLP-width setting"):
        Architecture(block="post_ln", d_ff=1000).hf_config()


def test_the_folders_model_config_adds_its_dropout_and_gptjaxs_execution_defaults():
    mc = hf.model_config_from_hf(dict(OPENAI_GPT, resid_pdrop=0.2, attn_pdrop=0.05))
    assert mc.architecture() == Architecture.from_hf_config(OPENAI_GPT)
    assert (mc.dropout, mc.attn_dropout) == (0.2, 0.05)
    defaults = config.base_config().model
    assert all(getattr(mc, key) == defaults[key] for key in EXECUTION_FIELDS if "dropout" not in key)
    with pytest.raises(UserError, match=r"model.d_model \(30\) must be divisible by model.n_head \(4\)"):
        hf.model_config_from_hf(dict(GPT2_MEDIUM, n_embd=30, n_head=4))
