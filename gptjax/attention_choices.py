"""The attention implementations a config may name, and what each one cannot compute whatever
the machine: read by `config.validate` (so a config is refused when it loads) and by
`attention.resolve` (which adds what depends on the target: GPU, TPU, dtype, head dim)."""

from gptjax.errors import UserError

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "pallas", "splash")
WITH_DROPOUT = ("auto", "xla", "pallas")  # those that drop attention probabilities
WITH_SEGMENTS = ("auto", "xla", "pallas", "splash")  # those that take packed-document masks


def check(implementation: str, *, dropout: bool, segments: bool) -> None:
    """Refuses an implementation that is unknown or cannot compute this attention."""
    if implementation not in IMPLEMENTATIONS:
        raise UserError(f"unknown model.attention '{implementation}'; use one of {', '.join(IMPLEMENTATIONS)}")
    if dropout and implementation not in WITH_DROPOUT:
        raise UserError(f"model.attention={implementation} has no attention dropout; set model.attn_dropout=0 "
                        f"or use model.attention={', '.join(WITH_DROPOUT[:-1])} or {WITH_DROPOUT[-1]}")
    if segments and implementation not in WITH_SEGMENTS:
        raise UserError(f"model.attention={implementation} supports plain causal attention only; packed-document "
                        f"masks (data.document_mask=true) need model.attention=auto, pallas or xla")
