"""The pretraining corpus of a data section: its tokenizer (SentencePiece, or a Hugging Face vocabulary such
as GPT-2's), and its packed train / held-out batches."""

from __future__ import annotations

import hashlib
import itertools
import os

import jax
import numpy as np

from gptjax.data import tokenizer_files
from gptjax.data.mixture import MixedBatches, quotas
from gptjax.data.packing import RowBatches, as_batch
from gptjax.data.sources import (is_held_out, iter_source_documents, parse_sources, parse_weights,
                                 source_documents, source_fingerprint, text_field)
from gptjax.data.token_files import ShardWriter, TokenRows, read_prepared, source_dir
from gptjax.data.tokenizer import Tokenizer, check_vocab, train_tokenizer
from gptjax.errors import UserError


def corpus_documents(data_cfg) -> dict[str, tuple[list[str], list[str]]]:
    """source spec -> (train documents, held-out documents), all in memory."""
    return {spec: source_documents(spec, data_cfg) for spec in parse_sources(data_cfg.source)}


def _tokenizer_sample(corpus: dict | None, data_cfg):
    """Training documents for the tokenizer: at most data.tokenizer_documents, shared between the
    sources, read from the corpus in memory if it is there and streamed from the sources if not."""
    specs = parse_sources(data_cfg.source)
    per_source = max(1, data_cfg.tokenizer_documents // len(specs))
    for spec in specs:
        if corpus:
            docs = iter(corpus[spec][0])
        else:
            docs = (d for i, d in enumerate(iter_source_documents(spec, data_cfg))
                    if not is_held_out(i, data_cfg.eval_fraction))
        yield from itertools.islice(docs, per_source)


def _filled(cache: dict | None, data_cfg) -> dict:
    """The corpus documents, read once into `cache` (a dict shared by the caller's steps)."""
    cache = {} if cache is None else cache
    if not cache:
        cache.update(corpus_documents(data_cfg))
    return cache


def _given_tokenizer(path: str):
    """data.tokenizer: a SentencePiece model file, or a Hugging Face tokenizer folder or tokenizer.json."""
    if not os.path.exists(path):
        raise UserError(f"data.tokenizer={path} does not exist; give a SentencePiece .model, a Hugging Face "
                        f"tokenizer folder or tokenizer.json, or leave it empty to train one")
    if os.path.isdir(path) or path.endswith(".json"):
        from gptjax.data.hf_tokenizer import HFTokenizer
        return HFTokenizer.load(path)
    return Tokenizer.load(path)


def _keep_in_workdir(tokenizer, workdir: str, config_tokenizer: str) -> None:
    """Writes the run's tokenizer into WORKDIR unless the same one is there (so that processes
    after the first, and resumed runs, write nothing)."""
    held = tokenizer_files.load_folder(workdir)
    if held is not None and tokenizer_files.to_bytes(held) == tokenizer_files.to_bytes(tokenizer):
        return
    if held is not None:
        # Its checkpoints and prepared data are in this tokenizer's ids: another one would
        # silently change what every token means.
        kind = "SentencePiece" if isinstance(held, Tokenizer) else "Hugging Face"
        raise UserError(f"{workdir} holds the {kind} tokenizer its data and checkpoints were made with, and "
                        f"data.tokenizer={config_tokenizer} is a different one; a workdir keeps one tokenizer: "
                        f"leave data.tokenizer empty to go on with the workdir's, or pass a new --workdir")
    tokenizer_files.save_folder(tokenizer, workdir)


def workdir_tokenizer(data, workdir: str, model_vocab_size: int, corpus: dict | None = None):
    """The run's tokenizer, kept in WORKDIR: data.tokenizer (a SentencePiece .model, or a Hugging
    Face tokenizer with gptjax's control, eos and pad tokens added) copied there, else the one
    WORKDIR holds, else a SentencePiece model trained on the corpus once into WORKDIR/tokenizer.model.
    `data` is the run's data section; the tokenizer must fit the model's `model_vocab_size` rows."""
    if data.tokenizer:
        tokenizer = _given_tokenizer(data.tokenizer)
        _keep_in_workdir(tokenizer, workdir, data.tokenizer)
    elif (tokenizer := tokenizer_files.load_folder(workdir)) is not None:
        if isinstance(tokenizer, Tokenizer) and tokenizer.vocab_size != data.tokenizer_vocab_size:
            target = os.path.join(workdir, "tokenizer.model")
            raise UserError(f"{target} has {tokenizer.vocab_size} pieces but data.tokenizer_vocab_size is "
                            f"{data.tokenizer_vocab_size}; delete it to train a new one, or set "
                            f"data.tokenizer_vocab_size={tokenizer.vocab_size}")
    else:
        if data.tokenizer_vocab_size > model_vocab_size:
            raise UserError(f"data.tokenizer_vocab_size ({data.tokenizer_vocab_size}) exceeds "
                            f"model.vocab_size ({model_vocab_size}); lower the first or raise the second")
        texts = _tokenizer_sample(corpus, data)
        tokenizer = train_tokenizer(texts, data.tokenizer_vocab_size, os.path.join(workdir, "tokenizer"))
    check_vocab(model_vocab_size, tokenizer)
    return tokenizer


def _prepared_meta(d, tokenizer: Tokenizer, spec: str, split: str) -> dict:
    """What a prepared source must have been made with to be used under data section `d`."""
    meta = {"source": spec, "split": split, "eval_fraction": d.eval_fraction,
            "tokenizer_sha1": hashlib.sha1(tokenizer_files.to_bytes(tokenizer)).hexdigest()}
    if spec == "synthetic":
        meta.update(num_documents=d.num_documents, data_seed=d.seed)
    meta["files_sha1"] = source_fingerprint(spec, d)
    if spec.startswith("text:"):
        meta["text_documents"] = d.text_documents
    if spec.startswith("jsonl:"):
        # Under its older key, so that JSONL shards prepared before data.text_field stay valid.
        meta["jsonl_field"] = text_field(d)
    if spec.startswith(("parquet:", "hf:")):
        meta["text_field"] = text_field(d)
    if spec.startswith("tfds:"):
        meta["tfds_text_field"] = d.tfds_text_field
    return meta


def _encoded(tokenizer: Tokenizer, docs: list[str], chunk: int = 4096):
    for start in range(0, len(docs), chunk):
        yield from tokenizer.encode_batch(docs[start:start + chunk])


def prepare(data, workdir: str, tokenizer: Tokenizer) -> list[dict]:
    """Tokenizes every source of data section `data` into WORKDIR/data/ (`gptjax prepare`),
    streaming, so corpora larger than memory work."""
    written = []
    for spec in parse_sources(data.source):
        writers = {split: ShardWriter(source_dir(workdir, spec, split), tokenizer.vocab_size)
                   for split in ("train", "eval")}
        stream = iter_source_documents(spec, data)
        index = 0
        while chunk := list(itertools.islice(stream, 4096)):
            for ids in tokenizer.encode_batch(chunk):
                held = is_held_out(index, data.eval_fraction)
                writers["eval" if held else "train"].add([*ids, tokenizer.eos_id])
                index += 1
        for split, writer in writers.items():
            written.append(writer.close(_prepared_meta(data, tokenizer, spec, split)))
    return written


def _rows(data, seq_len: int, workdir, tokenizer, spec, split, docs_of) -> TokenRows:
    """Rows from WORKDIR/data/ when the source was prepared for these settings, else tokenized now."""
    shards = read_prepared(source_dir(workdir, spec, split), _prepared_meta(data, tokenizer, spec, split))
    if shards is None:
        stream = np.fromiter((t for ids in _encoded(tokenizer, docs_of()) for t in (*ids, tokenizer.eos_id)),
                             dtype=np.int32)
        shards = [stream]
    return TokenRows(shards, seq_len, tokenizer.pad_id)


def pretraining_batches(d, tokenizer: Tokenizer, workdir: str, *, batch_size: int, seq_len: int, seed: int,
                        eval_batches: int, corpus: dict | None = None):
    """(train batches with .batch(step), list of held-out batch dicts) of data section `d`:
    global batches of `batch_size` rows of `seq_len` + 1 tokens, shuffled from `seed`, and at
    most `eval_batches` held-out batches."""
    specs = parse_sources(d.source)
    weights = parse_weights(d.weights, len(specs))
    counts = quotas(weights, batch_size, specs) if len(specs) > 1 else [batch_size]
    for spec, count in zip(specs, counts):
        if count % jax.process_count():
            raise UserError(f"data.source {spec} fills {count} rows of each batch, which does not split over "
                            f"{jax.process_count()} processes; adjust data.weights or train.batch_size")
    parts, eval_rows = [], []

    corpus = {} if corpus is None else corpus

    def documents_of(spec, index):
        return lambda: _filled(corpus, d)[spec][index]

    for number, (spec, count) in enumerate(zip(specs, counts)):
        rows = _rows(d, seq_len, workdir, tokenizer, spec, "train", documents_of(spec, 0))
        if len(rows) < count:
            raise UserError(f"data.source {spec} fills only {len(rows)} rows of {seq_len + 1} tokens, fewer "
                            f"than the {count} it must give each batch; add text or lower train.batch_size")
        parts.append(RowBatches(rows, count, seed + 1000 * number, eos_id=tokenizer.eos_id,
                                pad_id=tokenizer.pad_id, document_mask=d.document_mask,
                                process_index=jax.process_index(), process_count=jax.process_count()))
        held = _rows(d, seq_len, workdir, tokenizer, spec, "eval", documents_of(spec, 1))
        if len(held):
            eval_rows.append(held[np.arange(len(held))])
    batches = parts[0] if len(parts) == 1 else MixedBatches(parts)
    held_out = np.concatenate(eval_rows) if eval_rows else np.zeros((0, seq_len + 1), np.int32)
    # Global batches of batch_size rows; the last one padded with rows that count for nothing,
    # so every held-out row up to eval_batches batches is scored once.
    held_out = held_out[:eval_batches * batch_size]
    held_batches = []
    for start in range(0, len(held_out), batch_size):
        rows = np.full((batch_size, seq_len + 1), tokenizer.pad_id, np.int32)
        part = held_out[start:start + batch_size]
        rows[:len(part)] = part
        held_batches.append(as_batch(rows, tokenizer.eos_id, tokenizer.pad_id, d.document_mask))
    return batches, held_batches
