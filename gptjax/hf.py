"""Hugging Face interop: GPT-2 (`GPT2LMHeadModel`) and openai-gpt (`OpenAIGPTLMHeadModel`) folders.

    load_hf("path/to/gpt2")                  -> (ModelConfig, Decoder) with the folder's weights
    save_hf(model_config, decoder, "out/")   -> config.json + model.safetensors that transformers loads

What the config.json says of the architecture is `Architecture`'s to map (architecture.py); this
module adds the execution settings the file carries (dropout rates) and moves the weights.

A folder is `config.json` plus `model.safetensors` (read with the safetensors library's numpy
API, no PyTorch), sharded safetensors with their `.index.json`, or `pytorch_model.bin` (needs
PyTorch). Pre-LN gptjax models export as GPT-2, post-LN ones as openai-gpt. Both use the tanh
GELU, the same LayerNorm and 1/sqrt(head_dim) scaling.

Hugging Face's Conv1D keeps weights as [in, out], the orientation of our kernels, so the mapping
is reshapes only: c_attn [d, 3d] -> qkv_kernel [d, 3, heads, head_dim] because the 3d outputs are
q | k | v, each laid out head by head.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import ChainMap
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from gptjax import checkpoint, config as config_lib
from gptjax.architecture import Architecture
from gptjax.errors import UserError
from gptjax.model import Decoder, init_decoder
from gptjax.model_config import ModelConfig

# ---------------------------------------------------------------------------------------------
# safetensors, through the safetensors library's numpy API. It reads BF16 tensors as the numpy
# dtype named "bfloat16", which exists once ml_dtypes is imported, as importing jax.numpy above
# does; so bfloat16 checkpoints need no special case here.

def _not_safetensors(path: str, error: Exception) -> UserError:
    reason = " ".join(str(error).split())  # one line whatever the library's message holds
    return UserError(f"{path} is not a safetensors file, or is truncated or corrupt ({reason})")


class _SafetensorsFile(Mapping):
    """name -> np.ndarray of one safetensors file, each tensor read when it is looked up.

    Reading tensor by tensor keeps a multi-GB checkpoint from being in memory whole next to the
    converted model. The file is opened per lookup rather than held mapped: the header is small,
    and a file truncated or rewritten while mapped can kill the process (SIGBUS) on a later read
    instead of raising.
    """

    def __init__(self, path: str):
        self.path = path
        try:  # safe_open checks the header and that the tensors cover the file exactly
            with safe_open(path, framework="numpy") as f:
                self._names = dict.fromkeys(f.keys())
        except SafetensorError as e:
            raise _not_safetensors(path, e) from None

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._names:
            raise KeyError(name)
        try:
            with safe_open(self.path, framework="numpy") as f:
                return f.get_tensor(name)
        except SafetensorError as e:
            raise _not_safetensors(self.path, e) from None
        except AttributeError:  # a dtype the numpy API has no type for, e.g. the float8 ones
            with safe_open(self.path, framework="numpy") as f:
                dtype = f.get_slice(name).get_dtype()
            raise UserError(f"{self.path}: tensor '{name}' has dtype {dtype}, which gptjax cannot read") from None

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def read_safetensors(path: str) -> Mapping[str, np.ndarray]:
    """name -> array of a safetensors file; a file that is not one is a UserError here, at once."""
    return _SafetensorsFile(path)


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    # The library copies each array's buffer as it lies in memory, so a transposed or sliced view
    # would be written scrambled unless made contiguous first.
    arrays = {name: np.ascontiguousarray(value) for name, value in tensors.items()}
    try:
        save_file(arrays, path, metadata=metadata)
    except SafetensorError as e:  # e.g. a dtype the format has no name for
        raise UserError(f"cannot write {path} as safetensors: {' '.join(str(e).split())}") from None


def _read_torch_bin(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise UserError(f"{path} is a PyTorch file and reading it needs PyTorch: `pip install torch`, or "
                        f"convert the folder to model.safetensors, which gptjax reads without it") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a file it cannot unpickle
        raise UserError(f"{path} cannot be read by torch.load ({type(e).__name__}: {str(e)[:200]})") from None
    # .float() first: numpy has no bfloat16 and this is a one-off conversion to float32 anyway.
    return {k: v.float().numpy() for k, v in state.items() if hasattr(v, "float")}


def read_weights(path: str) -> Mapping[str, np.ndarray]:
    """All tensors of a Hugging Face folder: single-file or sharded, safetensors preferred."""
    for name, reader in (("model.safetensors", read_safetensors), ("pytorch_model.bin", _read_torch_bin)):
        if os.path.isfile(os.path.join(path, name)):
            return reader(os.path.join(path, name))
        index = os.path.join(path, name + ".index.json")
        if os.path.isfile(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            # A view over the shards, so safetensors shards are still read tensor by tensor.
            return ChainMap(*(reader(os.path.join(path, shard)) for shard in shards))
    raise UserError(f"no weights in {path}: expected model.safetensors or pytorch_model.bin "
                    f"(or their sharded .index.json)")


# ---------------------------------------------------------------------------------------------
# Configs.

def read_hf_config(path: str) -> dict | None:
    """The folder's config.json if it describes a Hugging Face model (has `model_type`), else None."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        return None
    values = config_lib.read_json(config_path)
    return values if isinstance(values, dict) and "model_type" in values else None


def model_config_from_hf(hf: dict) -> ModelConfig:
    """The ModelConfig of a Hugging Face GPT-2 / openai-gpt config.json: its architecture, its
    dropout rates, and gptjax's defaults for the other execution settings (the config.json says
    nothing of how to run the weights here); a UserError for a setting gptjax cannot represent."""
    values = config_lib.base_config().model.to_dict()
    # One dropout rate covers embeddings and residual branches here.
    values.update(dataclasses.asdict(Architecture.from_hf_config(hf)),
                  dropout=float(hf.get("resid_pdrop", 0.1)), attn_dropout=float(hf.get("attn_pdrop", 0.1)))
    model_config = ModelConfig.from_config(values)
    config_lib.validate_model(model_config)
    return model_config


def hf_config_from(m: ModelConfig, tokenizer=None) -> dict:
    """config.json for transformers: the architecture's fields, the dropout rates, float32, and the
    tokenizer's special ids."""
    hf = dict(m.architecture().hf_config(), resid_pdrop=m.dropout, embd_pdrop=m.dropout,
              attn_pdrop=m.attn_dropout, torch_dtype="float32", dtype="float32")
    if tokenizer is not None:
        # GPT-2's convention: one end-of-text id serves as both bos and eos. An id the embedding lacks
        # (a token the tokenizer added past the model's rows) is left unnamed.
        ids = dict(bos_token_id=tokenizer.eos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
        hf.update({k: v if v < m.vocab_size else None for k, v in ids.items()})
    else:  # transformers' GPT-2 default of 50256 would point outside a smaller vocabulary
        hf.update(bos_token_id=None, eos_token_id=None)
    return hf


# ---------------------------------------------------------------------------------------------
# Weights: Hugging Face names <-> our flat names (checkpoint.flatten).

def _layer_map(m: ModelConfig) -> list[tuple[str, str, tuple]]:
    """(hf name, our name, hf shape) for every tensor. Where HF's shape differs from ours it is
    the same numbers in the same order (row-major), so a reshape converts either way."""
    d, f = m.d_model, m.d_ff
    gpt2 = m.block == "pre_ln"
    rows = [("wte.weight" if gpt2 else "tokens_embed.weight", "wte", (m.vocab_size, d)),
            ("wpe.weight" if gpt2 else "positions_embed.weight", "wpe", (m.max_len, d))]
    for i in range(m.n_layer):
        theirs, us = f"h.{i}.", f"blocks.{i}."
        rows += [(theirs + "ln_1.weight", us + "ln_1.scale", (d,)), (theirs + "ln_1.bias", us + "ln_1.bias", (d,)),
                 (theirs + "attn.c_attn.weight", us + "attn.qkv_kernel", (d, 3 * d)),  # ours [d, 3, h, d/h]
                 (theirs + "attn.c_attn.bias", us + "attn.qkv_bias", (3 * d,)),  # ours [3, h, d/h]
                 (theirs + "attn.c_proj.weight", us + "attn.out_kernel", (d, d)),  # ours [h, d/h, d]
                 (theirs + "attn.c_proj.bias", us + "attn.out_bias", (d,)),
                 (theirs + "ln_2.weight", us + "ln_2.scale", (d,)), (theirs + "ln_2.bias", us + "ln_2.bias", (d,)),
                 (theirs + "mlp.c_fc.weight", us + "mlp.fc_kernel", (d, f)), (theirs + "mlp.c_fc.bias", us + "mlp.fc_bias", (f,)),
                 (theirs + "mlp.c_proj.weight", us + "mlp.proj_kernel", (f, d)),
                 (theirs + "mlp.c_proj.bias", us + "mlp.proj_bias", (d,))]
    if gpt2:
        rows += [("ln_f.weight", "ln_f.scale", (d,)), ("ln_f.bias", "ln_f.bias", (d,))]
    return rows


def _abstract(m: ModelConfig):
    return nnx.split(nnx.eval_shape(lambda: init_decoder(m, 0)), nnx.Param)


def load_hf(path: str) -> tuple[ModelConfig, Decoder]:
    """(ModelConfig, Decoder holding the folder's weights) for a GPT-2 / openai-gpt folder."""
    hf = read_hf_config(path)
    if hf is None:
        raise UserError(f"{path} is not a Hugging Face model folder (no config.json with a model_type)")
    m = model_config_from_hf(hf)
    # GPT2LMHeadModel saves "transformer.h.0...", GPT2Model "h.0...": accept both. Buffers
    # (attn.bias, attn.masked_bias) and the tied lm_head.weight are simply never looked up.
    tensors = read_weights(path)
    names = {k.removeprefix("transformer."): k for k in tensors}
    graphdef, like = _abstract(m)
    ours_shapes = {k: v.shape for k, v in checkpoint.flatten(like).items()}
    flat = {}
    for hf_name, ours, shape in _layer_map(m):
        if hf_name not in names:
            raise UserError(f"{path} lacks the weight '{hf_name}' that a {hf['model_type']} model with "
                            f"{m.n_layer} layers has; is the folder complete?")
        value = np.asarray(tensors[names[hf_name]], np.float32)
        if value.shape != shape:
            raise UserError(f"{path}: weight '{hf_name}' has shape {value.shape} but config.json implies {shape}")
        if ours == "wte":  # our embedding has extra rows up to a multiple of vocab_pad_multiple
            value = np.pad(value, ((0, ours_shapes["wte"][0] - shape[0]), (0, 0)))
        flat[ours] = jnp.asarray(value.reshape(ours_shapes[ours]))
    return m, nnx.merge(graphdef, checkpoint.unflatten(flat, like))


def save_hf(model_config: ModelConfig, module: Decoder, path: str, tokenizer=None) -> None:
    """Writes `path`/config.json and model.safetensors that transformers' from_pretrained loads."""
    if os.path.exists(os.path.join(path, "model.safetensors")):
        raise UserError(f"{path} already holds a model.safetensors; export to a new directory")
    hf = hf_config_from(model_config, tokenizer)
    flat = checkpoint.flatten(nnx.state(module, nnx.Param))
    tensors = {}
    for hf_name, ours, shape in _layer_map(model_config):
        value = np.asarray(jax.device_get(flat[ours]), np.float32)
        if ours == "wte":
            value = value[: model_config.vocab_size]  # drop our padding rows
        # The prefix GPT2LMHeadModel.save_pretrained writes; lm_head.weight is tied and left out as it does.
        tensors["transformer." + hf_name] = value.reshape(shape)
    os.makedirs(path, exist_ok=True)
    write_safetensors(os.path.join(path, "model.safetensors"), tensors, {"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
        f.write("\n")
    if hasattr(tokenizer, "save_pretrained"):  # a Hugging Face tokenizer: its own files
        tokenizer.save_pretrained(path)
    elif tokenizer is not None:
        # The SentencePiece model itself, and the same tokenizer as tokenizer.json with the same
        # ids, which transformers.AutoTokenizer loads.
        from gptjax.data import sp_export
        tokenizer.save(os.path.join(path, "tokenizer.model"))
        sp_export.save_pretrained(tokenizer, path)
