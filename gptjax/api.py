"""The Python API: `gptjax.GPT`.

    model = gptjax.GPT.from_pretrained("runs/demo")
    model.generate("the cat", max_new_tokens=20)
    model.logits(tokens)   # float32 [B, T, vocab_size]
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptjax import checkpoint, config as config_lib, run_folder
from gptjax.data import tokenizer_files
from gptjax.errors import UserError
from gptjax.generate import generate_tokens
from gptjax.model import Decoder, init_decoder, init_task_model
from gptjax.model_config import ModelConfig
from gptjax.tasks import get_task


def _apply_kwargs(config, overrides: dict) -> None:
    """`model=dict(n_layer=2)` or `**{"model.n_layer": 2}` style overrides."""
    for key, value in overrides.items():
        if isinstance(value, dict):
            for sub, sub_value in value.items():
                config_lib.set_value(config, f"{key}.{sub}", sub_value)
        else:
            config_lib.set_value(config, key, value)


def _load_decoder(config, path: str, step: int | None = None) -> Decoder:
    """The decoder of `config`'s run holding the params saved at `path` (a workdir or one
    checkpoint). A fine-tuning run saves its task model; its decoder is taken and the head left."""
    model_config = ModelConfig.from_config(config.model)
    task = get_task(config.task) if config.get("task") else None

    def build():
        if task is None:
            return init_decoder(model_config, 0)
        return init_task_model(model_config, task.head_outputs, task.combine, 0)

    # Build the structure without spending time on a random init that is overwritten.
    graphdef, like = nnx.split(nnx.eval_shape(build), nnx.Param)
    if jax.process_count() > 1:
        # Without a target sharding Orbax reads into the saved layout, whose devices may all belong
        # to another process (a run saved on one device): every process reads a full copy instead.
        everywhere = jax.sharding.NamedSharding(jax.sharding.Mesh(jax.devices(), ("all",)),
                                                jax.sharding.PartitionSpec())
        like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=everywhere), like)
    params, _ = checkpoint.load_params(path, like, step)
    module = nnx.merge(graphdef, params)
    return module if task is None else module.decoder


def _run_config(model_config: ModelConfig, name: str):
    """The run config of weights that come without one (a Hugging Face folder): gptjax's defaults
    around their model section, a config that `save` writes and a later run loads."""
    config = config_lib.base_config()
    config.name = name
    config.model.update(dataclasses.asdict(model_config))
    # No run chose a row length for these weights, so their whole context stands for one: it is what
    # flops_per_token counts by default, and validate holds train.seq_len to model.max_len, which
    # the schema's 1024 may exceed.
    config.train.seq_len = model_config.max_len
    config_lib.validate(config)
    return config


class GPT:
    """A decoder with its config and (optionally) its tokenizer."""

    def __init__(self, config, module: Decoder, tokenizer=None):
        self.config = config
        self.module = module
        self.tokenizer = tokenizer
        self._logits_fn = None
        # The decoder's shape, as model.py and hf.py take it (self.config is the whole run's).
        self.model_config = ModelConfig.from_config(config.model)

    @classmethod
    def from_config(cls, config, seed: int | None = None, **overrides) -> "GPT":
        """A freshly initialised model from a config file path or a ConfigDict."""
        if isinstance(config, (str, os.PathLike)):
            config = config_lib.load_config(os.fspath(config))
        else:
            config = config_lib.config_from_dict(config.to_dict())
        _apply_kwargs(config, overrides)
        config_lib.validate(config)
        return cls(config, init_decoder(ModelConfig.from_config(config.model),
                                        config.train.seed if seed is None else seed))

    @classmethod
    def from_pretrained(cls, path: str, step: int | None = None) -> "GPT":
        """Parameters (never optimizer state) from a gptjax workdir, or a Hugging Face GPT-2 /
        openai-gpt folder (config.json with a `model_type`), or one checkpoint of a run,
        WORKDIR/checkpoints/<step>. The tokenizer beside it is loaded too. From a fine-tuning
        run: its decoder (the task head left out), at its best epoch unless `step` is given."""
        directory, checkpoint_step = checkpoint.checkpoint_dir(path)
        if checkpoint_step is not None:
            return cls._from_checkpoint(directory, checkpoint_step)
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise UserError(f"{path} is not a gptjax workdir (no config.json); pass the --workdir of a run "
                            f"or a Hugging Face GPT-2 folder")
        values = config_lib.read_json(config_path)
        if isinstance(values, dict) and "model_type" in values:
            from gptjax import hf
            if step is not None:
                raise UserError(f"{path} is a Hugging Face folder, which has no steps; leave out step")
            model_config, module = hf.load_hf(path)
            config = _run_config(model_config, name=f"hf-{values['model_type']}")
        else:
            config = config_lib.config_from_dict(values, source=config_path)
            if step is None and config.get("task") and run_folder.has_best(path):
                step = run_folder.read_best(path)["step"]  # a fine-tuning run: its best epoch, as eval scores
            module = _load_decoder(config, path, step)
        return cls(config, module, tokenizer_files.load_folder(path))

    @classmethod
    def _from_checkpoint(cls, directory: str, step: int) -> "GPT":
        """A training checkpoint carries its run's config and tokenizer; params-only ones (from
        `save` or `convert`) take both from the workdir around them."""
        workdir = os.path.dirname(directory)
        if not os.path.isdir(os.path.join(directory, str(step))):
            raise UserError(f"{directory}/{step} does not exist; the complete checkpoints are the numbered "
                            f"folders in {directory}")
        reader = checkpoint.Checkpointer(workdir, read_only=True)
        try:
            has_meta = os.path.isdir(os.path.join(directory, str(step), "meta"))
            config = config_lib.config_from_dict(reader.read_meta(step)["config"], source=f"{directory}/{step}/meta") if has_meta else None
            tokenizer_bytes = reader.tokenizer_bytes(step)
        finally:
            reader.close()
        if config is None:
            return cls.from_pretrained(workdir, step)
        tokenizer = None if tokenizer_bytes is None else tokenizer_files.from_bytes(tokenizer_bytes)
        module = _load_decoder(config, os.path.join(directory, str(step)))
        return cls(config, module, tokenizer)

    def num_params(self) -> int:
        return int(sum(x.size for x in jax.tree.leaves(nnx.state(self.module, nnx.Param))))

    def flops_per_token(self, seq_len: int | None = None) -> float:
        return self.module.flops_per_token(seq_len or self.config.train.seq_len)

    def logits(self, tokens) -> jax.Array:
        """float32 [B, T, vocab_size] next-token logits for int tokens [B, T] (dropout off)."""
        tokens = jnp.asarray(tokens, jnp.int32)
        if tokens.ndim != 2:
            raise UserError(f"tokens must be [batch, time], got shape {tokens.shape}")
        if tokens.shape[1] > self.model_config.max_len:
            raise UserError(f"{tokens.shape[1]} tokens exceed the context of {self.model_config.max_len}")
        if tokens.size and not 0 <= int(tokens.min()) <= int(tokens.max()) < self.model_config.vocab_size:
            raise UserError(f"token ids must be in [0, {self.model_config.vocab_size}), got "
                            f"{int(tokens.min())}..{int(tokens.max())}")
        if self._logits_fn is None:
            vocab = self.model_config.vocab_size
            self._logits_fn = nnx.jit(lambda m, t: m.lm_logits(m(t))[..., :vocab].astype(jnp.float32))
        return self._logits_fn(self.module, tokens)

    def _encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise UserError("this model has no tokenizer; pass token ids instead of text")
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def generate(self, prompts, max_new_tokens: int = 50, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0):
        """Continues one prompt or a list of prompts (text or token ids); temperature 0 = greedy.

        Returns text for text prompts (one string, or a list), token ids otherwise."""
        single = isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], (int, np.integer)))
        batch = [prompts] if single else list(prompts)
        ids = [self._encode(p) for p in batch]
        # Padded prompt slots are hidden from attention, so any id inside the embedding pads them
        # (a tokenizer's own pad may be an added token past the model's rows).
        out = generate_tokens(self.module, ids, max_new_tokens=max_new_tokens, temperature=temperature,
                              top_k=top_k, top_p=top_p, seed=seed, pad_id=0,
                              vocab_size=self.model_config.vocab_size)
        if all(isinstance(p, str) for p in batch):
            # Decode prompt and continuation together so the space between them survives.
            texts = [self.continuation_text(prompt_ids, row) for prompt_ids, row in zip(ids, out)]
            return texts[0] if single else texts
        rows = [list(map(int, row)) for row in out]
        return rows[0] if single else rows

    def continuation_text(self, prompt_ids, row) -> str:
        """The text of generated ids `row` up to eos, decoded together with the prompt so the space
        between them survives, then cut off it."""
        prefix = self.tokenizer.decode(prompt_ids)
        return self.tokenizer.decode(list(prompt_ids) + self._until_eos(row))[len(prefix):]

    def _until_eos(self, row) -> list[int]:
        row = list(map(int, row))
        eos = self.tokenizer.eos_id
        return row[: row.index(eos)] if eos in row else row

    def save(self, path: str) -> None:
        """Writes a workdir that `from_pretrained` loads: config.json, params, tokenizer."""
        from gptjax.workdir_lock import WorkdirLock
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot write {path}: {e.strerror}") from None
        with WorkdirLock(path, "GPT.save"):
            if checkpoint.latest_step(path) is not None:
                raise UserError(f"{path} already holds checkpoints; save to a new directory")
            config_lib.write_json(os.path.join(path, "config.json"), config_lib.to_json(self.config))
            if self.tokenizer is not None:
                tokenizer_files.save_folder(self.tokenizer, path)
            checkpoint.save_params(path, 0, nnx.state(self.module, nnx.Param))
