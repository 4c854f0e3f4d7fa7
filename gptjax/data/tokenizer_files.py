"""Where a tokenizer lives: in a folder (a workdir or a Hugging Face model folder) and inside a
checkpoint, for both backends (SentencePiece, Hugging Face `tokenizers`).

A folder holds tokenizer.model (SentencePiece) or Hugging Face files (tokenizer.json, or
vocab.json + merges.txt). A checkpoint holds bytes: the SentencePiece model proto, or a JSON
document naming the Hugging Face tokenizer and its special tokens.
"""

from __future__ import annotations

import json
import os

HF_FORMAT = "gptjax-hf-tokenizer"


def load_folder(path: str):
    """The tokenizer in `path`, or None when it holds none."""
    if os.path.isfile(os.path.join(path, "tokenizer.model")):
        from gptjax.data.tokenizer import Tokenizer
        from gptjax.errors import UserError
        model = os.path.join(path, "tokenizer.model")
        try:
            return Tokenizer.load(model)
        except UserError:
            # The folder's own file, written by a run: damaged, not a wrong file the user chose.
            raise UserError(f"{model} is damaged (not a readable SentencePiece model); put back the "
                            f"tokenizer this folder's run was made with, or pass a new --workdir") from None
    if any(os.path.isfile(os.path.join(path, name)) for name in ("tokenizer.json", "vocab.json")):
        from gptjax.data.hf_tokenizer import HFTokenizer  # needs the tokenizers package
        return HFTokenizer.load(path)
    return None


def save_folder(tokenizer, path: str) -> None:
    """Writes `tokenizer` into the folder `path` so that load_folder reads it back."""
    if hasattr(tokenizer, "save_pretrained"):  # Hugging Face: its own files, which AutoTokenizer reads too
        tokenizer.save_pretrained(path)
    else:
        tokenizer.save(os.path.join(path, "tokenizer.model"))


def to_bytes(tokenizer) -> bytes:
    if hasattr(tokenizer, "special_token_names"):
        return json.dumps({"format": HF_FORMAT, "tokenizer": tokenizer.to_json(),
                           "names": tokenizer.special_token_names}).encode("utf-8")
    return tokenizer.serialized_model_proto()


def from_bytes(data: bytes):
    if data[:1] == b"{":  # a SentencePiece proto starts with a protobuf tag, never "{"
        values = json.loads(data.decode("utf-8"))
        if values.get("format") == HF_FORMAT:
            import tokenizers

            from gptjax.data.hf_tokenizer import HFTokenizer
            return HFTokenizer(tokenizers.Tokenizer.from_str(values["tokenizer"]), None, **values["names"])
    from gptjax.data.tokenizer import Tokenizer
    return Tokenizer.from_proto(data)
