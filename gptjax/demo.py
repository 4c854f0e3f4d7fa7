"""`gptjax demo`: the whole path on a CPU in minutes.

synthetic corpus -> SentencePiece tokenizer -> pretrain the tiny model -> loss curve -> samples.
Running it again on the same workdir shows the finished run instead of training over it.
"""

from __future__ import annotations

import json
import os
import time

from gptjax import checkpoint
from gptjax.config import load_config
from gptjax.metrics import read_metrics

PROMPTS = ["the cat", "anna", "i watched the film ."]


def _print_curve(workdir: str) -> None:
    records = read_metrics(workdir)
    train = [r for r in records if "loss" in r]
    evals = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
    picks = sorted({train[0]["step"], *[train[int(i * (len(train) - 1) / 6)]["step"] for i in range(7)]})
    print(f"{'step':>6} {'loss':>8} {'eval':>8} {'tokens/s':>10}")
    for r in train:
        if r["step"] in picks:
            eval_loss = evals.get(r["step"])
            eval_text = "" if eval_loss is None else f"{eval_loss:.3f}"
            speed = "(compile)" if "first_step_s" in r else f"{r['tokens_per_sec']:,.0f}"
            print(f"{r['step']:>6} {r['loss']:>8.3f} {eval_text:>8} {speed:>10}")
    first, last = train[0]["loss"], train[-1]["loss"]
    print(f"training loss {first:.3f} -> {last:.3f} ({last / first:.0%} of the start)")


def run_demo(config_path: str, overrides: list[str], workdir: str) -> None:
    from gptjax.api import GPT
    from gptjax.train import pretrain

    config = load_config(config_path, overrides)
    if checkpoint.latest_step(workdir) is None:
        print(f"[1/3] pretraining {config.name} ({config.model.n_layer} layers, d_model {config.model.d_model}) "
              f"on the synthetic corpus for {config.train.steps} steps into {workdir}")
        start = time.perf_counter()
        pretrain(config, workdir)
        print(f"      took {time.perf_counter() - start:.0f} s")
    else:
        print(f"[1/3] {workdir} already holds a trained run; showing it (remove the directory to train again)")
    print("[2/3] loss curve (metrics.jsonl)")
    _print_curve(workdir)
    print("[3/3] samples (temperature 0.8, top-k 40; then greedy)")
    model = GPT.from_pretrained(workdir)
    for prompt, text in zip(PROMPTS, model.generate(PROMPTS, max_new_tokens=40, temperature=0.8, top_k=40)):
        print(f"  {json.dumps(prompt + text)}")
    greedy = model.generate(PROMPTS[0], max_new_tokens=40, temperature=0.0)
    print(f"  greedy: {json.dumps(PROMPTS[0] + greedy)}")
    print(f"Python: gptjax.GPT.from_pretrained({workdir!r}).generate('the cat')")
    print(f"files: {', '.join(sorted(os.listdir(workdir)))}")
