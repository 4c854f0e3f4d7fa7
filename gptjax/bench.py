"""Throughput benchmark of the real train step.

    python -m gptjax.bench train --config configs/gpt2_small.py --config.train.batch_size=12
    python -m gptjax.bench data --config configs/gpt2_small.py --workdir runs/bench-data
    python -m gptjax.bench checkpoint --config configs/gpt2_small.py --workdir runs/bench-ckpt \
        --config.train.batch_size=1 --config.train.seq_len=128

Runs the same jitted step as `gptjax pretrain` on random tokens (no data pipeline, so the figure is
the step alone), reports compile + first step separately from the steady state, and prints one
table row: config, batch, seq, tokens/s, MFU, step ms, compile s, peak GiB. `train` needs only
jax, flax, optax and ml_collections, so it runs on a bare GPU machine; `data` also needs
sentencepiece and grain.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from gptjax import attention
from gptjax.config import load_config
from gptjax.errors import UserError
from gptjax.mfu import mfu
from gptjax.model import compute_dtype


def _random_batch(config, seed: int) -> dict:
    b, t, v = config.train.batch_size, config.train.seq_len, config.model.vocab_size
    rows = np.random.default_rng(seed).integers(0, v, size=(b, t + 1), dtype=np.int32)
    return jax.device_put({
        "tokens": rows[:, :-1], "targets": rows[:, 1:],
        "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
        "loss_mask": np.ones((b, t), np.float32)})


def _peak_gib() -> float | None:
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


def bench_train(config, steps: int, warmup: int) -> dict:
    from gptjax.train import Trainer
    trainer = Trainer(config)
    batches = [_random_batch(config, i) for i in range(2)]
    start = time.perf_counter()
    jax.block_until_ready(trainer.step(batches[0]))
    first_step_s = time.perf_counter() - start
    for i in range(warmup):
        trainer.step(batches[i % 2])
    jax.block_until_ready(trainer.state.params)
    start = time.perf_counter()
    for i in range(steps):
        metrics = trainer.step(batches[i % 2])
    jax.block_until_ready(metrics)
    elapsed = time.perf_counter() - start
    tokens_per_sec = steps * config.train.batch_size * config.train.seq_len / elapsed
    return {"config": config.name, "batch": config.train.batch_size, "seq": config.train.seq_len,
            "tokens_per_sec": tokens_per_sec, "mfu": mfu(trainer.flops_per_token, tokens_per_sec),
            "step_ms": 1000 * elapsed / steps, "compile_s": first_step_s, "peak_gib": _peak_gib(),
            "loss": float(metrics["loss"])}


def bench_data(config, workdir: str, steps: int) -> list[tuple[str, float]]:
    """Loader tokens/s from prepared token files, and the on-the-fly tokenization rate."""
    from gptjax.data import corpus
    from gptjax.data.loader import Loader
    from gptjax.data.sources import parse_sources

    tokenizer = corpus.workdir_tokenizer(config, workdir)
    documents = corpus.corpus_documents(config.data)
    start = time.perf_counter()
    tokens = sum(len(ids) + 1 for spec in parse_sources(config.data.source)
                 for ids in tokenizer.encode_batch(documents[spec][0]))
    fly = tokens / (time.perf_counter() - start)
    corpus.prepare(config, workdir, tokenizer)
    batches, _ = corpus.pretraining_batches(config, tokenizer, workdir)
    loader = Loader(batches, steps + 1, num_workers=config.data.num_workers)
    jax.block_until_ready(next(loader))
    start = time.perf_counter()
    for _ in range(steps):
        batch = next(loader)
    jax.block_until_ready(batch)
    prepared = steps * config.train.batch_size * config.train.seq_len / (time.perf_counter() - start)
    return [("loader from prepared files", prepared), ("on-the-fly tokenization", fly)]


def bench_checkpoint(config, workdir: str, steps: int) -> list[tuple[str, float]]:
    """How long a save holds up the training loop, asynchronous vs synchronous, and whether the
    steps while an asynchronous save is written in the background are slower."""
    import os

    from gptjax import checkpoint
    from gptjax.train import Trainer

    trainer = Trainer(config)
    batch = _random_batch(config, 0)
    jax.block_until_ready(trainer.step(batch))

    def step_ms(count: int) -> float:
        start = time.perf_counter()
        for _ in range(count):
            metrics = trainer.step(batch)
        jax.block_until_ready(metrics)
        return 1000 * (time.perf_counter() - start) / count

    step_ms(steps)  # the first steps after compilation run slow on some backends
    plain = step_ms(steps)
    rows = [("state size GiB", sum(x.nbytes for x in jax.tree.leaves(trainer.state)) / 2**30),
            ("step ms, no save", plain)]
    sync = checkpoint.Checkpointer(os.path.join(workdir, "sync"), async_save=False)
    start = time.perf_counter()
    sync.save(1, trainer.state.params, trainer.state.opt_state, {"step": 1}, None)
    rows.append(("synchronous save s (loop blocked)", time.perf_counter() - start))
    sync.close()
    saver = checkpoint.Checkpointer(os.path.join(workdir, "async"))
    start = time.perf_counter()
    saver.save(1, trainer.state.params, trainer.state.opt_state, {"step": 1}, None)
    rows.append(("async save s (loop blocked)", time.perf_counter() - start))
    rows.append(("step ms, first after async save", step_ms(1)))
    rows.append((f"step ms, next {steps} during/after it", step_ms(steps)))
    saver.wait()
    rows.append(("async save s (until on disk)", time.perf_counter() - start))
    saver.close()
    return rows


def format_row(r: dict) -> str:
    mfu_text = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
    return (f"| {r['config']} | {r['batch']} | {r['seq']} | {r['tokens_per_sec']:,.0f} | {mfu_text} | "
            f"{r['step_ms']:.1f} | {r['compile_s']:.1f} | {peak} |")


HEADER = ("| config | batch | seq | tokens/s | MFU | step ms | compile+first step s | peak GiB |\n"
          "|---|---|---|---|---|---|---|---|")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gptjax.bench", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("train", help="time the train step")
    p.add_argument("--config", required=True)
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after the first")
    p = sub.add_parser("data", help="time the input pipeline")
    p.add_argument("--config", required=True)
    p.add_argument("--workdir", required=True, help="where the tokenizer and prepared files go")
    p.add_argument("--steps", type=int, default=200, help="batches timed")
    p = sub.add_parser("checkpoint", help="time saving the train state")
    p.add_argument("--config", required=True)
    p.add_argument("--workdir", required=True, help="a new directory for the checkpoints")
    p.add_argument("--steps", type=int, default=5, help="steps timed before and after a save")
    args, extra = parser.parse_known_args(argv)
    from gptjax.cli import split_overrides
    try:
        config = load_config(args.config, split_overrides(extra))
        if args.what == "data":
            rows = bench_data(config, args.workdir, args.steps)
        elif args.what == "checkpoint":
            rows = bench_checkpoint(config, args.workdir, args.steps)
        else:
            result = bench_train(config, args.steps, args.warmup)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.what == "checkpoint":
        print(f"{config.name} on {jax.devices()[0].device_kind}: batch {config.train.batch_size} x "
              f"{config.train.seq_len}")
        for name, value in rows:
            print(f"{name:>40}: {value:,.3f}")
        return 0
    if args.what == "data":
        print(f"{config.name}: batch {config.train.batch_size} x {config.train.seq_len}, "
              f"document_mask={config.data.document_mask}, num_workers={config.data.num_workers}")
        for name, rate in rows:
            print(f"{name:>28}: {rate:,.0f} tokens/s")
        return 0
    dtype = compute_dtype(config.model.dtype)
    head_dim = config.model.d_model // config.model.n_head
    impl = attention.resolve(config.model.attention, dtype, head_dim, needs_mask=False,
                             needs_dropout=config.model.attn_dropout > 0)
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}, "
          f"compute {jnp.dtype(dtype).name}, attention {impl}, remat {config.model.remat}")
    print(HEADER)
    print(format_row(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
