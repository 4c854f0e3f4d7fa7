"""`ModelConfig`: the shape and numerics of one decoder, as a frozen, hashable value.

The run config (`config.model`, an ml_collections.ConfigDict) is mutable and unhashable, so it
cannot be a static jit argument or a dict key, and a model holding it would change if the config
were edited after the fact. The model takes this dataclass instead:

    model_config = ModelConfig.from_config(config.model)
    decoder = init_decoder(model_config, seed)

Its fields are exactly the `model.*` fields of `config.base_config()`, which holds their defaults
and docs (each field's doc is read from there); tests/test_model_config.py holds the two to the
same names and types, and `Architecture`'s defaults to the schema's.
Range and cross-field checks (choices, positivity, d_model % n_head) stay in `config.validate`
(`config.validate_model` for a model section alone), which every loaded config has passed; this
class checks only names and types.

Each field is of one of two kinds. The architecture is what the weights are: the fields of
`Architecture` (architecture.py, which declares the set), and `architecture()` is that value. A
checkpoint fixes it, so a resume refuses any change of it and fine-tuning takes it from the
pretrained model. Every other field is an execution setting (dtype, attention, remat, loss
chunking, dropout rates): how the weights are run and trained. Those may change on resume (the
run prints which) and each fine-tuning run sets its own.
"""

import dataclasses

from gptjax.architecture import Architecture, check_field_types
from gptjax.config import FIELD_DOCS, base_config, padded_vocab_size
from gptjax.errors import UserError

base_config()  # fills FIELD_DOCS: the schema is the one place a field's doc is written

ARCHITECTURE_FIELDS = tuple(f.name for f in dataclasses.fields(Architecture))


def _field(name: str):
    return dataclasses.field(metadata={"doc": FIELD_DOCS[f"model.{name}"],
                                       "architecture": name in ARCHITECTURE_FIELDS})


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    block: str = _field("block")
    vocab_size: int = _field("vocab_size")
    vocab_pad_multiple: int = _field("vocab_pad_multiple")
    n_layer: int = _field("n_layer")
    n_head: int = _field("n_head")
    d_model: int = _field("d_model")
    d_ff: int = _field("d_ff")
    max_len: int = _field("max_len")
    dropout: float = _field("dropout")
    attn_dropout: float = _field("attn_dropout")
    init_std: float = _field("init_std")
    scale_residual_init: bool = _field("scale_residual_init")
    ln_eps: float = _field("ln_eps")
    dtype: str = _field("dtype")
    attention: str = _field("attention")
    remat: str = _field("remat")
    loss_chunk_len: int = _field("loss_chunk_len")

    def __post_init__(self):
        check_field_types(self)

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

    def architecture(self) -> Architecture:
        """What the weights are: two models whose architectures are equal hold interchangeable weights."""
        return Architecture(**{name: getattr(self, name) for name in ARCHITECTURE_FIELDS})

    @property
    def padded_vocab(self) -> int:
        """Rows of the token embedding (and columns of the logits)."""
        return padded_vocab_size(self.vocab_size, self.vocab_pad_multiple)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


EXECUTION_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig) if not f.metadata["architecture"])
