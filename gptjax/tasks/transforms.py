"""GPT-1 input transforms: task examples -> padded token arrays with the extract positions.

Every task type becomes S sequences per example (see PAPER_FACTS, "GPT-1 fine-tuning"):
  classification   1:  s text e
  pair             1:  s a $ b e
  similarity       2:  s a $ b e  and  s b $ a e   (the model adds the two extract states)
  regression       2:  as similarity
  multiple_choice  k:  s context $ answer_i e       (one per candidate, softmax over the k scores)
`encode` tokenizes every text of every example in one `encode_batch` call and returns an
`Encoded` whose arrays a fine-tuning step consumes directly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from gptjax.data.tokenizer import Tokenizer
from gptjax.errors import UserError
from gptjax.tasks.example import Example
from gptjax.tasks.task import Task


@dataclasses.dataclass
class Encoded:
    tokens: np.ndarray  # int32 [N, S, T]; the tokenizer's pad id after each sequence's extract token
    extract: np.ndarray  # int32 [N, S]; position of the extract token in each sequence
    labels: np.ndarray  # int32 [N] (-1: no label) or, for regression, float32 [N] (nan: no label)
    idx: np.ndarray  # int64 [N]; the examples' idx, which GLUE submissions are keyed by
    truncated: int  # examples in which at least one field was shortened to fit max_len

    def __len__(self) -> int:
        return len(self.idx)


def sequences_per_example(task: Task) -> int:
    if task.type == "multiple_choice":
        return len(task.text_fields) - 1
    return 2 if task.type in ("similarity", "regression") else 1


def _fit(lengths: list[int], budget: int) -> list[int]:
    """Field lengths after cutting the longest field (the first, on ties) one token at a time.

    Cutting the longest field first keeps as much of every short field as possible. Steps that
    leave the same field longest are taken at once, which gives the token-by-token result.
    """
    lengths, excess = list(lengths), sum(lengths) - budget
    while excess > 0:
        i = max(range(len(lengths)), key=lengths.__getitem__)
        second = max((n for j, n in enumerate(lengths) if j != i), default=0)
        step = max(1, min(excess, lengths[i] - second))
        lengths[i] -= step
        excess -= step
    return lengths


def _join(fields: Sequence[list[int]], tokenizer: Tokenizer) -> list[int]:
    # s f0 $ f1 $ ... e; only code emits the control ids, so text can never fake them.
    out = [tokenizer.start_id]
    for i, f in enumerate(fields):
        out += ([tokenizer.delim_id] if i else []) + f
    return out + [tokenizer.extract_id]


def encode(task: Task, examples: Sequence[Example], tokenizer: Tokenizer, max_len: int,
           pad_multiple: int = 16) -> Encoded:
    """Token arrays for `examples` of `task`, each sequence at most `max_len` tokens.

    T is the longest sequence rounded up to a multiple of `pad_multiple` and capped at `max_len`,
    so short tasks do not pay for the model's full context.
    """
    nf = len(task.text_fields)
    # Fields per sequence: multiple choice pairs the context with one answer at a time.
    per_seq = 1 if task.type == "classification" else 2
    specials = per_seq + 1  # start, delimiters, extract
    if max_len < specials + per_seq:
        raise UserError(f"max_len {max_len} cannot hold the {specials} special tokens plus one token "
                        f"per text field of task {task.name}; raise the context length")
    if pad_multiple < 1:
        raise UserError(f"pad_multiple must be at least 1, got {pad_multiple}")
    for ex in examples:
        if len(ex.texts) != nf:
            raise UserError(f"task {task.name}: example idx={ex.idx} has {len(ex.texts)} texts, "
                            f"expected {nf} ({', '.join(task.text_fields)})")

    flat = tokenizer.encode_batch([t for ex in examples for t in ex.texts])
    budget = max_len - specials
    seqs: list[list[list[int]]] = []  # [N][S] -> token ids
    truncated = 0
    for n in range(len(examples)):
        ids = flat[n * nf:(n + 1) * nf]
        if task.type == "multiple_choice":
            groups = [[ids[0], answer] for answer in ids[1:]]
        else:
            groups = [ids]  # the reversed order of a two-text task reuses these cuts
        cut = False
        for g in groups:
            lengths = _fit([len(f) for f in g], budget)
            cut |= lengths != [len(f) for f in g]
            g[:] = [f[:k] for f, k in zip(g, lengths)]  # from the end of each field
        truncated += cut
        if task.type in ("similarity", "regression"):
            groups.append(groups[0][::-1])
        seqs.append([_join(g, tokenizer) for g in groups])

    S = sequences_per_example(task)
    longest = max((len(s) for ex in seqs for s in ex), default=1)
    T = min(-(-longest // pad_multiple) * pad_multiple, max_len)
    tokens = np.full((len(seqs), S, T), tokenizer.pad_id, np.int32)
    extract = np.zeros((len(seqs), S), np.int32)
    for n, ex in enumerate(seqs):
        for s, seq in enumerate(ex):
            tokens[n, s, :len(seq)] = seq
            extract[n, s] = len(seq) - 1
    if task.is_regression:
        labels = np.array([np.nan if ex.label is None else ex.label for ex in examples], np.float32)
    else:
        labels = np.array([-1 if ex.label is None else ex.label for ex in examples], np.int32)
    idx = np.array([ex.idx for ex in examples], np.int64)
    return Encoded(tokens, extract, labels.reshape(-1), idx.reshape(-1), truncated)
