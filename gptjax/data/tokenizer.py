"""SentencePiece BPE tokenizer with fixed ids for the special tokens the data pipeline relies on.

Ids 0-5 are reserved so packing and fine-tuning transforms can use them as constants without
loading a model: pad=0, unk=1, eos (end of document)=2, then the control symbols <start>=3,
<delim>=4, <extract>=5. There is no bos; documents are separated by eos alone.

Round trips: decode(encode(text)) == text for any valid Unicode text except that U+2581 ("▁"), which
SentencePiece uses internally to mark spaces, comes back as a plain space. Normalization is
'identity' and extra whitespace is kept, so spaces, tabs, newlines and unicode survive; characters
the model never saw are spelled as UTF-8 bytes (byte fallback) instead of becoming <unk>.
Each encode() call adds one leading "▁" that decode() removes, so decoding a concatenation of
two encodings inserts a space between them: decode(encode(a) + encode(b)) == a + " " + b.

Control symbols are never produced from text: a literal "<start>" in the input is encoded as
ordinary pieces, so only code can emit ids 3-5.
"""

from __future__ import annotations

import glob
import io
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm

from gptjax.errors import UserError

PAD_ID, UNK_ID, EOS_ID, START_ID, DELIM_ID, EXTRACT_ID = range(6)
CONTROL_SYMBOLS = ("<start>", "<delim>", "<extract>")
# SentencePiece silently skips training sentences longer than this many UTF-8 bytes.
MAX_SENTENCE_BYTES = 4192


def _default_threads() -> int:
    return max(1, min(os.cpu_count() or 1, 16))


class Tokenizer:
    """A loaded gptjax SentencePiece model. Create with Tokenizer.load() or train_tokenizer()."""

    def __init__(self, processor: spm.SentencePieceProcessor, path: str | None = None,
                 num_threads: int | None = None):
        self._sp = processor
        self._path = path
        self._num_threads = num_threads or _default_threads()
        _check_special_ids(processor, path or "<in-memory model>")

    @classmethod
    def load(cls, path: str | os.PathLike, num_threads: int | None = None) -> "Tokenizer":
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise UserError(f"tokenizer model {path!r} does not exist or is not a file; point the config at a "
                            "'.model' file written by train_tokenizer, or train one first")
        try:
            sp = spm.SentencePieceProcessor(model_file=path)
        except (RuntimeError, OSError) as e:
            raise UserError(f"{path!r} is not a valid SentencePiece model ({e}); pass the '.model' "
                            "file written by train_tokenizer, not the '.vocab' file or other data") from None
        return cls(sp, path, num_threads)

    @classmethod
    def from_proto(cls, proto: bytes, num_threads: int | None = None) -> "Tokenizer":
        """From the bytes of a .model file (as a checkpoint stores them)."""
        return cls(spm.SentencePieceProcessor(model_proto=proto), None, num_threads)

    # Data-loader worker processes receive the tokenizer by pickling; the model bytes are all they
    # need, and they keep working even where the original model file is not mounted.
    def __getstate__(self):
        return {"proto": self.serialized_model_proto(), "path": self._path, "threads": self._num_threads}

    def __setstate__(self, state):
        self.__init__(spm.SentencePieceProcessor(model_proto=state["proto"]), state["path"], state["threads"])

    vocab_size = property(lambda self: self._sp.vocab_size())
    path = property(lambda self: self._path)
    pad_id = property(lambda self: PAD_ID)
    unk_id = property(lambda self: UNK_ID)
    eos_id = property(lambda self: EOS_ID)
    start_id = property(lambda self: START_ID)
    delim_id = property(lambda self: DELIM_ID)
    extract_id = property(lambda self: EXTRACT_ID)

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), out_type=int, num_threads=self._num_threads)

    def _clean(self, ids) -> list[int]:
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        arr = arr[arr != PAD_ID]
        # A model's embedding table may be padded past the tokenizer's vocabulary, so sampling can
        # yield ids the tokenizer lacks; show them as <unk> rather than failing the whole decode.
        arr[(arr < 0) | (arr >= self.vocab_size)] = UNK_ID
        return arr.tolist()

    def decode(self, ids) -> str:
        """Ids (list or numpy array) to text; pad is dropped and control ids decode to ''."""
        return self._sp.decode(self._clean(ids))

    def decode_batch(self, batch: Iterable) -> list[str]:
        return self._sp.decode([self._clean(ids) for ids in batch], num_threads=self._num_threads)

    def serialized_model_proto(self) -> bytes:
        return self._sp.serialized_model_proto()

    def save(self, path: str | os.PathLike) -> None:
        """Write the model so that plain sentencepiece.SentencePieceProcessor can load it."""
        write_atomic(Path(path), self.serialized_model_proto())

    def __repr__(self) -> str:
        return f"Tokenizer(path={self._path!r}, vocab_size={self.vocab_size})"


def _check_special_ids(sp: spm.SentencePieceProcessor, where: str) -> None:
    found = {"pad": sp.pad_id(), "unk": sp.unk_id(), "eos": sp.eos_id()}
    found.update({s: sp.piece_to_id(s) if sp.is_control(sp.piece_to_id(s)) else -1 for s in CONTROL_SYMBOLS})
    expected = dict(zip(["pad", "unk", "eos", *CONTROL_SYMBOLS], range(6)))
    if found != expected:
        raise UserError(f"{where} is a SentencePiece model without gptjax's reserved token ids "
                        f"(expected {expected}, found {found}); train it with gptjax's train_tokenizer")


def check_vocab(model_vocab_size: int, tokenizer: Tokenizer) -> None:
    """Fail early when the model's embedding table cannot hold every tokenizer id."""
    if model_vocab_size < tokenizer.vocab_size:
        n = tokenizer.vocab_size
        name = f"tokenizer {tokenizer.path}" if tokenizer.path else "tokenizer"
        raise UserError(f"model.vocab_size is {model_vocab_size} but the {name} has {n} tokens; set "
                        f"model.vocab_size to at least {n} (a multiple of 128 such as "
                        f"{-(-n // 128) * 128} runs faster on accelerators)")


def write_atomic(path: Path, data: bytes) -> None:
    # A crash mid-write must not leave a truncated model that later fails to load mysteriously.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _resolve_files(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    files: list[str] = []
    for s in map(os.fspath, specs):
        # Sorted so the same glob feeds the trainer the same order on every machine.
        matches = sorted(glob.glob(s, recursive=True)) if any(c in s for c in "*?[") else [s]
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise UserError(f"tokenizer training input {s!r} matches no files; fix the path or glob "
                            "(to train on in-memory texts, pass an iterator such as iter(texts))")
        files.extend(matches)
    return files


def _read_files(files: list[str]) -> Iterator[str]:
    for f in files:
        try:
            with open(f, encoding="utf-8") as fh:
                yield from fh
        except UnicodeDecodeError as e:
            raise UserError(f"{f} is not UTF-8 text ({e}); convert it to UTF-8 or leave it out") from None


def _training_lines(docs: Iterable[str]) -> Iterator[str]:
    for doc in docs:
        if not isinstance(doc, str):
            raise UserError(f"tokenizer training texts must be str, got {type(doc).__name__}")
        for line in doc.splitlines():
            if not line.strip():
                continue
            if len(line.encode("utf-8")) <= MAX_SENTENCE_BYTES:
                yield line
                continue
            # Over-long lines would be dropped by the trainer; cut them (at spaces where possible).
            # A quarter of the byte limit in characters fits whatever the script.
            step, start = MAX_SENTENCE_BYTES // 4, 0
            while start < len(line):
                end = min(start + step, len(line))
                cut = line.rfind(" ", start + 1, end) if end < len(line) else -1
                yield line[start:cut if cut > 0 else end]
                start = cut + 1 if cut > 0 else end


class _Feed:
    """Counts lines and keeps exceptions, which the C++ trainer would flatten into RuntimeError."""

    def __init__(self, lines: Iterator[str]):
        self.lines, self.count, self.error = lines, 0, None

    def __iter__(self):
        try:
            for line in self.lines:
                self.count += 1
                yield line
        except Exception as e:
            self.error = e
            raise


def train_tokenizer(texts_or_files, vocab_size: int, output_prefix: str | os.PathLike, *,
                    max_sentences: int | None = 1_000_000, seed: int = 0,
                    num_threads: int | None = None) -> Tokenizer:
    """Train a BPE model and write <output_prefix>.model and <output_prefix>.vocab.

    texts_or_files: a path or glob (str/PathLike), a list/tuple of paths or globs, or any other
    iterable of document strings (e.g. a generator, or iter(list_of_texts)). A list of str is
    read as paths because that is the common command-line case.

    max_sentences: lines sampled (seeded) for training; None uses all lines, at a memory cost.
    For one sentencepiece version the output bytes depend only on the input, vocab_size,
    max_sentences, seed and num_threads; num_threads is merely recorded in the model and does not
    change the learned vocabulary.
    """
    if max_sentences is not None and max_sentences <= 100:
        raise UserError(f"max_sentences must be above 100 or None, not {max_sentences}")
    if isinstance(texts_or_files, (str, os.PathLike, list, tuple)):
        docs = _read_files(_resolve_files(texts_or_files))
    else:
        docs = texts_or_files
    feed = _Feed(_training_lines(docs))
    num_threads = num_threads or _default_threads()
    # The seed is process-wide in sentencepiece; it drives the max_sentences sampling.
    spm.set_random_generator_seed(seed)
    writer = io.BytesIO()  # in-memory so the output path is not recorded and the bytes are reproducible
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(feed), model_writer=writer, model_type="bpe", vocab_size=vocab_size,
            pad_id=PAD_ID, unk_id=UNK_ID, eos_id=EOS_ID, bos_id=-1, control_symbols=list(CONTROL_SYMBOLS),
            character_coverage=1.0, byte_fallback=True, normalization_rule_name="identity",
            remove_extra_whitespaces=False, max_sentence_length=MAX_SENTENCE_BYTES,
            input_sentence_size=max_sentences or 0, shuffle_input_sentence=True,
            num_threads=num_threads, minloglevel=2)
    except RuntimeError as e:
        if feed.error is not None:
            raise feed.error from None
        if feed.count == 0:
            raise UserError("the tokenizer training input contains no text; check the files or texts given") from None
        msg = str(e)
        if m := re.search(r"Vocabulary size too high \((\d+)\).*?<= (\d+)", msg):
            raise UserError(f"vocab_size {m[1]} is too large for this corpus; lower it to at most {m[2]} "
                            "or train on more text") from None
        if m := re.search(r"smaller than required_chars\. (\d+) vs (\d+)", msg):
            raise UserError(f"vocab_size {m[1]} is too small: the corpus needs {m[2]} pieces for its characters, "
                            f"256 byte pieces and the special tokens; raise vocab_size to at least {m[2]}") from None
        raise
    prefix = Path(output_prefix)
    model_path = prefix.with_name(prefix.name + ".model")
    write_atomic(model_path, writer.getvalue())
    tok = Tokenizer.load(model_path, num_threads)
    sp = tok._sp
    vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(tok.vocab_size))
    write_atomic(prefix.with_name(prefix.name + ".vocab"), vocab.encode("utf-8"))
    return tok
