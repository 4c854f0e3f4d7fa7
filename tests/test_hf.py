"""Hugging Face interop: the safetensors reader/writer, GPT-2 / openai-gpt import and export,
`gptjax convert`, and the errors a user can run into.

The parity tests build random-weight models with `transformers` on PyTorch (CPU, float32) and
are skipped where those are not installed; the other tests need neither.
"""

import dataclasses
import json
import struct

import jax
import numpy as np
import pytest
from flax import nnx

from gptjax import GPT, cli, hf
from gptjax.errors import UserError

SMALL = dict(n_layer=2, d_model=32, n_head=4, d_ff=128, max_len=16, vocab_size=99)
TOKENS = np.random.default_rng(0).integers(0, 99, size=(2, 16))
HF_SMALL = dict(vocab_size=99, n_positions=16, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)


def ours(block: str, seed: int = 0) -> GPT:
    """A small gptjax model whose every parameter is random, LayerNorms and biases included, so a
    mix-up of any two tensors in the mapping changes the logits."""
    model = GPT.from_config("configs/tiny.py", seed=seed, model=dict(SMALL, block=block), train=dict(seq_len=16))
    params = nnx.state(model.module, nnx.Param)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    noisy = [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    nnx.update(model.module, jax.tree.unflatten(tree, noisy))
    return model


def flat_params(model: GPT) -> dict:
    from gptjax.checkpoint import flatten
    return {k: np.asarray(v) for k, v in flatten(nnx.state(model.module, nnx.Param)).items()}


# --- safetensors ------------------------------------------------------------------------------

def test_reader_follows_the_safetensors_format(tmp_path):
    # Built by hand from the format (u64 LE header size, JSON header, raw LE bytes), not by our writer.
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([0.5, -1.0, 2.0, 65504.0], np.float16)
    bf16 = np.array([0x3F80, 0xC000], np.uint16)  # bfloat16 bit patterns of 1.0 and -2.0
    header = {"__metadata__": {"format": "pt"},
              "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
              "b": {"dtype": "F16", "shape": [4], "data_offsets": [24, 32]},
              "c": {"dtype": "BF16", "shape": [2], "data_offsets": [32, 36]}}
    blob = json.dumps(header).encode()
    path = tmp_path / "t.safetensors"
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + a.tobytes() + b.tobytes() + bf16.tobytes())
    t = hf.read_safetensors(str(path))
    assert sorted(t) == ["a", "b", "c"]
    np.testing.assert_array_equal(t["a"], a)
    assert t["b"].dtype == np.float16 and t["b"].tolist() == [0.5, -1.0, 2.0, 65504.0]
    assert np.asarray(t["c"], np.float32).tolist() == [1.0, -2.0]


def test_writer_round_trip_and_layout(tmp_path):
    import jax.numpy as jnp
    rng = np.random.default_rng(1)
    square = rng.normal(size=(4, 6)).astype(np.float32)
    tensors = {"w": rng.normal(size=(3, 5)).astype(np.float32), "h": rng.normal(size=(7,)).astype(np.float16),
               "bf": rng.normal(size=(2, 2)).astype(jnp.bfloat16), "i": np.arange(3, dtype=np.int64),
               "empty": np.zeros((0, 4), np.float32),
               "transposed": square.T, "strided": square[:, ::2]}  # views, not contiguous buffers
    path = tmp_path / "w.safetensors"
    hf.write_safetensors(str(path), tensors, {"format": "pt"})
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0, "tensor data should start 8-byte aligned"
    header = json.loads(raw[8:8 + n])
    assert header["__metadata__"] == {"format": "pt"}
    assert header["w"]["dtype"] == "F32" and header["w"]["shape"] == [3, 5]
    assert header["bf"]["dtype"] == "BF16" and header["transposed"]["shape"] == [6, 4]
    assert len(raw) == 8 + n + sum(a.nbytes for a in tensors.values())
    back = hf.read_safetensors(str(path))
    assert sorted(back) == sorted(tensors)
    for name, value in tensors.items():
        assert back[name].dtype == value.dtype and back[name].shape == value.shape
        np.testing.assert_array_equal(np.asarray(back[name], np.float64), np.asarray(value, np.float64))


def test_our_file_reads_in_pytorch(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors import safe_open
    from safetensors.torch import load_file
    import jax.numpy as jnp
    w = np.random.default_rng(2).normal(size=(3, 4)).astype(np.float32)
    path = str(tmp_path / "w.safetensors")
    hf.write_safetensors(path, {"w": w, "wt": w.T, "bf": np.array([1.0, -2.5], jnp.bfloat16)}, {"format": "pt"})
    back = load_file(path)
    np.testing.assert_array_equal(back["w"].numpy(), w)
    np.testing.assert_array_equal(back["wt"].numpy(), w.T)
    assert back["bf"].dtype == torch.bfloat16 and back["bf"].float().tolist() == [1.0, -2.5]
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"format": "pt"}  # transformers refuses a file without it


def test_truncated_or_foreign_files_are_user_errors(tmp_path):
    path = tmp_path / "w.safetensors"
    hf.write_safetensors(str(path), {"w": np.ones((4, 4), np.float32)})
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(UserError, match="is not a safetensors file, or is truncated or corrupt") as truncated:
        hf.read_safetensors(str(path))
    path.write_bytes(b"PK\x03\x04 this is a zip, not safetensors")
    with pytest.raises(UserError, match="is not a safetensors file") as foreign:
        hf.read_safetensors(str(path))
    for error in (truncated, foreign):
        assert "\n" not in str(error.value) and str(path) in str(error.value)
    with pytest.raises(UserError, match="cannot write .* as safetensors"):
        hf.write_safetensors(str(tmp_path / "c.safetensors"), {"c": np.zeros(2, np.complex128)})


# --- export -> import, no PyTorch --------------------------------------------------------------

@pytest.mark.parametrize("block, model_type", [("pre_ln", "gpt2"), ("post_ln", "openai-gpt")])
def test_export_then_import_gives_back_the_same_model(tmp_path, block, model_type):
    model = ours(block)
    hf.save_hf(model.model_config, model.module, str(tmp_path / "hf"))
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert written["model_type"] == model_type and written["n_embd"] == 32 and written["vocab_size"] == 99
    names = hf.read_safetensors(str(tmp_path / "hf" / "model.safetensors"))
    embed = "transformer.wte.weight" if block == "pre_ln" else "transformer.tokens_embed.weight"
    assert names[embed].shape == (99, 32) and names["transformer.h.1.attn.c_attn.weight"].shape == (32, 96)
    assert ("transformer.ln_f.weight" in names) == (block == "pre_ln")

    again = GPT.from_pretrained(str(tmp_path / "hf"))
    for key in SMALL:
        assert again.config.model[key] == model.config.model[key], key
    assert again.config.model.block == block
    # openai-gpt has no residual-init scaling, and this tiny post-LN model was initialised with it
    assert again.model_config.architecture() == dataclasses.replace(model.model_config.architecture(),
                                                                     scale_residual_init=block == "pre_ln")
    # The run config built around the folder's weights: named for its kind, valid, and its row length
    # the weights' context (the schema's default of 1024 would exceed it).
    assert again.config.name == f"hf-{model_type}" and again.config.train.seq_len == 16
    assert again.flops_per_token() == again.module.flops_per_token(16)
    a, b = flat_params(model), flat_params(again)
    assert sorted(a) == sorted(b)
    for name in a:
        if name == "wte":  # the padding rows beyond the vocabulary are not exported; they come back as 0
            np.testing.assert_array_equal(b[name][:99], a[name][:99])
            assert not b[name][99:].any()
        else:
            np.testing.assert_array_equal(b[name], a[name], err_msg=name)
    np.testing.assert_array_equal(np.asarray(again.logits(TOKENS)), np.asarray(model.logits(TOKENS)))


def test_sharded_safetensors_folder(tmp_path):
    model = ours("pre_ln", seed=3)
    hf.save_hf(model.model_config, model.module, str(tmp_path))
    whole = tmp_path / "model.safetensors"
    tensors = {k: np.array(v) for k, v in hf.read_safetensors(str(whole)).items()}
    whole.unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        hf.write_safetensors(str(tmp_path / shard), {k: tensors[k] for k in keys}, {"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    again = GPT.from_pretrained(str(tmp_path))
    np.testing.assert_array_equal(np.asarray(again.logits(TOKENS)), np.asarray(model.logits(TOKENS)))


def test_convert_command_round_trip(tmp_path, capsys):
    model = ours("pre_ln", seed=5)
    model.save(str(tmp_path / "run"))
    assert cli.main(["convert", "--from", str(tmp_path / "run"), "--to-hf", str(tmp_path / "hf")]) == 0
    assert "GPT2LMHeadModel" in capsys.readouterr().out
    assert cli.main(["convert", "--from-hf", str(tmp_path / "hf"), "--to", str(tmp_path / "back")]) == 0
    back = GPT.from_pretrained(str(tmp_path / "back"))  # a plain gptjax workdir again
    assert (tmp_path / "back" / "checkpoints" / "0").is_dir()
    np.testing.assert_array_equal(np.asarray(back.logits(TOKENS)), np.asarray(model.logits(TOKENS)))

    capsys.readouterr()
    assert cli.main(["convert", "--from", str(tmp_path / "run"), "--to-hf", str(tmp_path / "hf")]) == 2
    assert "already holds a model.safetensors" in capsys.readouterr().err
    assert cli.main(["convert", "--from-hf", str(tmp_path / "run"), "--to", str(tmp_path / "x")]) == 2
    assert "is not a Hugging Face model folder" in capsys.readouterr().err
    assert cli.main(["convert", "--from-hf", str(tmp_path / "hf"), "--to-hf", str(tmp_path / "y")]) == 2
    assert "convert takes --from-hf DIR --to WORKDIR, or --from WORKDIR --to-hf DIR" in capsys.readouterr().err


# --- errors --------------------------------------------------------------------------------

def write_config(folder, **values):
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(dict({"model_type": "gpt2", **HF_SMALL}, **values)))
    return str(folder)


@pytest.mark.parametrize("values, message", [
    ({"model_type": "llama"}, "unsupported Hugging Face model_type 'llama': gptjax reads gpt2 and openai-gpt"),
    ({"activation_function": "relu"}, "activation 'relu' is not supported"),
    ({"activation_function": "gelu"}, "activation 'gelu' is not supported"),  # GPT-2's "gelu" is the erf form
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=True is not supported"),
    ({"tie_word_embeddings": False}, "tie_word_embeddings=False is not supported"),
    ({"n_embd": None}, "config.json has no 'n_embd'"),
    ({"n_embd": 30}, r"model.d_model \(30\) must be divisible by model.n_head \(4\)"),  # before any weights are read
    ({}, "no weights in .*: expected model.safetensors or pytorch_model.bin"),
])
def test_unusable_folders_are_user_errors(tmp_path, values, message):
    with pytest.raises(UserError, match=message):
        GPT.from_pretrained(write_config(tmp_path / "m", **values))


def test_missing_or_misshapen_weight(tmp_path):
    model = ours("pre_ln")
    hf.save_hf(model.model_config, model.module, str(tmp_path / "hf"))
    path = tmp_path / "hf" / "model.safetensors"
    tensors = {k: np.array(v) for k, v in hf.read_safetensors(str(path)).items()}
    tensors["transformer.h.1.mlp.c_fc.bias"] = np.zeros(7, np.float32)
    hf.write_safetensors(str(path), tensors)
    with pytest.raises(UserError, match=r"'h.1.mlp.c_fc.bias' has shape \(7,\) but config.json implies \(128,\)"):
        GPT.from_pretrained(str(tmp_path / "hf"))
    del tensors["transformer.h.1.mlp.c_fc.bias"]
    hf.write_safetensors(str(path), tensors)
    with pytest.raises(UserError, match="lacks the weight 'h.1.mlp.c_fc.bias'"):
        GPT.from_pretrained(str(tmp_path / "hf"))
    with pytest.raises(UserError, match="has no steps"):
        GPT.from_pretrained(str(tmp_path / "hf"), step=3)


def test_pytorch_file_without_pytorch_says_what_to_install(tmp_path, monkeypatch):
    folder = write_config(tmp_path / "m")
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"\0")
    monkeypatch.setitem(__import__("sys").modules, "torch", None)  # makes `import torch` fail
    with pytest.raises(UserError, match=r"needs PyTorch: `pip install torch`, or convert .* to model.safetensors"):
        GPT.from_pretrained(folder)


def test_post_ln_export_needs_openai_gpt_mlp_width(tmp_path):
    model = GPT.from_config("configs/tiny.py", model=dict(SMALL, block="post_ln", d_ff=96), train=dict(seq_len=16))
    with pytest.raises(UserError, match="openai-gpt has no MLP-width setting"):
        hf.save_hf(model.model_config, model.module, str(tmp_path / "hf"))


# --- parity with transformers (PyTorch, CPU, float32) -------------------------------------

def hf_model(model_type: str):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if model_type == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**HF_SMALL))
    else:
        model = transformers.OpenAIGPTLMHeadModel(transformers.OpenAIGPTConfig(**HF_SMALL, afn="gelu"))
    with torch.no_grad():  # every tensor random, LayerNorms and biases included (not 1 / 0)
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if ".ln_" in name and name.endswith("weight") else 0.0))
    return torch, model.eval()


def torch_logits(torch, model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float().numpy()


@pytest.mark.parametrize("model_type, file", [("gpt2", "safetensors"), ("openai-gpt", "safetensors"),
                                              ("gpt2", "bin"), ("openai-gpt", "bin")])
def test_transformers_checkpoint_gives_the_same_logits(tmp_path, model_type, file):
    torch, model = hf_model(model_type)
    model.save_pretrained(str(tmp_path))
    if file == "bin":  # the older PyTorch format, which recent transformers no longer writes itself
        (tmp_path / "model.safetensors").unlink()
        torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    ref = torch_logits(torch, model, TOKENS)
    ours_model = GPT.from_pretrained(str(tmp_path))
    assert ours_model.config.model.block == ("pre_ln" if model_type == "gpt2" else "post_ln")
    diff = np.abs(np.asarray(ours_model.logits(TOKENS)) - ref).max()
    assert diff < 1e-4, diff
    assert np.abs(ref).max() > 1.0  # the logits are far from zero, so the bound above means something


@pytest.mark.parametrize("block, arch", [("pre_ln", "GPT2LMHeadModel"), ("post_ln", "OpenAIGPTLMHeadModel")])
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, block, arch):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = ours(block, seed=2)
    hf.save_hf(model.model_config, model.module, str(tmp_path))
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), output_loading_info=True)
    assert type(loaded).__name__ == arch
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert next(loaded.parameters()).dtype == torch.float32
    ref = torch_logits(torch, loaded.eval(), TOKENS)
    diff = np.abs(np.asarray(model.logits(TOKENS)) - ref).max()
    assert diff < 1e-4, diff
    assert np.abs(ref).max() > 1.0
