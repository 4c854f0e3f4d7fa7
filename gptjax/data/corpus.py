"""The pretraining corpus of a config: its tokenizer, and its packed train / held-out batches."""

from __future__ import annotations

import os
import shutil

import numpy as np

from gptjax.data.mixture import MixedBatches, quotas
from gptjax.data.packing import RowBatches, as_batch, pack_rows
from gptjax.data.sources import parse_sources, parse_weights, source_documents
from gptjax.data.tokenizer import Tokenizer, check_vocab, train_tokenizer
from gptjax.errors import UserError


def split_documents(docs: list[str], eval_fraction: float) -> tuple[list[str], list[str]]:
    """(train, held-out): the last eval_fraction of the documents is never trained on."""
    num_eval = max(1, int(round(len(docs) * eval_fraction))) if eval_fraction > 0 and len(docs) > 1 else 0
    return docs[: len(docs) - num_eval], docs[len(docs) - num_eval:]


def corpus_documents(data_cfg) -> dict[str, tuple[list[str], list[str]]]:
    """source spec -> (train documents, held-out documents)."""
    return {spec: split_documents(source_documents(spec, data_cfg), data_cfg.eval_fraction)
            for spec in parse_sources(data_cfg.source)}


def workdir_tokenizer(config, workdir: str, corpus: dict | None = None) -> Tokenizer:
    """WORKDIR/tokenizer.model: copied from data.tokenizer, or trained on the corpus once."""
    target = os.path.join(workdir, "tokenizer.model")
    if config.data.tokenizer:
        if not os.path.isfile(config.data.tokenizer):
            raise UserError(f"data.tokenizer={config.data.tokenizer} does not exist; give the path of a "
                            f"SentencePiece .model or leave it empty to train one")
        tokenizer = Tokenizer.load(config.data.tokenizer)
        if os.path.abspath(config.data.tokenizer) != os.path.abspath(target):
            shutil.copyfile(config.data.tokenizer, target)
    elif os.path.isfile(target):
        tokenizer = Tokenizer.load(target)
        if tokenizer.vocab_size != config.data.tokenizer_vocab_size:
            raise UserError(f"{target} has {tokenizer.vocab_size} pieces but data.tokenizer_vocab_size is "
                            f"{config.data.tokenizer_vocab_size}; delete it to train a new one, or set "
                            f"data.tokenizer_vocab_size={tokenizer.vocab_size}")
    else:
        if config.data.tokenizer_vocab_size > config.model.vocab_size:
            raise UserError(f"data.tokenizer_vocab_size ({config.data.tokenizer_vocab_size}) exceeds "
                            f"model.vocab_size ({config.model.vocab_size}); lower the first or raise the second")
        corpus = corpus or corpus_documents(config.data)
        texts = (doc for train, _ in corpus.values() for doc in train)
        tokenizer = train_tokenizer(texts, config.data.tokenizer_vocab_size, os.path.join(workdir, "tokenizer"))
    check_vocab(config.model.vocab_size, tokenizer)
    return tokenizer


def pretraining_batches(config, tokenizer: Tokenizer, corpus: dict | None = None):
    """(train batches with .batch(step), list of held-out batch dicts)."""
    corpus = corpus or corpus_documents(config.data)
    specs = list(corpus)
    weights = parse_weights(config.data.weights, len(specs))
    t, d = config.train, config.data
    counts = quotas(weights, t.batch_size, specs) if len(specs) > 1 else [t.batch_size]
    parts, eval_rows = [], []
    for index, (spec, count) in enumerate(zip(specs, counts)):
        train_docs, eval_docs = corpus[spec]
        rows = pack_rows(tokenizer.encode_batch(train_docs), tokenizer.eos_id, t.seq_len, tokenizer.pad_id)
        if len(rows) < count:
            raise UserError(f"data.source {spec} fills only {len(rows)} rows of {t.seq_len + 1} tokens, fewer "
                            f"than the {count} it must give each batch; add text or lower train.batch_size")
        parts.append(RowBatches(rows, count, t.seed + 1000 * index, eos_id=tokenizer.eos_id,
                                pad_id=tokenizer.pad_id, document_mask=d.document_mask))
        if eval_docs:
            eval_rows.append(pack_rows(tokenizer.encode_batch(eval_docs), tokenizer.eos_id, t.seq_len,
                                       tokenizer.pad_id))
    batches = parts[0] if len(parts) == 1 else MixedBatches(parts)
    held_out = np.concatenate(eval_rows) if eval_rows else np.zeros((0, t.seq_len + 1), np.int32)
    size = min(t.batch_size, len(held_out))
    count = min(t.eval_batches, len(held_out) // size) if size else 0
    eval_batches = [as_batch(held_out[i * size:(i + 1) * size], tokenizer.eos_id, tokenizer.pad_id,
                             d.document_mask) for i in range(count)]
    return batches, eval_batches
