"""`bench train`: the jitted pretraining step alone on random tokens, one table row per batch size.

No data pipeline runs, so the figures are the step's own: tokens/s, MFU, steady step ms, compile
s and first step s apart, the allocator's peak GiB and the compiler's memory plan.
"""

from __future__ import annotations

import gc
import os
import time

import jax
import numpy as np

from gptjax.compiled import memory_plan
from gptjax.mfu import mfu


def random_batch(config, seed: int, sharding=None) -> dict:
    """Random tokens in the shape of a pretraining batch; with data.document_mask, rows hold
    documents of average length seq_len / 8 (segment ids and restarting positions)."""
    from gptjax.data.packing import as_batch
    b, t, v = config.train.batch_size, config.train.seq_len, config.model.vocab_size
    rng = np.random.default_rng(seed)
    rows = rng.integers(2, v, size=(b, t + 1), dtype=np.int32)
    rows[rng.random(rows.shape) < 8 / t] = 1  # end-of-document tokens
    return jax.device_put(as_batch(rows, eos_id=1, pad_id=0, document_mask=config.data.document_mask), sharding)


def _peak_gib() -> float | None:
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


def bench_train(config, steps: int, warmup: int, profile_dir: str | None = None) -> dict:
    from gptjax.train import Trainer
    trainer = Trainer.from_config(config)
    batches = [random_batch(config, i, trainer.batch_sharding) for i in range(2)]
    compile_s = trainer.compile(batches[0])
    plan_gib = memory_plan(trainer._step)["peak"]
    start = time.perf_counter()
    jax.block_until_ready(trainer.step(batches[0]))
    first_step_s = time.perf_counter() - start
    for i in range(warmup):
        trainer.step(batches[i % 2])
    jax.block_until_ready(trainer.state.params)
    if profile_dir:
        jax.profiler.start_trace(profile_dir)
    start = time.perf_counter()
    for i in range(steps):
        metrics = trainer.step(batches[i % 2])
    jax.block_until_ready(metrics)
    elapsed = time.perf_counter() - start
    if profile_dir:
        jax.profiler.stop_trace()
    tokens_per_sec = steps * config.train.batch_size * config.train.seq_len / elapsed
    return {"config": config.name, "batch": config.train.batch_size, "seq": config.train.seq_len,
            "tokens_per_sec": tokens_per_sec, "mfu": mfu(trainer.flops_per_token, tokens_per_sec),
            "step_ms": 1000 * elapsed / steps, "compile_s": compile_s, "first_step_s": first_step_s,
            "peak_gib": _peak_gib(), "plan_gib": plan_gib, "loss": float(metrics["loss"])}


def format_row(r: dict) -> str:
    mfu_text = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
    return (f"| {r['config']} | {r['batch']} | {r['seq']} | {r['tokens_per_sec']:,.0f} | {mfu_text} | "
            f"{r['step_ms']:.1f} | {r['compile_s']:.1f} | {r['first_step_s']:.2f} | {peak} | {r['plan_gib']:.2f} |")


HEADER = ("| config | batch | seq | tokens/s | MFU | step ms | compile s | first step s | peak GiB | plan GiB |\n"
          "|---|---|---|---|---|---|---|---|---|---|")


def print_table(config_for, batches: list, steps: int, warmup: int, profile: str = "") -> None:
    """One row per batch size; config_for(batch) is the config at that batch size (None: as
    configured). A batch size that runs out of memory ends the table with a row saying so."""
    print(HEADER)
    # Ascending: the allocator's peak is the process's so far, so each row's is its own.
    for batch in sorted(batches, key=lambda b: -1 if b is None else b):
        config = config_for(batch)
        try:
            result = bench_train(config, steps, warmup, profile and os.path.join(profile, f"batch{batch}"))
        except Exception as e:  # noqa: BLE001 - one batch size too large must not lose the other rows
            if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
                raise
            print(f"| {config.name} | {config.train.batch_size} | {config.train.seq_len} | out of memory: "
                  f"{str(e).splitlines()[0][:120]} |", flush=True)
            break  # larger batches would not fit either
        print(format_row(result), flush=True)
        gc.collect()  # the previous batch size's state goes before the next one is built
