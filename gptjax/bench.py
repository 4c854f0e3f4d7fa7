"""Benchmarks of training speed and memory; every performance figure in the project comes from here.

    python -m gptjax.bench train --config configs/gpt2_small.py --batches 12,32
    python -m gptjax.bench parts --config configs/gpt2_small.py --config.train.batch_size=12
    python -m gptjax.bench memory --config configs/gpt2_xl.py --batches 4,8,16
    python -m gptjax.bench memory --config configs/gpt2_xl.py --config.mesh.fsdp=8 --batches 8
    python -m gptjax.bench loop --config configs/gpt2_small.py --workdir runs/bench-loop --steps 300
    python -m gptjax.bench attention --seq-lens 1024,2048,4096,8192 --head-dims 64,128
    python -m gptjax.bench data --config configs/gpt2_small.py --workdir runs/bench-data
    python -m gptjax.bench checkpoint --config configs/gpt2_small.py --workdir runs/bench-ckpt \
        --config.train.batch_size=1 --config.train.seq_len=128

`train` runs the same jitted step as `gptjax pretrain` on random tokens (no data pipeline, so the
figure is the step alone) and prints one table row per batch size: tokens/s, MFU, steady step
ms, compile s and first step s apart, the allocator's peak GiB and the compiler's memory plan.
`parts` splits a step into its parts (step_parts.py), `memory` compiles without allocating
(step_analysis.py), `attention` times the attention kernels alone (attention_bench.py), `loop` measures what the pretraining loop adds to the bare step (data,
logging, evaluation, saves). `memory` compiles on the config's mesh (`--config.mesh.fsdp=8`, ...)
over fake CPU devices when the host has fewer, and gives what each device holds. `--xla-flags`
takes presets from xla_flags.py. `train`, `parts` and `memory --kinds pretrain` need only jax,
flax, optax and ml_collections, so they run on a bare GPU machine.
Results and the commands behind them: bench/NOTES.md.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
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


def _random_batch(config, seed: int, sharding=None) -> dict:
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
    from gptjax import step_analysis
    from gptjax.train import Trainer
    trainer = Trainer(config)
    batches = [_random_batch(config, i, trainer.batch_sharding) for i in range(2)]
    compile_s = trainer.compile(batches[0])
    plan_gib = step_analysis.memory_plan(trainer._step)["peak"]
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


def bench_loop(config, workdir: str, steps: int) -> list[tuple[str, float]]:
    """What the pretraining loop costs on top of the bare step, at the config's intervals: the
    input pipeline and logging (inside the loop's step time), evaluation and the blocking part
    of saves (paused out of it, so timed apart and amortised over train.eval_every and
    train.checkpoint_every)."""
    from gptjax import checkpoint
    from gptjax.data import corpus
    from gptjax.train import Trainer, pretrain

    if os.path.exists(os.path.join(workdir, "checkpoints")):
        raise UserError(f"{workdir} already holds a run; pass a new --workdir")
    t = config.train
    config.train.steps = steps
    summary = pretrain(config, workdir, progress=False)
    timed = summary["history"][1:]  # the first record includes compilation
    if not timed:
        raise UserError(f"--steps {steps} leaves no logged interval after the first step; raise it above "
                        f"train.log_every={t.log_every}")
    counts = [timed[0]["step"] - 1] + [b["step"] - a["step"] for a, b in zip(timed, timed[1:])]
    loop_ms = sum(r["step_ms"] * n for r, n in zip(timed, counts)) / sum(counts)

    # Evaluation and a save, each timed on its second call: the loop's first one compiles the
    # evaluation or sets the checkpointer up, which a long run pays once.
    trainer = Trainer(config)
    _, eval_batches = corpus.pretraining_batches(config, corpus.workdir_tokenizer(config, workdir), workdir)
    eval_s = []
    for _ in range(2):
        start = time.perf_counter()
        trainer.eval_loss(eval_batches)
        eval_s.append(time.perf_counter() - start)
    saver = checkpoint.Checkpointer(os.path.join(workdir, "bench-saves"))
    save_s = []
    for step in (1, 2):
        start = time.perf_counter()
        saver.save(step, trainer.state.params, trainer.state.opt_state, {"step": step}, None)
        save_s.append(time.perf_counter() - start)
        saver.wait()
    saver.close()
    del trainer
    bare_ms = bench_train(config, steps=max(sum(counts) // 2, 5), warmup=3)["step_ms"]
    eval_ms = 1000 * eval_s[1] / t.eval_every if t.eval_every else 0.0
    save_ms = 1000 * save_s[1] / t.checkpoint_every if t.checkpoint_every else 0.0
    total = loop_ms - bare_ms + eval_ms + save_ms
    return [("bare step ms (random batch, no loop)", bare_ms),
            (f"loop step ms (loader, logging every {t.log_every})", loop_ms),
            (f"evaluation s, every {t.eval_every or '-'} steps (first call {eval_s[0]:.2f} s)", eval_s[1]),
            (f"save s the loop waits, every {t.checkpoint_every or '-'} steps", save_s[1]),
            ("loop overhead ms per step, amortised", total),
            ("loop overhead % of the bare step", 100 * total / bare_ms)]


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
    peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
    return (f"| {r['config']} | {r['batch']} | {r['seq']} | {r['tokens_per_sec']:,.0f} | {mfu_text} | "
            f"{r['step_ms']:.1f} | {r['compile_s']:.1f} | {r['first_step_s']:.2f} | {peak} | {r['plan_gib']:.2f} |")


HEADER = ("| config | batch | seq | tokens/s | MFU | step ms | compile s | first step s | peak GiB | plan GiB |\n"
          "|---|---|---|---|---|---|---|---|---|---|")


def _with_batch(config_path: str, overrides: list[str], batch: int | None):
    return load_config(config_path, overrides + ([] if batch is None else [f"train.batch_size={batch}"]))


def _describe(config) -> str:
    dtype = compute_dtype(config.model.dtype)
    head_dim = config.model.d_model // config.model.n_head
    impl = attention.resolve(config.model.attention, dtype, head_dim, needs_mask=False,
                             needs_dropout=config.model.attn_dropout > 0, segments=config.data.document_mask)
    return (f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}, "
            f"compute {jnp.dtype(dtype).name}, attention {impl}, remat {config.model.remat}, "
            f"loss_chunk_len {config.model.loss_chunk_len}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")


def _run(args, overrides: list[str]) -> None:
    batches = [None] if not getattr(args, "batches", None) else [int(b) for b in args.batches.split(",")]
    config = _with_batch(args.config, overrides, batches[0])
    if args.what == "data":
        rows = bench_data(config, args.workdir, args.steps)
        print(f"{config.name}: batch {config.train.batch_size} x {config.train.seq_len}, "
              f"document_mask={config.data.document_mask}, num_workers={config.data.num_workers}")
        for name, rate in rows:
            print(f"{name:>28}: {rate:,.0f} tokens/s")
        return
    print(_describe(config))
    if args.what in ("checkpoint", "loop"):
        rows = (bench_checkpoint if args.what == "checkpoint" else bench_loop)(config, args.workdir, args.steps)
        print(f"{config.name}: batch {config.train.batch_size} x {config.train.seq_len}")
        for name, value in rows:
            print(f"{name:>56}: {value:,.3f}")
        return
    if args.what == "parts":
        from gptjax.step_parts import format_parts, time_parts
        from gptjax.train import Trainer
        print(f"{config.name}: batch {config.train.batch_size} x {config.train.seq_len}")
        trainer = Trainer(config)
        print(format_parts(time_parts(trainer, _random_batch(config, 0, trainer.batch_sharding), args.steps)))
        return
    if args.what == "memory":
        _memory(args, overrides, batches)
        return
    print(HEADER)
    # Ascending: the allocator's peak is the process's so far, so each row's is its own.
    for batch in sorted(batches, key=lambda b: -1 if b is None else b):
        config = _with_batch(args.config, overrides, batch)
        try:
            result = bench_train(config, args.steps, args.warmup,
                                 args.profile and os.path.join(args.profile, f"batch{batch}"))
        except Exception as e:  # noqa: BLE001 - one batch size too large must not lose the other rows
            if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
                raise
            print(f"| {config.name} | {config.train.batch_size} | {config.train.seq_len} | out of memory: "
                  f"{str(e).splitlines()[0][:120]} |", flush=True)
            break  # larger batches would not fit either
        print(format_row(result), flush=True)
        gc.collect()  # the previous batch size's state goes before the next one is built


MEMORY_HEADER = ("| config | mesh data x fsdp x tensor | step | batch | seq | remat | loss_chunk_len | "
                 "params GiB/device | optimizer GiB/device | compiled arguments GiB | saved activations GiB | "
                 "compiled temporaries GiB | compiled peak GiB | compile s | [tokens, V] buffers |\n"
                 + "|---" * 15 + "|")


def mesh_devices(mesh_cfg) -> int:
    """Devices a mesh config asks for, counting a -1 ("the rest") as 1."""
    return math.prod(max(int(mesh_cfg[axis]), 1) for axis in ("data", "fsdp", "tensor"))


def _memory(args, overrides: list[str], batches: list) -> None:
    """One row per batch size and kind of step: what each device holds and what the compiled
    step needs, on the config's mesh, from shapes alone."""
    from gptjax import step_analysis
    from gptjax.config import padded_vocab_size
    unknown = set(args.kinds.split(",")) - {"pretrain", "finetune"}
    if unknown:
        raise UserError(f"--kinds {args.kinds}: unknown step {sorted(unknown)[0]!r}; use pretrain, finetune or both")
    print(MEMORY_HEADER)
    for batch in batches:
        config = _with_batch(args.config, overrides, batch)
        need = mesh_devices(config.mesh)
        # The accelerators when there are enough, else as many fake CPU devices (main() asked XLA
        # for them): the per-device account is a property of the layout, not of the hardware.
        devices = jax.devices() if jax.device_count() >= need else jax.devices("cpu")
        if len(devices) < need:
            raise UserError(f"the mesh needs {need} devices and this process has {len(devices)}; run "
                            f"`python -m gptjax.bench memory` in a fresh process, which makes them")
        sizes = _mesh_sizes(config, need)
        # One device's rows: the batch splits over data x fsdp.
        per_device = _with_batch(args.config, overrides, config.train.batch_size // (sizes[0] * sizes[1]))
        m = config.model
        for kind in args.kinds.split(","):
            compiled, seconds, state = step_analysis.compile_train_step(config, devices[:need], kind)
            plan = step_analysis.memory_plan(compiled)
            held = step_analysis.state_gib_per_device(state)
            rows_min = per_device.train.batch_size * (m.loss_chunk_len or config.train.seq_len)
            found = step_analysis.vocabulary_buffers(compiled.as_text(), padded_vocab_size(m.vocab_size,
                                                     m.vocab_pad_multiple), rows_min)
            logits = {f"{dtype}{list(shape)}" for _, dtype, shape in found if shape[:-1] != (m.d_model,)}
            buffers = ", ".join(sorted(logits)) or "none"  # ([d_model, V]: the embedding, not logits)
            saved = step_analysis.saved_activations_gib(per_device) if kind == "pretrain" else None
            seq = config.train.seq_len if kind == "pretrain" else (config.finetune.max_len or m.max_len)
            print(f"| {config.name} | {'x'.join(map(str, sizes))} | {kind} | {config.train.batch_size} | {seq} | {m.remat} | "
                  f"{m.loss_chunk_len} | {held['params']:.2f} | {held['opt_state']:.2f} | {plan['arguments']:.2f} | "
                  f"{'-' if saved is None else f'{saved:.2f}'} | {plan['temporaries']:.2f} | {plan['peak']:.2f} | "
                  f"{seconds:.1f} | {buffers} |", flush=True)


def _mesh_sizes(config, need: int) -> tuple:
    from gptjax.sharding import MESH_AXES, mesh_shape
    sizes = mesh_shape(config.mesh, need)
    return tuple(sizes[axis] for axis in MESH_AXES)


def _fake_devices_for(args, overrides: list[str]) -> None:
    """Asks XLA for as many CPU devices as the memory account's mesh needs, before a backend starts
    (they cost nothing until used, and a GPU host keeps its GPUs)."""
    from gptjax import xla_flags
    need = mesh_devices(load_config(args.config, overrides).mesh)
    if need > 1 and not xla_flags.backends_started():
        present = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in present:
            os.environ["XLA_FLAGS"] = f"{present} --xla_force_host_platform_device_count={need}".strip()


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
    command("loop", "what the pretraining loop adds to the bare step", 200, workdir=True)
    command("data", "time the input pipeline", 200, workdir=True)
    command("checkpoint", "time saving the train state", 5, workdir=True)
    sub.add_parser("attention", add_help=False, help="attention kernels alone: TFLOP/s of the Pallas kernel, cuDNN, "
                                                     "XLA and JAX's bundled kernel (--help for its options)")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["attention"]:
        from gptjax import attention_bench
        return attention_bench.main(argv[1:])
    args, extra = parser.parse_known_args(argv)
    from gptjax import xla_flags
    from gptjax.cli import split_overrides
    try:
        xla_flags.apply(args.xla_flags)  # before anything starts a backend
        if args.what == "memory":
            _fake_devices_for(args, split_overrides(extra))
        _run(args, split_overrides(extra))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
