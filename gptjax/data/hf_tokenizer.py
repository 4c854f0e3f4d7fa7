"""Hugging Face `tokenizers` backend with the interface of gptjax.data.tokenizer.Tokenizer.

HFTokenizer.load() reads a Hugging Face tokenizer folder (tokenizer.json, or vocab.json + merges.txt
of a GPT-2 or openai-gpt tokenizer) or a tokenizer.json file, and encodes text to the same ids as
transformers' AutoTokenizer on that folder with add_special_tokens=False.

Ids differ from the SentencePiece backend: nothing is fixed at 0-5. gptjax needs three control
symbols (<start>, <delim>, <extract>), an end-of-document token and a padding token; those the
tokenizer lacks are appended after its vocabulary as special tokens, in that order:
  <start>, <delim>, <extract>, then <|endoftext|> if there is no eos, then <pad> if there is no pad.
`base_vocab_size` is the size before these additions, `added_tokens` maps each added name to its
id, and loading a tokenizer saved by save()/save_pretrained() finds them and adds nothing again.

eos: the tokenizer's own (tokenizer_config.json's eos_token, else <|endoftext|> or </s>). openai-gpt
has none, so it gets <|endoftext|>: pretraining packs documents separated by eos, and a model
cannot learn where documents end from <unk>, which also stands for unknown characters.
pad: the tokenizer's own pad token when it has one distinct from eos, else an added <pad>. The
packing code masks the loss wherever the target is pad_id, so a pad equal to eos would stop the
model from ever learning to predict end of document.

No special token can come from text: a literal "<start>", "<|endoftext|>" or "<unk>" in the input
is tokenized as ordinary characters (the `encode_special_tokens` switch of `tokenizers`, which is
what transformers calls split_special_tokens=True). So only code emits control, eos and pad ids.
This is the one place where ids differ from AutoTokenizer's defaults, which would turn a literal
"<|endoftext|>" in GPT-2 input into the eos id. The switch is not part of tokenizer.json:
save_pretrained() records it as split_special_tokens in tokenizer_config.json, but a bare
tokenizer.json loaded elsewhere matches special tokens in text again.

decode() drops pad, eos, control and other special tokens but keeps <unk> visible (as the unk
token's text); ids outside the vocabulary decode as the unk token, as in the SentencePiece backend
(GPT-2's unk token is <|endoftext|>, so that is the text they show there).
Parallelism in encode_batch/decode_batch is the tokenizers library's thread pool, sized by the
RAYON_NUM_THREADS environment variable.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm
import tokenizers
from tokenizers import AddedToken, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from gptjax.data.tokenizer import CONTROL_SYMBOLS, Tokenizer, write_atomic
from gptjax.errors import UserError

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"
_EOS_CANDIDATES = (EOS_TOKEN, "</s>")
GPT2, OPENAI_GPT = "gpt2", "openai-gpt"
_KIND_OF_CLASS = {"GPT2Tokenizer": GPT2, "GPT2TokenizerFast": GPT2,
                  "OpenAIGPTTokenizer": OPENAI_GPT, "OpenAIGPTTokenizerFast": OPENAI_GPT}
_KIND_OF_MODEL_TYPE = {"gpt2": GPT2, "openai-gpt": OPENAI_GPT}
_ROLES = ("bos_token", "eos_token", "pad_token", "unk_token")


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer with gptjax's control, eos and pad tokens.

    Create with HFTokenizer.load(); the constructor takes a tokenizers.Tokenizer and adds to it
    (in place) whichever of gptjax's tokens it lacks. eos_token/pad_token/unk_token name the
    tokenizer's own special tokens where known (from tokenizer_config.json).
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, path: str | None = None, *,
                 eos_token: str | None = None, pad_token: str | None = None, unk_token: str | None = None):
        tok = self._tok = tokenizer
        self._path = path
        # A tokenizer.json from the hub may carry truncation or padding settings; gptjax packs and
        # pads sequences itself and needs every token of every document.
        tok.no_truncation()
        tok.no_padding()
        for name in CONTROL_SYMBOLS:
            _ensure_special(tok, name)
        if eos_token is None:
            eos_token = next((t for t in _EOS_CANDIDATES if tok.token_to_id(t) is not None), EOS_TOKEN)
        if pad_token is None or pad_token == eos_token:
            pad_token = PAD_TOKEN
        self._eos_id = _ensure_special(tok, eos_token)
        self._pad_id = _ensure_special(tok, pad_token)
        model_unk = getattr(tok.model, "unk_token", None)
        unk_token = next((t for t in (unk_token, model_unk) if t and tok.token_to_id(t) is not None), eos_token)
        self._unk_id = tok.token_to_id(unk_token)
        self._names = {"eos_token": eos_token, "pad_token": pad_token, "unk_token": unk_token}
        self._control_ids = tuple(tok.token_to_id(name) for name in CONTROL_SYMBOLS)
        tok.encode_special_tokens = True  # not saved in tokenizer.json, so set on every construction

        vocab = tok.get_vocab(with_added_tokens=True)
        self._vocab_size = max(vocab.values()) + 1
        self._added, self._base_vocab_size = self._find_added()
        special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        drop = (special - {self._unk_id}) | {self._pad_id, self._eos_id, *self._control_ids}
        self._drop = np.fromiter(sorted(drop), dtype=np.int64)

    def _find_added(self) -> tuple[dict[str, int], int]:
        # gptjax's tokens are the run of its role tokens at the very top of the id range that the
        # underlying model does not know; computing it from ids keeps the answer the same when a
        # saved tokenizer is loaded again.
        roles = {name: self._tok.token_to_id(name) for name in (*CONTROL_SYMBOLS, self._names["eos_token"],
                                                                 self._names["pad_token"])}
        by_id = {i: name for name, i in roles.items() if self._tok.model.id_to_token(i) != name}
        base = self._vocab_size
        while base - 1 in by_id:
            base -= 1
        return {by_id[i]: i for i in range(base, self._vocab_size)}, base

    @classmethod
    def load(cls, path: str | os.PathLike) -> "HFTokenizer":
        """From a Hugging Face model/tokenizer folder or a tokenizer.json file."""
        path = os.fspath(path)
        if os.path.isfile(path) and os.path.basename(path) in ("vocab.json", "merges.txt"):
            path = os.path.dirname(path) or "."
        if os.path.isdir(path):
            folder = path
            json_file = os.path.join(folder, "tokenizer.json")
            if os.path.isfile(json_file):
                tok = _read_tokenizer_json(json_file)
            elif all(os.path.isfile(os.path.join(folder, f)) for f in ("vocab.json", "merges.txt")):
                tok = _from_vocab_and_merges(folder)
            else:
                raise UserError(_no_tokenizer_files(folder))
        elif os.path.isfile(path):
            _reject_sentencepiece(path)
            folder = os.path.dirname(path) or "."
            tok = _read_tokenizer_json(path)
        else:
            raise UserError(f"tokenizer {path!r} does not exist; point at a Hugging Face tokenizer folder "
                            "(with tokenizer.json, or vocab.json and merges.txt) or a tokenizer.json file")
        declared = _declared_special_tokens(folder)
        return cls(tok, path, **{role: declared.get(role) for role in ("eos_token", "pad_token", "unk_token")})

    # Pickled as the tokenizer's JSON, which holds the added tokens, so worker processes rebuild
    # exactly these ids without the original files.
    def __getstate__(self):
        return {"json": self._tok.to_str(), "path": self._path, "names": self._names}

    def __setstate__(self, state):
        self.__init__(tokenizers.Tokenizer.from_str(state["json"]), state["path"], **state["names"])

    vocab_size = property(lambda self: self._vocab_size)
    base_vocab_size = property(lambda self: self._base_vocab_size)
    added_tokens = property(lambda self: dict(self._added))
    path = property(lambda self: self._path)
    pad_id = property(lambda self: self._pad_id)
    unk_id = property(lambda self: self._unk_id)
    eos_id = property(lambda self: self._eos_id)
    start_id = property(lambda self: self._control_ids[0])
    delim_id = property(lambda self: self._control_ids[1])
    extract_id = property(lambda self: self._control_ids[2])
    backend = property(lambda self: self._tok, doc="the underlying tokenizers.Tokenizer")
    special_token_names = property(lambda self: dict(self._names), doc="eos_token, pad_token, unk_token")

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def _clean(self, ids) -> list[int]:
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        arr = arr[~np.isin(arr, self._drop)]
        # Sampling from an embedding table padded past the vocabulary can yield ids the tokenizer
        # lacks; `tokenizers` would silently skip them, so show them as the unk token instead.
        arr[(arr < 0) | (arr >= self._vocab_size)] = self._unk_id
        return arr.tolist()

    def decode(self, ids) -> str:
        """Ids (list or numpy array) to text; pad, eos and control ids decode to ''."""
        return self._tok.decode(self._clean(ids), skip_special_tokens=False)

    def decode_batch(self, batch: Iterable) -> list[str]:
        return self._tok.decode_batch([self._clean(ids) for ids in batch], skip_special_tokens=False)

    def to_json(self) -> str:
        return self._tok.to_str()

    def save(self, path: str | os.PathLike) -> None:
        """Write a tokenizer.json (with gptjax's added tokens); a folder gets path/tokenizer.json."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        write_atomic(path, self._tok.to_str(pretty=True).encode("utf-8"))

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json for AutoTokenizer."""
        write_pretrained(self._tok, folder, **self._names)

    def __repr__(self) -> str:
        return (f"HFTokenizer(path={self._path!r}, vocab_size={self._vocab_size}, "
                f"base_vocab_size={self._base_vocab_size})")


def write_pretrained(tok: tokenizers.Tokenizer, folder: str | os.PathLike, *, eos_token: str, unk_token: str,
                     pad_token: str) -> None:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json that transformers'
    AutoTokenizer loads with the same ids, gptjax's control tokens included. There is no bos:
    documents are separated by eos alone, and gptjax's model configs give eos as bos too."""
    folder = Path(folder)
    write_atomic(folder / "tokenizer.json", tok.to_str(pretty=True).encode("utf-8"))
    special_map = {"bos_token": eos_token, "eos_token": eos_token, "unk_token": unk_token, "pad_token": pad_token,
                   "additional_special_tokens": list(CONTROL_SYMBOLS)}
    decoder = {str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized,
                        "rstrip": t.rstrip, "single_word": t.single_word, "special": t.special}
               for i, t in sorted(tok.get_added_tokens_decoder().items())}
    config = {
        # The generic class loads tokenizer.json as is; a model-specific class (GPT2Tokenizer,
        # LlamaTokenizerFast) would rebuild the pipeline and keep only part of tokenizer.json.
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_map,
        "added_tokens_decoder": decoder,
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
    }
    for name, data in (("tokenizer_config.json", config), ("special_tokens_map.json", special_map)):
        write_atomic(folder / name, (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def load_any(path: str | os.PathLike, num_threads: int | None = None) -> Tokenizer | HFTokenizer:
    """A SentencePiece Tokenizer for a '.model' file, an HFTokenizer for a folder or '.json' file.

    num_threads applies to SentencePiece only (see the module docstring for tokenizers).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return HFTokenizer.load(path)
    if not os.path.isfile(path):
        raise UserError(f"tokenizer {path!r} does not exist; give a SentencePiece '.model' file, a "
                        "Hugging Face tokenizer folder or a tokenizer.json file")
    if path.endswith(".model"):
        return Tokenizer.load(path, num_threads)
    if path.endswith(".json"):
        return HFTokenizer.load(path)
    raise UserError(f"tokenizer {path!r} is neither a SentencePiece '.model' file nor a Hugging Face "
                    "tokenizer; give a '.model' file, a tokenizer.json file or a folder holding tokenizer.json")


def _ensure_special(tok: tokenizers.Tokenizer, name: str) -> int:
    # A token already in the model's vocabulary keeps its id when registered as special.
    current = next((t for t in tok.get_added_tokens_decoder().values() if t.content == name), None)
    if current is None or not current.special:
        tok.add_special_tokens([AddedToken(name, special=True, normalized=False)])
    return tok.token_to_id(name)


def _read_tokenizer_json(path: str) -> tokenizers.Tokenizer:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        return tokenizers.Tokenizer.from_str(text)
    except Exception as e:  # tokenizers reports every parse failure as a bare Exception
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"{path!r} is not a tokenizer.json that the tokenizers library can read ({reason}); "
                        "give a tokenizer.json written by tokenizers or by transformers' save_pretrained, "
                        "or the folder holding it") from None


def _reject_sentencepiece(path: str) -> None:
    if path.endswith(".model") or not _looks_like_json(path) and _is_sentencepiece(path):
        raise UserError(f"{path!r} is a SentencePiece model, not a Hugging Face tokenizer; use it as a "
                        "SentencePiece model (gptjax.data.tokenizer.Tokenizer.load, or load_any)")


def _looks_like_json(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(64).lstrip()[:1] in (b"{", b"[")


def _is_sentencepiece(path: str) -> bool:
    try:
        spm.SentencePieceProcessor(model_file=path)
    except (RuntimeError, OSError):
        return False
    return True


def _no_tokenizer_files(folder: str) -> str:
    msg = (f"{folder!r} holds no Hugging Face tokenizer: looked for tokenizer.json, or vocab.json with "
           "merges.txt; save one there with transformers' tokenizer.save_pretrained(folder)")
    models = sorted(p.name for p in Path(folder).glob("*.model"))
    if models:
        msg += f"; or pass {os.path.join(folder, models[0])!r} itself to use it as a SentencePiece model"
    return msg


def _read_json_dict(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (ValueError, OSError) as e:
        raise UserError(f"{path!r} is not valid JSON ({e}); fix or delete it") from None
    return data if isinstance(data, dict) else {}


def _token_name(value) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _declared_special_tokens(folder: str) -> dict[str, str | None]:
    """eos/pad/unk names from special_tokens_map.json, overridden by tokenizer_config.json."""
    found: dict[str, str | None] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        data = _read_json_dict(os.path.join(folder, name))
        found.update({role: _token_name(data[role]) for role in _ROLES if role in data})
    return found


def _detect_kind(folder: str, vocab: dict[str, int]) -> str:
    tokenizer_class = _read_json_dict(os.path.join(folder, "tokenizer_config.json")).get("tokenizer_class")
    if tokenizer_class:
        if tokenizer_class in _KIND_OF_CLASS:
            return _KIND_OF_CLASS[tokenizer_class]
        raise UserError(f"{folder!r} declares tokenizer_class {tokenizer_class!r}; gptjax reads vocab.json + "
                        "merges.txt only for GPT-2 and openai-gpt tokenizers, so add a tokenizer.json (e.g. "
                        "transformers.AutoTokenizer.from_pretrained(folder).save_pretrained(folder))")
    model_type = _read_json_dict(os.path.join(folder, "config.json")).get("model_type")
    if model_type in _KIND_OF_MODEL_TYPE:
        return _KIND_OF_MODEL_TYPE[model_type]
    if any(t.endswith("</w>") for t in vocab):
        return OPENAI_GPT
    if EOS_TOKEN in vocab or any(t.startswith("\u0120") for t in vocab):
        return GPT2
    raise UserError(f"cannot tell what kind of tokenizer vocab.json + merges.txt in {folder!r} are; add "
                    "tokenizer_config.json with tokenizer_class 'GPT2Tokenizer' or 'OpenAIGPTTokenizer', "
                    "or a tokenizer.json")


def _from_vocab_and_merges(folder: str) -> tokenizers.Tokenizer:
    """The pipelines transformers builds for GPT2Tokenizer and OpenAIGPTTokenizer."""
    vocab_file, merges_file = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    try:
        vocab, merges = BPE.read_file(vocab_file, merges_file)
    except Exception as e:  # tokenizers reports unreadable files as a bare Exception
        raise UserError(f"cannot read {vocab_file!r} and {merges_file!r} as a BPE vocabulary and merges ({e}); "
                        "replace them with files saved by transformers or tokenizers") from None
    kind = _detect_kind(folder, vocab)
    config = _read_json_dict(os.path.join(folder, "tokenizer_config.json"))
    declared = _declared_special_tokens(folder)
    if kind == GPT2:
        tok = tokenizers.Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                       end_of_word_suffix="", fuse_unk=False))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(config.get("add_prefix_space", False)))
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        defaults = {"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN}
    else:
        unk = declared.get("unk_token") or "<unk>"
        if unk not in vocab:
            # transformers appends a missing <unk> as an added token, and then fails on the first
            # unknown character because the BPE model cannot find it; giving the model the same id
            # keeps every id transformers produces and makes unknown characters encode as <unk>.
            vocab = {**vocab, unk: max(vocab.values(), default=-1) + 1}
        tok = tokenizers.Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, unk_token=unk,
                                       continuing_subword_prefix="", end_of_word_suffix="</w>", fuse_unk=False))
        # strip_accents=None follows lowercase, as in transformers: "café" becomes "cafe".
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.BPEDecoder(suffix="</w>")
        defaults = {"unk_token": "<unk>"}
    # transformers registers the class's special tokens as special added tokens, in this order,
    # appending any the vocabulary lacks; do the same so their ids match and gptjax's come after.
    for role in ("bos_token", "eos_token", "unk_token", "pad_token"):
        name = declared.get(role, defaults.get(role))
        if name:
            _ensure_special(tok, name)
    return tok
