"""lm-evaluation-harness in process: `HarnessLM`, an `lm_eval` model over any model that
`GPT.from_pretrained` loads, and `gptjax harness`.

    gptjax harness --model runs/gpt1 --tasks lambada_openai,piqa --output results.json

Scoring goes through gptjax's own zero-shot scorer (zero_shot.continuation_scores): requests are
sorted by length and scored a batch at a time, one forward pass per batch with its rows split
over the local devices, padded rows masked, and logits built in the training loss's chunks.

How requests become tokens:
- loglikelihood(context, continuation): the whole string is encoded once and split where the
  context's own tokens stop matching, as lm-evaluation-harness's Hugging Face model splits it;
  the context is prefixed with the end-of-document token, the state in which pretraining began
  every document (none for a model whose vocabulary has no such row: openai-gpt), and cut from the
  left to fit the model.
- loglikelihood_rolling(text): disjoint windows of the model's length over the text; the first
  token is scored after the end-of-document token (without one, after the text's first token).
- generate_until(context, kwargs): greedy (or sampled, if do_sample) decoding on the KV cache from
  the context's tokens, cut at the first stop string or the end-of-document token.
"""

from __future__ import annotations

import difflib
import json
import os
import time

import numpy as np
from lm_eval import simple_evaluate
from lm_eval.api.model import LM
from lm_eval.tasks import TaskManager
from lm_eval.utils import get_rolling_token_windows, handle_non_serializable, make_disjoint_window, make_table

from gptjax import zero_shot
from gptjax.errors import UserError

DEFAULT_MAX_GEN_TOKS = 256


class HarnessLM(LM):
    """A gptjax GPT (workdir, checkpoint or Hugging Face folder with its tokenizer) as an lm_eval LM."""

    def __init__(self, model, batch_size: int = 32):
        super().__init__()
        if model.tokenizer is None:
            raise UserError("the harness needs the model's tokenizer; load a workdir or folder that has one")
        if batch_size < 1:
            raise UserError(f"--batch-size must be positive, got {batch_size}")
        self.model, self.tokenizer, self.batch_size = model, model.tokenizer, batch_size
        self.max_len = model.model_config.max_len
        self.start = zero_shot.document_start(model)

    @classmethod
    def from_path(cls, path: str, batch_size: int = 32) -> "HarnessLM":
        from gptjax.api import GPT
        return cls(GPT.from_pretrained(path), batch_size)

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if context:
            return zero_shot.encode_pair(self.tokenizer, context, continuation, start=self.start)
        ids = self.tokenizer.encode(continuation)
        return (self.start, ids) if self.start else (ids[:1], ids[1:])

    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> tuple[np.ndarray, np.ndarray]:
        """(summed log-probability, greedy) per (context, continuation) pair; an empty
        continuation has probability 1."""
        sums, greedy = np.zeros(len(pairs)), np.ones(len(pairs), bool)
        scored = [i for i, (ctx, cont) in enumerate(pairs) if ctx and cont]
        if scored:
            s, _, g = zero_shot.continuation_scores(self.model, [pairs[i][0] for i in scored],
                                                    [pairs[i][1] for i in scored], self.batch_size)
            sums[scored], greedy[scored] = s, g
        return sums, greedy

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        sums, greedy = self._score([self._pair(*r.args) for r in requests])
        return [(float(s), bool(g)) for s, g in zip(sums, greedy)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for n, request in enumerate(requests):
            ids = self.tokenizer.encode(request.args[0])
            prefix, scored = (self.start[0], ids) if self.start else ((ids or [0])[0], ids[1:])
            for window in get_rolling_token_windows(token_list=scored, prefix_token=prefix,
                                                    max_seq_len=self.max_len, context_len=1):
                windows.append(make_disjoint_window(window))
                owner.append(n)
        sums, _ = self._score(windows)
        totals = np.zeros(len(requests))
        np.add.at(totals, np.array(owner, np.int64), sums)
        return [float(t) for t in totals]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for n, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(n)
        for key, members in groups.items():
            kwargs = dict(json.loads(key))
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            new = max(1, min(int(kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS)), self.max_len - 1))
            temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
            for b in range(0, len(members), self.batch_size):
                batch = members[b:b + self.batch_size]
                prompts = [self._prompt(requests[n].args[0], new) for n in batch]
                rows = self.model.generate(prompts, max_new_tokens=new, temperature=temperature,
                                           seed=int(kwargs.get("seed", 0)))
                for n, prompt, row in zip(batch, prompts, rows):
                    out[n] = _cut(self.model.continuation_text(prompt, row), until)
        return out

    def _prompt(self, context: str, new_tokens: int) -> list[int]:
        ids = self.tokenizer.encode(context) or list(self.start) or [0]
        return ids[-(self.max_len - new_tokens):]


def _cut(text: str, until: list[str]) -> str:
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text


def check_tasks(names: list[str], manager: TaskManager) -> None:
    known = set(manager.all_tasks)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else \
                "; `lm_eval ls tasks` lists them, and --include-path adds a folder of task YAMLs"
            raise UserError(f"unknown harness task '{name}'{hint}")


def run(model_path: str, tasks: list[str], output: str, *, include_path: str | None = None,
        num_fewshot: int | None = None, limit: int | None = None, batch_size: int = 32) -> dict:
    """Runs the harness on `tasks`, writes its results JSON to `output` and returns it."""
    if not tasks:
        raise UserError("--tasks is empty; name one or more harness tasks, comma-separated")
    if include_path and not os.path.isdir(include_path):
        raise UserError(f"--include-path {include_path} is not a folder of task YAMLs")
    if not os.path.exists(model_path):  # before the task index, which takes a while to build
        raise UserError(f"--model {model_path} does not exist; give a gptjax workdir or checkpoint, or a "
                        f"Hugging Face GPT-2 / openai-gpt folder")
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    check_tasks(tasks, manager)
    lm = HarnessLM.from_path(model_path, batch_size)
    began = time.perf_counter()
    results = simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                              log_samples=False, batch_size=batch_size)
    results["gptjax"] = {"model": model_path, "seconds": round(time.perf_counter() - began, 3)}
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
        json.dump(results, f, indent=2, default=handle_non_serializable)
        f.write("\n")
    print(make_table(results))
    return results
