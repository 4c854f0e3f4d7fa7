"""gptjax: pretrain, resume, fine-tune and evaluate GPT-style decoders with JAX and Flax."""

__version__ = "0.1.0"


def __getattr__(name):
    # Imported on first use so that `import gptjax` (and the CLI's --help) stays fast.
    if name == "GPT":
        from gptjax.api import GPT
        return GPT
    raise AttributeError(f"module 'gptjax' has no attribute {name!r}")
