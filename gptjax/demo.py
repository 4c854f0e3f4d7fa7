"""`gptjax demo`: the GPT-1 paper in miniature, on a CPU in minutes.

synthetic corpus -> SentencePiece tokenizer -> pretrain the tiny model -> loss curve -> samples
-> fine-tune on synthetic tasks of the four kinds (classification, entailment, similarity,
multiple choice) three ways -> evaluate on their test splits -> W/results.md and W/results.json.

The three ways are the columns of the paper's Table 5 (ablations): fine-tuned from the
pretrained model with the auxiliary LM loss; the same recipe from a random init (no
pretraining); and from the pretrained model without the auxiliary LM loss (lm_weight 0).
Running it again on the same workdir shows the finished runs instead of training over them.
"""

from __future__ import annotations

import contextlib
import json
import os
import time

from gptjax import checkpoint
from gptjax.config import load_config
from gptjax.metrics import read_metrics

PROMPTS = ["the cat", "anna", "i watched the film ."]
# One task of each GPT-1 input kind -> its own fine-tuning settings; each task's first metric is
# the one reported. The common recipe is the paper's (batch 32, 3 epochs, warmup over 0.2% then
# linear decay, classifier dropout 0.1, lm_weight 0.5) with a learning rate a tenth of the tiny
# model's pretraining rate (the paper's is a quarter of its own). Sentiment is learnt from 256
# labelled reviews at 1e-3 (a low-resource task, where word knowledge from pretraining shows);
# the three coreference tasks (is "she"/"he" the story's protagonist?) from 640 examples at 3e-4.
# To fit twelve runs into a few CPU minutes, inputs are cut to 64 tokens (a story keeps its
# opening, which names the protagonist) and the decoder runs without dropout, as it was
# pretrained.
TASKS = {
    "synthetic_sentiment": ["finetune.max_examples=256", "train.lr=1e-3"],
    "synthetic_coreference": ["finetune.max_examples=640", "train.lr=3e-4"],
    "synthetic_coherence": ["finetune.max_examples=640", "train.lr=3e-4"],
    "synthetic_choice": ["finetune.max_examples=640", "train.lr=3e-4"],
}
SETTINGS = {
    "with_pretraining": lambda pre: [f"init_from={pre}"],
    "from_scratch": lambda pre: [f"data.tokenizer={os.path.join(pre, 'tokenizer.model')}"],
    "no_aux_lm": lambda pre: [f"init_from={pre}", "finetune.lm_weight=0"],
}
FINETUNE = ["train.batch_size=32", "train.weight_decay=0.01", "train.b2=0.999", "model.dropout=0.0",
            "finetune.clf_dropout=0.1", "finetune.epochs=3", "finetune.max_len=64",
            "finetune.eval_batch_size=100", "train.log_every=20"]


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


def _pretrain(config, workdir: str) -> None:
    from gptjax.api import GPT
    from gptjax.train import pretrain

    if checkpoint.latest_step(workdir) is None:
        print(f"[1/5] pretraining {config.name} ({config.model.n_layer} layers, d_model {config.model.d_model}) "
              f"on the synthetic corpus for {config.train.steps} steps into {workdir}")
        start = time.perf_counter()
        pretrain(config, workdir)
        print(f"      took {time.perf_counter() - start:.0f} s")
    else:
        print(f"[1/5] {workdir} already holds a trained run; showing it (remove the directory to train again)")
    print("[2/5] loss curve (metrics.jsonl)")
    _print_curve(workdir)
    print("[3/5] samples (temperature 0.8, top-k 40; then greedy)")
    model = GPT.from_pretrained(workdir)
    for prompt, text in zip(PROMPTS, model.generate(PROMPTS, max_new_tokens=40, temperature=0.8, top_k=40)):
        print(f"  {json.dumps(prompt + text)}")
    greedy = model.generate(PROMPTS[0], max_new_tokens=40, temperature=0.0)
    print(f"  greedy: {json.dumps(PROMPTS[0] + greedy)}")


def _finetune_all(config_path: str, overrides: list[str], workdir: str) -> dict:
    """{setting: {task: test-split main metric}} for every setting and task, runs under W/finetune."""
    from gptjax.evaluate import evaluate
    from gptjax.finetune import finetune

    print(f"[4/5] fine-tuning on {len(TASKS)} synthetic tasks, {len(SETTINGS)} ways: {', '.join(SETTINGS)}")
    results = {}
    for setting, extra in SETTINGS.items():
        root = os.path.join(workdir, "finetune", setting)
        for name in TASKS:
            start = time.perf_counter()
            config = load_config(config_path, [*overrides, *FINETUNE, *TASKS[name], f"task={name}", *extra(workdir)])
            best = finetune(config, os.path.join(root, name), progress=False)
            took = "done before" if best.get("finished_before") else f"{time.perf_counter() - start:.0f} s"
            print(f"      {setting:<17} {name:<24} best validation {best['score']:.3f} (epoch {best['epoch']}, {took})")
        config = load_config(config_path, [*overrides, *FINETUNE, f"task={','.join(TASKS)}",
                                           "finetune.splits=test"])
        # The table comes once, below, for all settings.
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
            summary = evaluate(config, root)
        results[setting] = {}
        for name in TASKS:
            scores = summary["tasks"][name]["splits"]["test"]["scores"]
            metric = next(iter(scores))
            results[setting][name] = {"metric": metric, "value": scores[metric]}
    return results


def _report(results: dict, workdir: str) -> None:
    header = "| task | metric | " + " | ".join(s.replace("_", " ") for s in SETTINGS) + " |"
    lines = ["# gptjax demo: fine-tuning the tiny model (test splits)", "",
             "The shape of the GPT-1 paper's Table 5 on synthetic tasks: each column fine-tunes the same "
             "model with the same recipe; scores are x100.", "", header,
             "|" + "---|" * (len(SETTINGS) + 2)]
    for name in TASKS:
        metric = results["with_pretraining"][name]["metric"]
        values = " | ".join(f"{100 * results[s][name]['value']:.1f}" for s in SETTINGS)
        lines.append(f"| {name.removeprefix('synthetic_')} | {metric} | {values} |")
    averages = {s: sum(v["value"] for v in results[s].values()) / len(TASKS) for s in SETTINGS}
    lines.append("| average | | " + " | ".join(f"{100 * averages[s]:.1f}" for s in SETTINGS) + " |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(text)
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump({s: {t: v["value"] for t, v in results[s].items()} for s in SETTINGS}, f, indent=2)
    print("[5/5] results (also in results.md and results.json)")
    print(text)


def run_demo(config_path: str, overrides: list[str], workdir: str) -> None:
    config = load_config(config_path, overrides)
    start = time.perf_counter()
    _pretrain(config, workdir)
    results = _finetune_all(config_path, overrides, workdir)
    _report(results, workdir)
    print(f"Python: gptjax.GPT.from_pretrained({workdir!r}).generate('the cat')")
    print(f"files: {', '.join(sorted(os.listdir(workdir)))}; total {time.perf_counter() - start:.0f} s")
