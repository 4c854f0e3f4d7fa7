"""Config schema, loading of `configs/*.py`, `--config.a.b=value` overrides and validation.

Every config file starts from `base_config()`, which holds every field gptjax knows with its
default and a one-line doc. The dict is locked, so a typo in a config file or an override is
an error naming the key instead of a silently ignored setting.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import math
import os
import re

import ml_collections

from gptjax import attention_choices
from gptjax.errors import UserError

BLOCK_CHOICES = ("post_ln", "pre_ln")
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
REMAT_CHOICES = ("none", "full", "save_dots")
SCHEDULE_CHOICES = ("cosine", "linear")
MODE_CHOICES = ("finetuned", "zero_shot", "few_shot")

# "section.key" -> its one-line doc, for every field base_config() defines.
FIELD_DOCS: dict[str, str] = {}


def _field(config: ml_collections.ConfigDict, key: str, value, doc: str) -> None:
    section, name = key.split(".")
    config[section][name] = value
    FIELD_DOCS[key] = doc


def base_config() -> ml_collections.ConfigDict:
    """Every field with its default. Config files change values; they cannot add keys."""
    c = ml_collections.ConfigDict()
    c.name = "gptjax"

    c.model = ml_collections.ConfigDict()
    _field(c, "model.block", "pre_ln", "post_ln (GPT-1: LN after each residual add, no final LN) or pre_ln (GPT-2: LN before each branch, final LN)")
    _field(c, "model.vocab_size", 50257, "vocabulary size; must be >= the tokenizer's")
    _field(c, "model.vocab_pad_multiple", 128, "embedding rows are padded up to a multiple of this (speed); padded ids are never predicted")
    _field(c, "model.n_layer", 12, "number of decoder blocks")
    _field(c, "model.n_head", 12, "attention heads; d_model must be divisible by it")
    _field(c, "model.d_model", 768, "width of the residual stream")
    _field(c, "model.d_ff", 3072, "inner width of the MLP")
    _field(c, "model.max_len", 1024, "context length = rows of the position embedding")
    _field(c, "model.dropout", 0.0, "dropout on the embeddings and on each residual branch")
    _field(c, "model.attn_dropout", 0.0, "dropout on the attention probabilities (model.attention auto, pallas or xla)")
    _field(c, "model.init_std", 0.02, "std of the normal initialisation of weights")
    _field(c, "model.scale_residual_init", True, "residual output projections use init_std / sqrt(2 * n_layer) (GPT-2)")
    _field(c, "model.ln_eps", 1e-5, "LayerNorm epsilon")
    _field(c, "model.dtype", "auto", "compute dtype: auto (bfloat16 on GPU/TPU, float32 on CPU), float32, bfloat16, float16")
    _field(c, "model.attention", "auto", "attention implementation: auto (cuDNN, or the Pallas kernel with document "
           "masks or attention dropout, on NVIDIA GPUs; splash on TPU; XLA elsewhere), xla, cudnn, pallas, splash")
    _field(c, "model.remat", "none", "per-block rematerialisation: none, full, save_dots (keep matmul outputs)")
    _field(c, "model.loss_chunk_len", 0, "positions whose logits the loss builds at once (0 = the whole sequence); "
           "smaller saves activation memory and recomputes the vocabulary matmul in the backward pass")

    c.train = ml_collections.ConfigDict()
    _field(c, "train.steps", 1000, "optimizer updates")
    _field(c, "train.grad_accum", 1, "microbatches per update (train.batch_size is split into this many)")
    _field(c, "train.batch_size", 64, "sequences per update")
    _field(c, "train.seq_len", 1024, "tokens per sequence (<= model.max_len)")
    _field(c, "train.lr", 6e-4, "peak learning rate")
    _field(c, "train.warmup_steps", 100, "linear warmup from 0 to train.lr")
    _field(c, "train.schedule", "cosine", "after warmup: cosine or linear decay to train.min_lr_ratio * train.lr")
    _field(c, "train.min_lr_ratio", 0.0, "final learning rate as a fraction of train.lr")
    _field(c, "train.weight_decay", 0.1, "decoupled weight decay on weights with >= 2 dimensions only")
    _field(c, "train.b1", 0.9, "Adam beta1")
    _field(c, "train.b2", 0.95, "Adam beta2")
    _field(c, "train.eps", 1e-8, "Adam epsilon")
    _field(c, "train.grad_clip", 1.0, "global gradient-norm clipping (0 = off)")
    _field(c, "train.seed", 0, "seed for initialisation, dropout and data order")
    _field(c, "train.log_every", 10, "steps between metrics lines (each one is a host sync)")
    _field(c, "train.eval_every", 100, "steps between held-out evaluations (0 = only at the end)")
    _field(c, "train.eval_batches", 4, "batches of held-out data per evaluation")
    _field(c, "train.checkpoint_every", 0, "steps between checkpoints (0 = only at the end and on SIGTERM)")
    _field(c, "train.keep", 3, "newest checkpoints kept (0 = all)")
    _field(c, "train.keep_every", 0, "also keep every checkpoint whose step is a multiple of this, forever (0 = off)")
    _field(c, "train.resume", "latest", "latest | <step> | none: what the same command finds in WORKDIR/checkpoints")
    _field(c, "train.profile_steps", [0, 0], "[a, b]: a jax.profiler trace of steps a..b into WORKDIR/profile ([0, 0] = off)")

    c.mesh = ml_collections.ConfigDict()
    _field(c, "mesh.data", -1, "data-parallel replicas (-1 = the devices the other axes leave)")
    _field(c, "mesh.fsdp", 1, "devices each parameter's embed dimension is sharded over (batch splits over it too)")
    _field(c, "mesh.tensor", 1, "tensor-parallel devices: heads, MLP width and vocabulary are split over them")
    _field(c, "mesh.dcn_data", 1, "of mesh.data, the groups across slices or nodes (slow network); "
           "fsdp and tensor then stay inside each group")

    c.data = ml_collections.ConfigDict()
    _field(c, "data.source", "synthetic", "pretraining text: synthetic, text:<glob>, jsonl:<glob>, parquet:<glob>, "
           "hf:<save_to_disk folder, data files or Hub name>[:<split>], tfds:<name>[/<config>][:<split>]; "
           "several separated by commas")
    _field(c, "data.weights", "", "comma-separated share of each batch per data.source entry (empty = equal)")
    _field(c, "data.text_documents", "file", "text: sources: one document per file, or per blank_line-separated block")
    _field(c, "data.text_field", "text", "jsonl:, parquet: and hf: sources: the field (column) holding a document's text")
    _field(c, "data.jsonl_field", "text", "older name of data.text_field, honoured while data.text_field is left at 'text'")
    _field(c, "data.tfds_data_dir", "", "tfds: sources: the prepared TFDS folder (empty = TFDS_DATA_DIR or the TFDS default)")
    _field(c, "data.tfds_text_field", "", "tfds: sources: the text feature (empty = 'text' or the only text feature)")
    _field(c, "data.document_mask", False, "restart positions and mask attention at document boundaries inside a row")
    _field(c, "data.tokenizer", "", "a SentencePiece .model, or a Hugging Face tokenizer folder or tokenizer.json (GPT-2's vocabulary); empty = train a SentencePiece model on the corpus into WORKDIR/tokenizer.model")
    _field(c, "data.tokenizer_vocab_size", 512, "vocabulary size when the tokenizer is trained here")
    _field(c, "data.tokenizer_documents", 200_000, "documents (shared between sources) the tokenizer is trained on")
    _field(c, "data.num_documents", 20000, "synthetic corpus: documents generated")
    _field(c, "data.eval_fraction", 0.02, "fraction of documents held out for the eval loss")
    _field(c, "data.seed", 0, "seed of the corpus itself (independent of train.seed)")
    _field(c, "data.num_workers", 0, "loader threads building batches ahead of the train step (0 = one)")

    # Fine-tuning and evaluation (`gptjax finetune`, `gptjax eval`; configs/glue.py).
    for key, value, doc in (
            ("task", "", "fine-tuning / evaluation task: a name (sst2, mnli, synthetic_sentiment, ...), "
                         "a comma-separated list, or all (the GLUE tasks)"),
            ("task_data", "auto", "where the task's examples come from (pretraining text is data.source): auto "
                                  "(synthetic tasks: synthetic, GLUE: tfds), synthetic, tfds, tfds:<data_dir>, "
                                  "tsv:<GLUE folder>, jsonl:<folder>"),
            ("init_from", "", "fine-tuning starts from these params: a gptjax workdir or checkpoint, or a Hugging "
                              "Face GPT-2 / openai-gpt folder (empty = random init, no pretraining)"),
            ("mode", "finetuned", "eval: finetuned (the run in --workdir), zero_shot or few_shot (score a "
                                  "pretrained LM with no training)"),
            ("shots", 0, "eval with mode=few_shot: demonstrations from the train split per prompt")):
        c[key] = value
        FIELD_DOCS[key] = doc
    c.finetune = ml_collections.ConfigDict()
    _field(c, "finetune.lm_weight", 0.5, "weight of the auxiliary LM loss on the task inputs (0 = off)")
    _field(c, "finetune.epochs", 3, "passes over the train split")
    _field(c, "finetune.warmup_fraction", 0.002, "linear warmup over this fraction of the updates, then linear decay to 0")
    _field(c, "finetune.clf_dropout", 0.1, "dropout on the extract-token state before the task head")
    _field(c, "finetune.max_len", 0, "task inputs are truncated to this many tokens (0 = model.max_len)")
    _field(c, "finetune.max_examples", 0, "use only the first N train examples (0 = all)")
    _field(c, "finetune.eval_batch_size", 64, "examples per evaluation batch")
    _field(c, "finetune.splits", "validation,test", "eval: the splits to score (MNLI's validation/test "
           "mean both halves); splits without labels give submission files")

    c.lock()
    return c


# Top-level keys that were renamed: old name -> (new name, what it is). A run saved under the old
# name reads as the new one; a config file or override that sets the old name is told the new.
RENAMED_KEYS = {"source": ("task_data", "the fine-tuning / eval task data; pretraining text stays data.source")}


def _renamed_key(key: str) -> UserError:
    new, what = RENAMED_KEYS[key]
    return UserError(f"config key '{key}' is now '{new}' ({what}): set {new} instead")


def saved_values(values):
    """A config as a run saved it (WORKDIR/config.json, a checkpoint's meta) under today's key
    names: runs written before a rename keep loading, resuming and evaluating. Every reader of
    a saved config goes through here."""
    if not isinstance(values, dict):
        return values  # damaged: its reader says so
    values = dict(values)
    for old, (new, _) in RENAMED_KEYS.items():
        if old in values and new not in values:
            values[new] = values.pop(old)
    return values


def gpt2_config(name: str, n_layer: int, n_head: int, d_model: int, lr: float,
                batch_size: int) -> ml_collections.ConfigDict:
    """The GPT-2 family's shared recipe (configs/gpt2_*.py): pre-LN with a final LN, context 1024,
    the 50,257-token vocabulary padded to a multiple of 128, residual projections initialised
    with 0.02 / sqrt(2 * n_layer), no dropout, AdamW (0.9, 0.95) with warmup then cosine to 10%."""
    c = base_config()
    c.name = name
    c.model.update(block="pre_ln", vocab_size=50257, vocab_pad_multiple=128, n_layer=n_layer, n_head=n_head,
                   d_model=d_model, d_ff=4 * d_model, max_len=1024, dropout=0.0, attn_dropout=0.0,
                   scale_residual_init=True)
    c.train.update(batch_size=batch_size, seq_len=1024, steps=600_000, lr=lr, warmup_steps=2000,
                   schedule="cosine", min_lr_ratio=0.1, weight_decay=0.1, b1=0.9, b2=0.95, grad_clip=1.0,
                   log_every=100, eval_every=2000, checkpoint_every=5000)
    return c


def load_config(path: str, overrides: list[str] | None = None) -> ml_collections.ConfigDict:
    """Loads `configs/*.py` (its `get_config()`), applies `a.b=value` overrides, validates."""
    if not os.path.isfile(path):
        raise UserError(f"config file not found: {path} (pass --config configs/<name>.py)")
    spec = importlib.util.spec_from_file_location(f"gptjax_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    if not path.endswith(".py") or spec is None:
        raise UserError(f"config {path} must be a Python file with get_config() (configs/<name>.py)")
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise UserError(f"{path}:{e.lineno}: syntax error: {e.msg}") from None
    if not hasattr(module, "get_config"):
        raise UserError(f"{path} has no get_config() function")
    try:
        config = module.get_config()
    except (AttributeError, KeyError) as e:  # the locked ConfigDict refusing a field it does not have
        key = re.search(r'Key "(\w+)" does not exist', str(e))
        if key is None:
            raise
        # The refusing dict lists its fields; the old name means the renamed key only where that
        # listing is the top level's, the one with the new name in it ('task_data': ...).
        old = key.group(1)
        if old in RENAMED_KEYS and re.search(rf"\\?'{RENAMED_KEYS[old][0]}\\?':", str(e)):
            raise UserError(f"{path}: {_renamed_key(old)}") from None
        close = re.search(r'Did you mean "(\w+)"', str(e))
        hint = f"; did you mean '{close.group(1)}'?" if close else ""
        raise UserError(f"{path} sets unknown config key '{key.group(1)}'{hint}") from None
    except TypeError as e:  # the ConfigDict refusing a value of another type
        raise UserError(f"{path}: {str(e).splitlines()[0]}") from None
    apply_overrides(config, overrides or [])
    validate(config)
    return config


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    """Rows of the token embedding: the vocabulary rounded up to model.vocab_pad_multiple."""
    return -(-vocab_size // multiple) * multiple


def config_from_dict(values: dict, source: str = "the saved config") -> ml_collections.ConfigDict:
    """Rebuilds a config saved as JSON (WORKDIR/config.json) on top of the current schema; a
    value the schema refuses names the file it came from."""
    if not isinstance(values, dict):
        raise UserError(f"{source} holds a JSON {type(values).__name__}, not the object of config sections "
                        f"a run writes; it is damaged: restore it from a backup or start a new --workdir")
    values, config = saved_values(values), base_config()
    try:
        for section, fields in values.items():
            if isinstance(fields, dict):
                for key, value in fields.items():
                    set_value(config, f"{section}.{key}", value)
            else:
                set_value(config, section, fields)
        validate(config)
    except UserError as e:
        raise UserError(f"{source}: {e}") from None
    return config


def read_json(path: str, fields: dict | None = None):
    """A JSON file a run wrote (config.json, best.json); damage is one clear error, not a traceback.
    `fields` ({name: type}) are required of an object: a file without them, or with another
    type there, is damaged."""
    try:
        with open(path) as f:
            value = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON (line {e.lineno}): {e.msg}; it is damaged: restore it "
                        f"or start a new --workdir") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not text (a damaged file); restore it or start a new --workdir") from None
    if fields is None:
        return value
    if not isinstance(value, dict):
        raise UserError(f"{path} holds a JSON {type(value).__name__} where an object is expected; it is "
                        f"damaged: restore it or start a new --workdir")
    for name, kind in fields.items():
        if not isinstance(value.get(name), kind) or isinstance(value.get(name), bool) and kind is not bool:
            raise UserError(f"{path} has no valid '{name}' (found {value.get(name)!r}); it is damaged: restore it "
                            f"or start a new --workdir")
    return value


def write_json(path: str, text_or_value) -> None:
    """Writes a run's JSON file whole or not at all (a temporary file renamed over it), so that a
    run killed while writing never leaves half a file for the next one to read."""
    text = text_or_value if isinstance(text_or_value, str) else json.dumps(text_or_value, indent=2)
    with open(path + ".tmp", "w") as f:
        f.write(text.rstrip("\n") + "\n")
    os.replace(path + ".tmp", path)


def to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def _all_keys(config, prefix=""):
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield from _all_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def _unknown_key(config, key: str) -> UserError:
    if key in RENAMED_KEYS:
        return _renamed_key(key)
    close = difflib.get_close_matches(key, list(_all_keys(config)), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return UserError(f"unknown config key '{key}'{hint}")


def _coerce(key: str, old, raw):
    """Converts `raw` (a string from the command line, or a value) to the type of `old`."""
    if isinstance(raw, str) and not isinstance(old, str):
        text = raw.strip()
        if isinstance(old, bool):
            lowered = text.lower()
            if lowered in ("true", "1", "yes"):
                return True
            if lowered in ("false", "0", "no"):
                return False
            raise UserError(f"config key '{key}' expects true or false, got '{raw}'")
        try:
            raw = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise UserError(f"config key '{key}' expects {type(old).__name__}, got '{raw}'") from None
    if isinstance(old, bool):
        if not isinstance(raw, bool):
            raise UserError(f"config key '{key}' expects true or false, got {raw!r}")
        return raw
    if isinstance(old, int):
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise UserError(f"config key '{key}' expects an integer, got {raw!r}")
        return raw
    if isinstance(old, float):
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise UserError(f"config key '{key}' expects a number, got {raw!r}")
        return float(raw)
    if isinstance(old, str):
        if not isinstance(raw, str):
            raise UserError(f"config key '{key}' expects a string, got {raw!r}")
        return raw
    if isinstance(old, (list, tuple)):
        if not isinstance(raw, (list, tuple)):
            raise UserError(f"config key '{key}' expects a list, got {raw!r}")
        return type(old)(raw)
    return raw


def set_value(config: ml_collections.ConfigDict, key: str, raw) -> None:
    node = config
    parts = key.split(".")
    for part in parts[:-1]:
        if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
            raise _unknown_key(config, key)
        node = node[part]
    leaf = parts[-1]
    if leaf not in node or isinstance(node[leaf], ml_collections.ConfigDict):
        raise _unknown_key(config, key)
    node[leaf] = _coerce(key, node[leaf], raw)


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> None:
    """Applies `a.b=value` strings (the `--config.` prefix already removed)."""
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override '{item}' must look like --config.section.key=value")
        key, raw = item.split("=", 1)
        set_value(config, key.strip(), raw)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def validate_model(m, segments: bool = False) -> None:
    """The checks of a model section alone, a ConfigDict or a ModelConfig: one that comes without a
    run config (a Hugging Face folder's) is checked before any weights are built for it.
    `segments`: the run masks attention at document boundaries (data.document_mask)."""
    _check(m.block in BLOCK_CHOICES, f"model.block must be one of {BLOCK_CHOICES}, got '{m.block}'")
    attention_choices.check(m.attention, dropout=m.attn_dropout > 0, segments=segments)
    _check(m.dtype in DTYPE_CHOICES, f"model.dtype must be one of {DTYPE_CHOICES}, got '{m.dtype}'")
    _check(m.remat in REMAT_CHOICES, f"model.remat must be one of {REMAT_CHOICES}, got '{m.remat}'")
    for key in ("vocab_size", "vocab_pad_multiple", "n_layer", "n_head", "d_model", "d_ff", "max_len"):
        _check(getattr(m, key) > 0, f"model.{key} must be positive, got {getattr(m, key)}")
    _check(m.loss_chunk_len >= 0, f"model.loss_chunk_len must be >= 0 (0 = no chunks), got {m.loss_chunk_len}")
    for key in ("ln_eps", "init_std"):
        value = getattr(m, key)
        _check(value > 0 and math.isfinite(value), f"model.{key} must be a positive number, got {value}")
    _check(m.d_model % m.n_head == 0,
           f"model.d_model ({m.d_model}) must be divisible by model.n_head ({m.n_head})")
    _check(0.0 <= m.dropout < 1.0 and 0.0 <= m.attn_dropout < 1.0, "model.dropout and model.attn_dropout must be in [0, 1)")


def validate(config: ml_collections.ConfigDict) -> None:
    """Cross-field checks that would otherwise fail deep inside JAX with an unreadable error."""
    m, t = config.model, config.train
    validate_model(m, segments=config.data.document_mask)
    _check(t.schedule in SCHEDULE_CHOICES, f"train.schedule must be one of {SCHEDULE_CHOICES}, got '{t.schedule}'")
    _check(t.eps > 0 and math.isfinite(t.eps), f"train.eps must be a positive number, got {t.eps}")
    for key in ("weight_decay", "grad_clip", "min_lr_ratio"):
        if key in t:
            _check(t[key] >= 0 and math.isfinite(t[key]), f"train.{key} must be >= 0, got {t[key]}")
    for key in ("steps", "batch_size", "seq_len", "log_every", "eval_batches", "grad_accum"):
        _check(t[key] > 0, f"train.{key} must be positive, got {t[key]}")
    profile = tuple(t.profile_steps)
    _check(profile == (0, 0) or (len(profile) == 2 and 1 <= profile[0] <= profile[1]),
           f"train.profile_steps must be [a, b] with 1 <= a <= b (or [0, 0] for off), got {list(t.profile_steps)}")
    for key in ("seed", "eval_every", "checkpoint_every", "keep", "keep_every"):
        _check(t[key] >= 0, f"train.{key} must be >= 0, got {t[key]}")
    _check(0.0 <= t.b1 < 1.0 and 0.0 <= t.b2 < 1.0, f"train.b1 and train.b2 must be in [0, 1), got {t.b1}, {t.b2}")
    d = config.data
    for key in ("seed", "num_workers"):
        _check(d[key] >= 0, f"data.{key} must be >= 0, got {d[key]}")
    for key in ("num_documents", "tokenizer_vocab_size", "tokenizer_documents"):
        _check(d[key] > 0, f"data.{key} must be positive, got {d[key]}")
    if not config.get("task"):  # pretraining's row length; a task run's is finetune.max_len
        _check(t.seq_len <= m.max_len, f"train.seq_len ({t.seq_len}) exceeds the context model.max_len "
                                       f"({m.max_len}); lower train.seq_len or raise model.max_len")
    _check(str(t.resume) in ("latest", "none") or str(t.resume).isdigit(),
           f"train.resume must be latest, none or a step number, got '{t.resume}'")
    _check(t.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {t.warmup_steps}")
    _check(t.lr > 0 and math.isfinite(t.lr), f"train.lr must be a positive number, got {t.lr}")
    _check(0.0 <= config.data.eval_fraction < 1.0, "data.eval_fraction must be in [0, 1)")
    _check(bool(d.text_field.strip()), "data.text_field is empty; set it to the column holding the text")
    _check("text" in (d.jsonl_field, d.text_field) or d.jsonl_field == d.text_field,
           f"data.jsonl_field='{d.jsonl_field}' and data.text_field='{d.text_field}' disagree; data.jsonl_field is "
           f"the older name of data.text_field (the text column of jsonl:, parquet: and hf: sources): set "
           f"data.text_field alone")
    _check(config.data.text_documents in ("file", "blank_line"),
           f"data.text_documents must be file or blank_line, got '{config.data.text_documents}'")
    f = config.finetune
    _check(config.mode in MODE_CHOICES, f"mode must be one of {MODE_CHOICES}, got '{config.mode}'")
    _check(config.shots >= 0, f"shots must be >= 0, got {config.shots}")
    _check((config.mode == "few_shot") == (config.shots > 0) or config.mode == "finetuned",
           f"mode={config.mode} with shots={config.shots}: few_shot needs shots > 0 and zero_shot shots=0")
    _check(f.lm_weight >= 0, f"finetune.lm_weight must be >= 0, got {f.lm_weight}")
    _check(f.epochs > 0 and f.eval_batch_size > 0, "finetune.epochs and finetune.eval_batch_size must be positive")
    _check(0.0 <= f.warmup_fraction < 1.0, f"finetune.warmup_fraction must be in [0, 1), got {f.warmup_fraction}")
    _check(0.0 <= f.clf_dropout < 1.0, f"finetune.clf_dropout must be in [0, 1), got {f.clf_dropout}")
    _check(0 <= f.max_len <= m.max_len, f"finetune.max_len must be in [0, model.max_len={m.max_len}], got {f.max_len}")
    _check(f.max_examples >= 0, f"finetune.max_examples must be >= 0, got {f.max_examples}")
    from gptjax.data.sources import parse_sources, parse_weights
    parse_weights(config.data.weights, len(parse_sources(config.data.source)))
