"""The pretraining corpus of a config: its tokenizer and its packed train / held-out rows."""

from __future__ import annotations

import os
import shutil

import numpy as np

from gptjax.data import synthetic
from gptjax.data.packing import RowBatches, pack_rows
from gptjax.data.tokenizer import Tokenizer, check_vocab, train_tokenizer
from gptjax.errors import UserError


def corpus_documents(data_cfg) -> tuple[list[str], list[str]]:
    """(train documents, held-out documents); the held-out ones are never trained on."""
    docs = synthetic.documents(data_cfg.num_documents, seed=data_cfg.seed)
    num_eval = max(1, int(round(len(docs) * data_cfg.eval_fraction))) if data_cfg.eval_fraction > 0 else 0
    return docs[: len(docs) - num_eval], docs[len(docs) - num_eval:]


def workdir_tokenizer(config, workdir: str, train_docs: list[str] | None = None) -> Tokenizer:
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
    else:
        if train_docs is None:
            train_docs, _ = corpus_documents(config.data)
        tokenizer = train_tokenizer(iter(train_docs), config.data.tokenizer_vocab_size, os.path.join(workdir, "tokenizer"))
    check_vocab(config.model.vocab_size, tokenizer)
    return Tokenizer.load(target)


def pretraining_rows(config, tokenizer: Tokenizer, docs: tuple[list[str], list[str]] | None = None):
    """(RowBatches over the training rows, held-out rows [N, seq_len + 1])."""
    train_docs, eval_docs = docs or corpus_documents(config.data)
    seq_len = config.train.seq_len
    train_rows = pack_rows(tokenizer.encode_batch(train_docs), tokenizer.eos_id, seq_len)
    eval_rows = pack_rows(tokenizer.encode_batch(eval_docs), tokenizer.eos_id, seq_len) if eval_docs else None
    if len(train_rows) < config.train.batch_size:
        raise UserError(f"the corpus fills only {len(train_rows)} rows of {seq_len + 1} tokens, fewer than "
                        f"train.batch_size={config.train.batch_size}; raise data.num_documents or lower the batch")
    return RowBatches(train_rows, config.train.batch_size, config.train.seed), eval_rows


def eval_batches(eval_rows: np.ndarray | None, batch_size: int, max_batches: int) -> list[np.ndarray]:
    if eval_rows is None or len(eval_rows) == 0:
        return []
    size = min(batch_size, len(eval_rows))
    count = min(max_batches, len(eval_rows) // size)
    return [eval_rows[i * size:(i + 1) * size] for i in range(count)]
