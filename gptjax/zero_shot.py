"""Zero- and few-shot evaluation: scoring a pretrained LM on a task with no gradient updates.

GPT-2 (zero-shot) and GPT-3 (few-shot, in context) read a task off the language model alone: each
candidate answer is a continuation of a prompt, and the prediction is the candidate the model finds
most likely. GPT-1's zero-shot heuristics are the special cases for SST-2 and CoLA.

    continuation_logprobs  summed log p(continuation | context) for token ids, batched and jitted
    continuation_scores    the same, and whether greedy decoding gives each continuation
    build_prompts          a task's examples -> (prompt text, candidate continuations), demos included
    fit_threshold          the Matthews-optimal threshold of the acceptability heuristic
    evaluate               a task's examples -> (scores, predicted label ids)

Every context starts with the tokenizer's eos: pretraining packs documents as `doc eos doc eos`,
so eos is the state in which the model has seen a document begin. A released model whose tokenizer
had no eos (openai-gpt: gptjax adds one past its embedding rows) never saw that state; its contexts
start with their own first token, which is then conditioning only.
"""

from __future__ import annotations

from functools import partial

import jax
import numpy as np
from flax import nnx

from gptjax import sharding
from gptjax.batched_forward import forward_in_batches, padded_batch_size
from gptjax.errors import UserError
from gptjax.loss import projected_target_scores
from gptjax.model import Decoder
from gptjax.tasks.registry import get_task
from gptjax.tasks.scores import task_scores

SENTIMENT_TASKS = ("sst2", "synthetic_sentiment")
ACCEPTABILITY_TASKS = ("cola", "synthetic_acceptability")
_LENGTH_MULTIPLE = 16  # batches are padded to a multiple of this length: few shapes, few compiles
# Tokens of the batches of one length handed to the forward at once: a bound on the host arrays
# built for them (a harness task may hold 100k requests of the same padded length).
_GROUP_TOKENS = 1 << 20


# Rows of logits alive at once when the model sets no loss_chunk_len: 100 MB of bfloat16 at GPT-2's
# vocabulary, where a whole batch of float32 logits (32 x 1024 tokens) would take 6.6 GB.
_CHUNK_TOKENS = 1024


def _chunk_len(decoder, batch_size: int) -> int:
    """Positions whose logits are built at once: the training loss's chunk if the model sets one,
    else about _CHUNK_TOKENS rows, in whole multiples of the padded length."""
    if decoder.config.loss_chunk_len:
        return decoder.config.loss_chunk_len
    return max(1, _CHUNK_TOKENS // (batch_size * _LENGTH_MULTIPLE)) * _LENGTH_MULTIPLE


@partial(jax.jit, static_argnums=(0, 4))
def _token_scores(graphdef, state, tokens, targets, chunk_len: int):
    """(log p(targets[b, t] | tokens[b, :t+1]) float32 [B, T], whether each target is the argmax),
    by the training loss's own terms (loss.py): one chunk of logits at a time, in the compute
    dtype, never a float32 copy."""
    m = nnx.merge(graphdef, state)
    return projected_target_scores(m(tokens), m.lm_logits, targets, m.config.vocab_size, chunk_len)


def _local_mesh():
    """A data-parallel mesh of this process's own devices. Each process scores the rows it is
    given by itself, with no collective across processes: in a multi-process job every process
    scores everything, and no process waits for another to
    call the scorer."""
    return sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.local_devices())


def _replicated_on(state, mesh):
    """`state` replicated over `mesh`. An array replicated over every process's devices (api.py
    loads a model so in a multi-process job) is taken from this process's own copy: the others
    cannot be moved here."""
    everywhere = sharding.replicated(mesh)

    def put(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if not x.is_fully_replicated:
                raise UserError("zero-shot scoring needs the model's parameters whole on every process; "
                                "load it with GPT.from_pretrained")
            x = x.addressable_data(0)
        return jax.device_put(x, everywhere)

    return jax.tree.map(put, state)


def _batches_by_length(rows, order, batch_size: int, max_len: int):
    """(row indices, padded length) of each run of consecutive batches of `order` that share one
    padded length, at most about _GROUP_TOKENS tokens but whole batches: a batch's length is its
    first (longest) row's, less the last token (only a target), rounded up to _LENGTH_MULTIPLE."""
    group, group_length = [], 0
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        length = min(max_len, -(-(len(rows[idx[0]]) - 1) // _LENGTH_MULTIPLE) * _LENGTH_MULTIPLE)
        if group and (length != group_length or (len(group) + 1) * batch_size * length > _GROUP_TOKENS):
            yield np.concatenate(group), group_length
            group = []
        group.append(idx)
        group_length = length
    if group:
        yield np.concatenate(group), group_length


def _decoder(model) -> Decoder:
    """The language model that scores: a Decoder itself, or a GPT's (api.py)."""
    return model if isinstance(model, Decoder) else model.module


def continuation_logprobs(model, contexts, continuations, batch_size: int = 32):
    """(summed log-probability float64 [n], continuation token counts int64 [n]) of each
    continuation given its context. `model` is a GPT or a Decoder; both lists hold token ids."""
    sums, counts, _ = continuation_scores(model, contexts, continuations, batch_size)
    return sums, counts


def continuation_scores(model, contexts, continuations, batch_size: int = 32):
    """(summed log-probability float64 [n], continuation token counts int64 [n], whether greedy
    decoding from the context gives the continuation bool [n]) of each continuation given its
    context. `model` is a GPT or a Decoder; both lists hold token ids.

    A context too long for the model loses tokens from its left, the ones furthest from the
    continuation; the continuation itself is never cut. Each batch is one forward pass, its rows
    split over this process's devices (batched_forward)."""
    decoder = _decoder(model)
    vocab, max_len = decoder.config.vocab_size, decoder.config.max_len
    if len(contexts) != len(continuations):
        raise UserError(f"{len(contexts)} contexts but {len(continuations)} continuations")
    if batch_size < 1:
        raise UserError(f"batch_size must be positive, got {batch_size}")
    rows, starts = [], []
    for ctx, cont in zip(contexts, continuations):
        ctx, cont = [int(t) for t in ctx], [int(t) for t in cont]
        if not ctx or not cont:
            raise UserError("every context and continuation needs at least one token "
                            "(start contexts with the tokenizer's eos id)")
        if len(cont) > max_len:
            raise UserError(f"a continuation of {len(cont)} tokens leaves no room for context in the "
                            f"model's {max_len} positions")
        # The last token is only a target, so a row may be one longer than the model's positions.
        ctx = ctx[max(0, len(ctx) + len(cont) - max_len - 1):]
        if min(ctx + cont) < 0 or max(ctx + cont) >= vocab:
            raise UserError(f"token ids must be in [0, {vocab})")
        rows.append(ctx + cont)
        starts.append(len(ctx))
    counts = np.array([len(r) - s for r, s in zip(rows, starts)], np.int64)
    sums = np.zeros(len(rows), np.float64)
    greedy = np.zeros(len(rows), bool)
    if not rows:
        return sums, counts, greedy
    mesh = _local_mesh()
    graphdef, state = nnx.split(decoder)
    state = _replicated_on(state, mesh)
    chunk = _chunk_len(decoder, padded_batch_size(batch_size, mesh))

    def score(batch):
        return _token_scores(graphdef, state, batch["tokens"], batch["targets"], chunk)

    # Longest first, so each batch holds rows of similar length and little padding.
    order = np.array(sorted(range(len(rows)), key=lambda i: -len(rows[i])), np.int64)
    for idx, length in _batches_by_length(rows, order, batch_size, max_len):
        tokens = np.zeros((len(idx), length), np.int32)
        targets = np.zeros_like(tokens)
        mask = np.zeros(tokens.shape, bool)
        for j, i in enumerate(idx):
            row = rows[i]
            tokens[j, :len(row) - 1] = row[:-1]
            targets[j, :len(row) - 1] = row[1:]
            mask[j, starts[i] - 1:len(row) - 1] = True  # position t predicts token t + 1
        logp, top = forward_in_batches(score, {"tokens": tokens, "targets": targets}, batch_size, mesh)
        sums[idx] = np.where(mask, np.asarray(logp, np.float64), 0.0).sum(axis=1)
        greedy[idx] = np.all(top | ~mask, axis=1)
    return sums, counts, greedy


def _render(task, texts) -> tuple[str, list[str]]:
    """One example's prompt and its candidate continuations, in label-id order."""
    if task.type == "multiple_choice":
        return texts[0], [" " + answer for answer in texts[1:]]
    if task.name in SENTIMENT_TASKS:
        # GPT-1's heuristic: "<review> very" followed by " positive" or " negative".
        return texts[0] + " very", [" " + name for name in task.label_names]
    # A generic verbaliser: each text after its field's name, then the label's name as words.
    fields = " ".join(f"{field.replace('_', ' ')}: {text}" for field, text in zip(task.text_fields, texts))
    return fields + " answer:", [" " + name.replace("_", " ") for name in task.label_names]


def build_prompts(task, examples, *, shots: int = 0, train_examples=None, seed: int = 0):
    """[(prompt, candidate continuations)] per example. With shots=k, each prompt follows k
    demonstrations (a demo's prompt and its correct continuation), joined by newlines, drawn
    afresh per example from `train_examples` by one np.random.default_rng(seed); a train example
    with the same texts as the evaluated one is never drawn, so its answer cannot leak."""
    task = get_task(task)
    train = list(train_examples or [])
    if shots and any(ex.label is None for ex in train):
        raise UserError("few-shot demonstrations need labelled train examples; some have no label")
    by_texts: dict[tuple, list[int]] = {}
    for i, ex in enumerate(train):
        by_texts.setdefault(tuple(ex.texts), []).append(i)
    rng = np.random.default_rng(seed)
    out = []
    for ex in examples:
        prompt, choices = _render(task, ex.texts)
        if shots:
            excluded = set(by_texts.get(tuple(ex.texts), ()))
            if len(train) - len(excluded) < shots:
                raise UserError(f"{shots} shots need {shots} train examples other than the evaluated one; "
                                f"only {len(train) - len(excluded)} remain")
            # Draw a few extra so that dropping the excluded ones still leaves `shots`.
            drawn = rng.choice(len(train), shots + len(excluded), replace=False)
            demos = [train[int(i)] for i in drawn if int(i) not in excluded][:shots]
            lines = []
            for demo in demos:
                demo_prompt, demo_choices = _render(task, demo.texts)
                lines.append(demo_prompt + demo_choices[int(demo.label)])
            prompt = "\n".join([*lines, prompt])
        out.append((prompt, choices))
    return out


def document_start(model) -> list[int]:
    """The ids every context starts with: [eos], or none when eos is not one of the model's rows."""
    vocab = _decoder(model).config.vocab_size
    eos = model.tokenizer.eos_id
    return [eos] if eos < vocab else []


def encode_pair(tokenizer, context: str, continuation: str, context_ids=None, start=None):
    """(start + context ids, continuation ids), start being [eos] unless given. The whole string is
    tokenised at once, as in the training text, and split where the context's own tokens stop
    matching: a piece merged across the boundary counts as continuation (lm-evaluation-harness
    splits the same way)."""
    start = [tokenizer.eos_id] if start is None else start
    ctx = tokenizer.encode(context) if context_ids is None else context_ids
    whole = tokenizer.encode(context + continuation)
    n = 0
    while n < min(len(ctx), len(whole) - 1) and ctx[n] == whole[n]:
        n += 1
    n = max(n, 0 if start else 1)  # a context needs one token to condition on
    return start + whole[:n], whole[n:]


def _mcc(tp, tn, fp, fn):
    """Matthews correlation from confusion counts (arrays allowed); 0 where undefined."""
    tp, tn, fp, fn = (np.asarray(x, np.float64) for x in (tp, tn, fp, fn))
    denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return np.where(denom > 0, (tp * tn - fp * fn) / np.where(denom > 0, denom, 1.0), 0.0)


def fit_threshold(scores, positive) -> float:
    """The threshold t maximising Matthews correlation of `scores > t` against the bool labels
    `positive`: one of the midpoints between consecutive distinct scores, or 1 beyond either end;
    the lowest one on ties."""
    scores, positive = np.asarray(scores, np.float64), np.asarray(positive, bool)
    values, inverse = np.unique(scores, return_inverse=True)
    # Cut j predicts positive for values[j:]; suffix sums give each cut's confusion counts.
    tp = np.append(np.cumsum(np.bincount(inverse, positive.astype(np.float64), len(values))[::-1])[::-1], 0)
    predicted = np.append(np.cumsum(np.bincount(inverse, None, len(values))[::-1])[::-1], 0)
    fp, fn = predicted - tp, positive.sum() - tp
    best = int(np.argmax(_mcc(tp, len(scores) - predicted - fn, fp, fn)))
    cuts = np.concatenate([[values[0] - 1], (values[:-1] + values[1:]) / 2, [values[-1] + 1]])
    return float(cuts[best])


def unsupported(task, shots: int) -> str | None:
    """Why `task` cannot be scored this way (None: it can)."""
    task = get_task(task)
    if task.is_regression:
        return "a regression task has no label words to compare; fine-tune on it instead"
    if task.name in ACCEPTABILITY_TASKS and shots:
        return "scored by a likelihood threshold, which has no label words to demonstrate; use zero_shot"
    if shots and "train" not in task.splits:
        return "no train split to draw demonstrations from"
    return None


def _check_mode(mode: str, shots: int, train_examples) -> None:
    if mode not in ("zero_shot", "few_shot"):
        raise UserError(f"unknown mode '{mode}'; use zero_shot or few_shot")
    if mode == "zero_shot" and shots != 0:
        raise UserError(f"mode zero_shot takes shots=0, got {shots}; use mode='few_shot' for demonstrations")
    if mode == "few_shot" and shots < 1:
        raise UserError(f"mode few_shot needs shots >= 1, got {shots}")
    if shots and not train_examples:
        raise UserError(f"{shots}-shot evaluation draws its demonstrations from train_examples; pass some")
    if shots and shots > len(train_examples):
        raise UserError(f"{shots} shots but only {len(train_examples)} train examples")


def evaluate(model, task, examples, *, mode: str = "zero_shot", shots: int = 0, train_examples=None,
             seed: int = 0, batch_size: int = 32):
    """(scores, predicted label ids [n]) of a pretrained GPT on a task's examples, no training.

    Scores are the task's metrics (`accuracy` is lm-evaluation-harness's `acc`), plus for
    multiple choice `acc_norm`. Multiple choice: the answer with the highest summed log-probability; `acc_norm`
    divides by the answer's length in characters. SST-2-like sentiment: "<text> very" then
    " positive" / " negative". CoLA-like acceptability: the sentence's mean token log-probability
    above a threshold, a single scalar fitted on `train_examples` for the best Matthews correlation
    (the median of the evaluated scores without them); zero-shot only. Other classification and
    pair tasks: a verbaliser, "<field>: <text> ... answer:" then the label's name. Scores are empty
    when any example lacks a label (test splits)."""
    task = get_task(task)
    examples, train = list(examples), list(train_examples or [])
    _check_mode(mode, shots, train)
    reason = unsupported(task, shots)
    if reason:
        raise UserError(f"task {task.name} cannot be scored {mode.replace('_', '-')}: {reason}")
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise UserError("zero-shot evaluation needs the model's tokenizer; load a workdir that has one")
    labelled = bool(examples) and all(ex.label is not None for ex in examples)
    labels = np.array([ex.label for ex in examples]) if labelled else None
    if task.name in ACCEPTABILITY_TASKS:
        if shots:
            raise UserError(f"{task.name} is scored by a likelihood threshold, which has no label words "
                            f"to demonstrate; use zero_shot (train_examples fit the threshold)")
        return _acceptability(model, task, examples, train, labels, batch_size)
    prompts = build_prompts(task, examples, shots=shots, train_examples=train, seed=seed)
    k = len(task.label_names)
    start = document_start(model)
    contexts, continuations, chars = [], [], []
    for prompt, choices in prompts:
        prompt_ids = tokenizer.encode(prompt)
        for choice in choices:
            ctx, cont = encode_pair(tokenizer, prompt, choice, prompt_ids, start)
            contexts.append(ctx)
            continuations.append(cont)
            chars.append(len(choice))
    logp, _ = continuation_logprobs(model, contexts, continuations, batch_size)
    logp, chars = logp.reshape(len(examples), k), np.array(chars, np.float64).reshape(len(examples), k)
    preds = logp.argmax(axis=1)
    if not labelled:
        return {}, preds
    scores = task_scores(task, labels, preds)  # the task's own metrics; "accuracy" is lm-eval's acc
    if task.type == "multiple_choice":
        scores["acc_norm"] = float(np.mean((logp / chars).argmax(axis=1) == labels))
    return scores, preds


def _acceptability(model, task, examples, train, labels, batch_size):
    tokenizer = model.tokenizer
    sentences = [ex.texts[0] for ex in examples] + [ex.texts[0] for ex in train]
    start = document_start(model)
    ids = [tokenizer.encode(s) for s in sentences]
    if start:
        pairs = [(start, t or start) for t in ids]
    else:  # the first token conditions the rest; a sentence of one token has nothing scored
        pairs = [(t[:1], t[1:]) for t in ids if len(t) > 1]
    logp, counts = continuation_logprobs(model, [c for c, _ in pairs], [t for _, t in pairs], batch_size)
    mean = np.full(len(ids), np.nan)
    mean[[i for i, t in enumerate(ids) if start or len(t) > 1]] = logp / counts
    ours, theirs = mean[:len(examples)], mean[len(examples):]
    positive = task.label_names.index("acceptable")
    if train:
        if any(ex.label is None for ex in train):
            raise UserError("fitting the acceptability threshold needs labelled train examples")
    scored = ~np.isnan(theirs)
    if scored.any():
        threshold = fit_threshold(theirs[scored], [ex.label == positive for ex, ok in zip(train, scored) if ok])
    else:
        threshold = float(np.nanmedian(ours)) if np.any(~np.isnan(ours)) else 0.0
    preds = np.where(ours > threshold, positive, 1 - positive)  # unscored sentences: not acceptable
    if labels is None:
        return {}, preds
    return task_scores(task, labels, preds), preds
