"""`python -m gptjax.bench harness`: lm-evaluation-harness items/s on a local multiple-choice task.

    python -m gptjax.bench harness --config configs/tiny.py --workdir runs/bench-harness --items 1000

Writes N items of synthetic_choice (four candidates each) as a local harness task, and scores them
with `gptjax harness`'s model and with gptjax's own zero-shot scorer, on a model from --model or
a random one of --config (with a tokenizer trained on the synthetic corpus). Prints items/s of
both, the first run included (compiles count: they are part of what a user waits for).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from gptjax.errors import UserError


def write_choice_task(folder: str, items: int) -> list:
    """synthetic_choice's first `items` validation items as the harness task `bench_choice`."""
    from gptjax import zero_shot
    from gptjax.tasks import get_task, synthetic_split

    task = get_task("synthetic_choice")
    examples = synthetic_split(task, "validation", size=items)
    os.makedirs(folder, exist_ok=True)
    data = os.path.abspath(os.path.join(folder, "items.jsonl"))
    with open(data, "w") as f:
        for ex, (prompt, choices) in zip(examples, zero_shot.build_prompts(task, examples)):
            f.write(json.dumps({"context": prompt, "choices": choices, "label": ex.label}) + "\n")
    with open(os.path.join(folder, "bench_choice.yaml"), "w") as f:
        f.write(f"task: bench_choice\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    validation: {data}\n"
                "validation_split: validation\noutput_type: multiple_choice\ndoc_to_text: '{{context}}'\n"
                "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\ntarget_delimiter: ''\n"
                "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
                "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n")
    return examples


def _model(args, overrides):
    from gptjax.api import GPT
    from gptjax.data import synthetic
    from gptjax.data.tokenizer import train_tokenizer

    if args.model:
        return GPT.from_pretrained(args.model), args.model
    gpt = GPT.from_config(args.config, **dict(o.split("=", 1) for o in overrides))
    gpt.tokenizer = train_tokenizer(iter(synthetic.documents(2000)), gpt.config.data.tokenizer_vocab_size,
                                    os.path.join(args.workdir, "tok"))
    path = os.path.join(args.workdir, "model")
    if not os.path.isdir(path):
        gpt.save(path)
    return gpt, path


def main(argv) -> int:
    parser = argparse.ArgumentParser(prog="python -m gptjax.bench harness", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/tiny.py", help="the random model's config (without --model)")
    parser.add_argument("--model", default="", help="a gptjax workdir or Hugging Face folder instead")
    parser.add_argument("--workdir", required=True, help="a directory for the task files and the model")
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    args, extra = parser.parse_known_args(argv)
    from gptjax.cli import split_overrides
    try:
        from gptjax import harness, zero_shot
        import jax

        os.makedirs(args.workdir, exist_ok=True)
        gpt, path = _model(args, split_overrides(extra))
        examples = write_choice_task(os.path.join(args.workdir, "tasks"), args.items)
        print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}; "
              f"{gpt.num_params():,} parameters, max_len {gpt.model_config.max_len}; {args.items} items x 4 "
              f"candidates, batch {args.batch_size}")
        began = time.perf_counter()
        zero_shot.evaluate(gpt, "synthetic_choice", examples, batch_size=args.batch_size)
        own = time.perf_counter() - began
        results = harness.run(path, ["bench_choice"], os.path.join(args.workdir, "results.json"),
                              include_path=os.path.join(args.workdir, "tasks"), batch_size=args.batch_size)
        total = results["gptjax"]["seconds"]
        print(f"{'gptjax zero-shot scorer':>36}: {args.items / own:,.1f} items/s ({own:.1f} s)")
        print(f"{'gptjax harness (lm-eval in process)':>36}: {args.items / total:,.1f} items/s ({total:.1f} s, "
              f"task building included)")
    except ImportError as e:
        print(f"error: the harness benchmark needs lm-evaluation-harness ({e}): pip install 'gptjax[eval]'",
              file=sys.stderr)
        return 2
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
