"""Benchmarks of training speed and memory; every performance figure in the project comes from here.

    python -m gptjax.bench train --config configs/gpt2_small.py --batches 12,32
    python -m gptjax.bench parts --config configs/gpt2_small.py --config.train.batch_size=12
    python -m gptjax.bench memory --config configs/gpt2_xl.py --batches 4,8,16
    python -m gptjax.bench memory --config configs/gpt2_xl.py --config.mesh.fsdp=8 --batches 8
    python -m gptjax.bench loop --config configs/gpt2_small.py --workdir runs/bench-loop --steps 300
    python -m gptjax.bench attention --seq-lens 1024,2048,4096,8192 --head-dims 64,128
    python -m gptjax.bench harness --config configs/tiny.py --workdir runs/bench-harness --items 1000
    python -m gptjax.bench data --config configs/gpt2_small.py --workdir runs/bench-data
    python -m gptjax.bench checkpoint --config configs/gpt2_small.py --workdir runs/bench-ckpt \
        --config.train.batch_size=1 --config.train.seq_len=128

`train` runs the same jitted step as `gptjax pretrain` on random tokens (no data pipeline, so the
figure is the step alone) and prints one table row per batch size: tokens/s, MFU, steady step
ms, compile s and first step s apart, the allocator's peak GiB and the compiler's memory plan
(gptjax/bench/train_step.py). `parts` splits a step into its parts (gptjax/bench/step_parts.py),
`memory` compiles without allocating (gptjax/bench/memory.py, a table view of `gptjax compile`),
`attention` times the attention kernels alone (gptjax/bench/attention.py), `loop` measures what
the pretraining loop adds to the bare step (data, logging, evaluation, saves; `data` and
`checkpoint` time the input pipeline and saves alone: gptjax/bench/overheads.py). `memory` compiles
on the config's mesh (`--config.mesh.fsdp=8`, ...) over fake CPU devices when the host has
fewer, or for `--target h100:8` and the like, and gives what each device holds. `--xla-flags` takes presets from xla_flags.py. `train`,
`parts` and `memory --kinds pretrain` need only jax, flax, optax and ml_collections, so they run
on a bare GPU machine.
Results and the commands behind them: bench/NOTES.md.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp

from gptjax import attention, targets
from gptjax.bench import memory, overheads, step_parts, train_step
from gptjax.config import load_config
from gptjax.errors import UserError
from gptjax.model import compute_dtype


def _with_batch(config_path: str, overrides: list[str], batch: int | None):
    return load_config(config_path, overrides + ([] if batch is None else [f"train.batch_size={batch}"]))


def _describe(config, target_name: str = "") -> str:
    if target_name:  # what the step is compiled for, not this host
        target = targets.open_target(target_name)
        with targets.compiling_for(target.platform):
            return _describe_for(config, f"target: {target.name} ({target.platform.device_kind} x{len(target.devices)})")
    return _describe_for(config, f"device: {jax.devices()[0].device_kind} x{jax.device_count()}")


def _describe_for(config, where: str) -> str:
    dtype = compute_dtype(config.model.dtype)
    head_dim = config.model.d_model // config.model.n_head
    impl = attention.resolve(config.model.attention, dtype, head_dim, needs_mask=False,
                             needs_dropout=config.model.attn_dropout > 0, segments=config.data.document_mask)
    return (f"{where}, jax {jax.__version__}, "
            f"compute {jnp.dtype(dtype).name}, attention {impl}, remat {config.model.remat}, "
            f"loss_chunk_len {config.model.loss_chunk_len}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")


def _run(args, overrides: list[str]) -> None:
    batches = [None] if not getattr(args, "batches", None) else [int(b) for b in args.batches.split(",")]

    def config_for(batch):
        return _with_batch(args.config, overrides, batch)

    config = config_for(batches[0])
    if args.what == "data":
        rows = overheads.bench_data(config, args.workdir, args.steps, args.hf_tokenizer)
        print(f"{config.name}: batch {config.train.batch_size} x {config.train.seq_len}, "
              f"document_mask={config.data.document_mask}, num_workers={config.data.num_workers}")
        for name, rate in rows:
            print(f"{name:>38}: {rate:,.0f} tokens/s")
        return
    print(_describe(config, getattr(args, "target", "")))
    if args.what in ("checkpoint", "loop"):
        bench = overheads.bench_checkpoint if args.what == "checkpoint" else overheads.bench_loop
        rows = bench(config, args.workdir, args.steps)
        print(f"{config.name}: batch {config.train.batch_size} x {config.train.seq_len}")
        for name, value in rows:
            print(f"{name:>56}: {value:,.3f}")
        return
    if args.what == "parts":
        from gptjax.train import Trainer
        print(f"{config.name}: batch {config.train.batch_size} x {config.train.seq_len}")
        trainer = Trainer.from_config(config)
        batch = train_step.random_batch(config, 0, trainer.batch_sharding)
        print(step_parts.format_parts(step_parts.time_parts(trainer, batch, args.steps)))
        return
    if args.what == "memory":
        memory.print_table(config_for, batches, args.kinds, args.target)
        return
    train_step.print_table(config_for, batches, args.steps, args.warmup, args.profile)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gptjax.bench", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)

    def command(name, help, steps, workdir=False, batches=False):
        p = sub.add_parser(name, help=help)
        p.add_argument("--config", required=True)
        p.add_argument("--steps", type=int, default=steps, help=f"timed steps or repeats (default {steps})")
        p.add_argument("--xla-flags", default="", help="presets from gptjax/xla_flags.py, comma-separated")
        if workdir:
            p.add_argument("--workdir", required=True, help="a new directory for what the benchmark writes")
        if batches:
            p.add_argument("--batches", default="", help="comma-separated batch sizes, one row each "
                                                         "(default: train.batch_size)")
        return p

    p = command("train", "time the train step", 20, batches=True)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after the first")
    p.add_argument("--profile", default="", help="write a jax.profiler trace of the timed steps here")
    command("parts", "time each part of the train step", 10)
    p = command("memory", "compile the train step without running it, on the config's mesh: what each device "
                          "holds, memory plan and logits buffers", 0, batches=True)
    p.add_argument("--kinds", default="pretrain,finetune", help="steps to compile: pretrain, finetune or both")
    p.add_argument("--target", default="", help="compile for this target as `gptjax compile --target` takes it "
                                                "(h100:8, v5e:2x2, cpu:8; default: this host)")
    command("loop", "what the pretraining loop adds to the bare step", 200, workdir=True)
    p = command("data", "time the input pipeline", 200, workdir=True)
    p.add_argument("--hf-tokenizer", default="", help="a Hugging Face tokenizer folder or tokenizer.json: also "
                                                       "time it (and transformers' fast tokenizer) on the corpus")
    command("checkpoint", "time saving the train state", 5, workdir=True)
    sub.add_parser("attention", add_help=False, help="attention kernels alone: TFLOP/s of the Pallas kernel, cuDNN, "
                                                     "XLA and JAX's bundled kernel (--help for its options)")
    sub.add_parser("harness", add_help=False, help="lm-evaluation-harness items/s on a local multiple-choice task "
                                                   "(--help for its options)")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["harness"]:
        from gptjax.bench import harness_speed
        return harness_speed.main(argv[1:])
    if argv[:1] == ["attention"]:
        # Imported here: the other commands have no use for the Pallas kernels it loads.
        from gptjax.bench import attention as attention_bench
        return attention_bench.main(argv[1:])
    args, extra = parser.parse_known_args(argv)
    from gptjax import xla_flags
    from gptjax.cli import split_overrides
    try:
        xla_flags.apply(args.xla_flags)  # before anything starts a backend
        if args.what == "memory":
            memory.ask_for_fake_devices(load_config(args.config, split_overrides(extra)), args.target)
        _run(args, split_overrides(extra))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
