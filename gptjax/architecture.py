"""`Architecture`: what a decoder's weights are, as a frozen value, and its Hugging Face form.

    arch = Architecture(n_layer=2, d_model=64, n_head=4, d_ff=256, max_len=128)
    Architecture.from_hf_config(json.load(open("gpt2/config.json")))   -> Architecture
    arch.hf_config()                                                    -> the config.json fields it fixes

A checkpoint fixes these fields (shapes, block kind, vocabulary, LayerNorm epsilon,
initialisation): a resume refuses any change of them and fine-tuning takes them from the
pretrained model. This class is where that set is declared; `ModelConfig` (model_config.py) is
these fields plus the execution settings, which say how the weights are run and trained.

The defaults are `config.base_config()`'s model defaults (GPT-2 small); tests/test_model_config.py
holds the two equal field by field, so an Architecture built from only the fields a source knows
is the same value a run config with those fields set would give.
"""

import dataclasses

from gptjax.errors import UserError

HF_MODEL_TYPES = ("gpt2", "openai-gpt")
# Activations that compute the tanh form of GELU, which is what our MLP uses.
TANH_GELUS = ("gelu_new", "gelu_fast", "gelu_pytorch_tanh")


def _accepts(kind: type, value) -> bool:
    if kind in (int, float) and isinstance(value, bool):  # True is an int to Python, not to a config
        return False
    return isinstance(value, (int, float) if kind is float else kind)


def check_field_types(instance) -> None:
    """For a frozen dataclass of `model.*` fields: a UserError naming the first field whose value is
    not of its type, else each value stored as its field's type (JSON writes 0.0 as 0, and equal
    configs must print and hash alike)."""
    for field in dataclasses.fields(instance):
        value = getattr(instance, field.name)
        if not _accepts(field.type, value):
            raise UserError(f"model.{field.name} expects {field.type.__name__}, got {value!r}")
        object.__setattr__(instance, field.name, field.type(value))


def _get(hf: dict, *names):
    """A required config field under any of its names (newer configs may use the generic ones)."""
    for name in names:
        if hf.get(name) is not None:
            return hf[name]
    raise UserError(f"the Hugging Face config.json has no '{names[0]}'")


@dataclasses.dataclass(frozen=True)
class Architecture:
    block: str = "pre_ln"
    vocab_size: int = 50257
    vocab_pad_multiple: int = 128
    n_layer: int = 12
    n_head: int = 12
    d_model: int = 768
    d_ff: int = 3072
    max_len: int = 1024
    init_std: float = 0.02
    scale_residual_init: bool = True
    ln_eps: float = 1e-5

    def __post_init__(self):
        check_field_types(self)

    @classmethod
    def from_hf_config(cls, hf: dict) -> "Architecture":
        """The architecture of a Hugging Face GPT-2 / openai-gpt config.json, or a UserError saying
        which setting gptjax cannot represent.

        Hugging Face has no field for two of ours: the embedding's padding (not part of the
        exported weights) is gptjax's default, and the residual-init scaling follows the model type
        as transformers' own initialisation does (GPT-2 scales, openai-gpt does not)."""
        kind = hf.get("model_type")
        if kind not in HF_MODEL_TYPES:
            raise UserError(f"unsupported Hugging Face model_type '{kind}': gptjax reads "
                            f"{' and '.join(HF_MODEL_TYPES)} (GPT2LMHeadModel, OpenAIGPTLMHeadModel)")
        d = _get(hf, "n_embd", "hidden_size")
        if kind == "gpt2":
            act, d_ff = hf.get("activation_function", "gelu_new"), hf.get("n_inner") or 4 * d
            unsupported = {"scale_attn_weights": (hf.get("scale_attn_weights", True), True),
                           "scale_attn_by_inverse_layer_idx": (hf.get("scale_attn_by_inverse_layer_idx", False), False),
                           "add_cross_attention": (hf.get("add_cross_attention", False), False)}
        else:
            act, d_ff = hf.get("afn", "gelu"), 4 * d
            act = "gelu_new" if act == "gelu" else act  # openai-gpt's "gelu" is the tanh form
            unsupported = {}
        unsupported["tie_word_embeddings"] = (hf.get("tie_word_embeddings", True), True)
        if act not in TANH_GELUS:
            raise UserError(f"activation '{act}' is not supported: gptjax's MLP uses the tanh GELU "
                            f"({', '.join(TANH_GELUS)})")
        for key, (value, wanted) in unsupported.items():
            if value != wanted:
                raise UserError(f"Hugging Face config {key}={value} is not supported (gptjax needs {wanted})")
        return cls(block="pre_ln" if kind == "gpt2" else "post_ln", vocab_size=_get(hf, "vocab_size"),
                   n_layer=_get(hf, "n_layer", "num_hidden_layers"), n_head=_get(hf, "n_head", "num_attention_heads"),
                   d_model=d, d_ff=d_ff, max_len=_get(hf, "n_positions", "n_ctx", "max_position_embeddings"),
                   init_std=float(hf.get("initializer_range", 0.02)), scale_residual_init=kind == "gpt2",
                   ln_eps=float(hf.get("layer_norm_epsilon", 1e-5)))

    def hf_config(self) -> dict:
        """The config.json fields for transformers that this architecture fixes: GPT-2 for pre-LN
        models, openai-gpt for post-LN ones (the two differ exactly where `block` does).
        `from_hf_config` reads them back to this value, but for the two fields Hugging Face has no
        place for (see there)."""
        common = dict(vocab_size=self.vocab_size, n_positions=self.max_len, n_embd=self.d_model,
                      n_layer=self.n_layer, n_head=self.n_head, layer_norm_epsilon=self.ln_eps,
                      initializer_range=self.init_std, tie_word_embeddings=True)
        if self.block == "pre_ln":
            return dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", activation_function="gelu_new",
                        n_inner=None if self.d_ff == 4 * self.d_model else self.d_ff, scale_attn_weights=True,
                        **common)
        if self.d_ff != 4 * self.d_model:
            raise UserError(f"openai-gpt has no MLP-width setting (it is 4 * n_embd = {4 * self.d_model}), but this "
                            f"post-LN model has model.d_ff={self.d_ff}; only pre-LN models export with any width "
                            f"(as GPT-2)")
        return dict(architectures=["OpenAIGPTLMHeadModel"], model_type="openai-gpt", afn="gelu", n_ctx=self.max_len,
                    **common)
