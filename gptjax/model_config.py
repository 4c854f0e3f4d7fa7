"""`ModelConfig`: the shape and numerics of one decoder, as a frozen, hashable value.

The run config (`config.model`, an ml_collections.ConfigDict) is mutable and unhashable, so it
cannot be a static jit argument or a dict key, and a model holding it would change if the config
were edited after the fact. The model takes this dataclass instead:

    model_config = ModelConfig.from_config(config.model)
    decoder = init_decoder(model_config, seed)

Its fields are exactly the `model.*` fields of `config.base_config()`, which stays the one place
that holds their defaults and docs (each field's doc is read from there); tests/test_model_config.py
holds the two to the same names and types.
Range and cross-field checks (choices, positivity, d_model % n_head) stay in `config.validate`,
which every loaded config has passed; this class checks only names and types.

Each field is of one of two kinds, declared here and nowhere else. The architecture is what the
weights are (shapes, block kind, vocabulary, LayerNorm epsilon, initialisation): a checkpoint
fixes it, so a resume refuses any change of it and fine-tuning takes it from the pretrained
model. Execution settings (dtype, attention, remat, loss chunking) and dropout rates say how
the weights are run and trained; they may change on resume (the run prints which) and each
fine-tuning run sets its own.
"""

import dataclasses

from gptjax.config import FIELD_DOCS, base_config, padded_vocab_size
from gptjax.errors import UserError

base_config()  # fills FIELD_DOCS: the schema is the one place a field's doc is written


def _accepts(kind: type, value) -> bool:
    if kind in (int, float) and isinstance(value, bool):  # True is an int to Python, not to a config
        return False
    return isinstance(value, (int, float) if kind is float else kind)


def _architecture(name: str):
    return dataclasses.field(metadata={"doc": FIELD_DOCS[f"model.{name}"], "architecture": True})


def _execution(name: str):
    return dataclasses.field(metadata={"doc": FIELD_DOCS[f"model.{name}"], "architecture": False})


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    block: str = _architecture("block")
    vocab_size: int = _architecture("vocab_size")
    vocab_pad_multiple: int = _architecture("vocab_pad_multiple")
    n_layer: int = _architecture("n_layer")
    n_head: int = _architecture("n_head")
    d_model: int = _architecture("d_model")
    d_ff: int = _architecture("d_ff")
    max_len: int = _architecture("max_len")
    dropout: float = _execution("dropout")
    attn_dropout: float = _execution("attn_dropout")
    init_std: float = _architecture("init_std")
    scale_residual_init: bool = _architecture("scale_residual_init")
    ln_eps: float = _architecture("ln_eps")
    dtype: str = _execution("dtype")
    attention: str = _execution("attention")
    remat: str = _execution("remat")
    loss_chunk_len: int = _execution("loss_chunk_len")

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not _accepts(field.type, value):
                raise UserError(f"model.{field.name} expects {field.type.__name__}, got {value!r}")
            # JSON writes 0.0 as 0: stored as the field's own type, equal configs print and hash alike.
            object.__setattr__(self, field.name, field.type(value))

    @classmethod
    def from_config(cls, section) -> "ModelConfig":
        """From `config.model` (a ConfigDict) or a plain dict with exactly the same keys."""
        values = section.to_dict() if hasattr(section, "to_dict") else dict(section)
        names = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise UserError(f"unknown model config key(s) {', '.join(repr(k) for k in unknown)}; "
                            f"the model has {', '.join(names)}")
        missing = [name for name in names if name not in values]
        if missing:
            raise UserError(f"model config lacks key(s) {', '.join(repr(k) for k in missing)}")
        return cls(**values)

    def architecture(self) -> dict:
        """{field: value} of what the weights are (the module docstring says which fields)."""
        return {name: getattr(self, name) for name in ARCHITECTURE_FIELDS}

    @property
    def padded_vocab(self) -> int:
        """Rows of the token embedding (and columns of the logits)."""
        return padded_vocab_size(self.vocab_size, self.vocab_pad_multiple)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


ARCHITECTURE_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig) if f.metadata["architecture"])
EXECUTION_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig) if not f.metadata["architecture"])
