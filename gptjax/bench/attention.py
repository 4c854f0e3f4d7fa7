"""Attention kernel benchmark: gptjax's flash attention, its Mosaic GPU build and its Triton
build, against cuDNN and XLA, forward, backward and both, in TFLOP/s.

    python -m gptjax.bench attention                       # GPU: T 1024..8192, head dims 64, 128
    python -m gptjax.bench attention --seq-lens 128 --head-dims 64 --batch 1 --heads 2
    python -m gptjax.bench attention --tune --kernel mosaic --seq-lens 2048 --head-dims 64,128

Shapes keep the work per call comparable: batch * T = 16384 tokens (batch = 16384 // T) and
heads * head_dim = 1024 (16 heads of 64, 8 of 128), unless `batch` / `heads` are given.

FLOPs are causal attention's: forward 2 * 2 * B * H * T^2 * D / 2, backward 2.5x that, forward +
backward 3.5x. Backward time is (forward + backward) - forward. The "packed" case uses rows of
documents of average length T/8 (sorted segment ids): our kernel masks per document and skips
the tiles no document pair needs, cuDNN runs causal-only on the same rows (no document mask: more
work, wrong answer for packing, the speed to beat), and XLA takes the dense [B, 1, T, T] document
mask. (JAX's bundled Pallas attention is deprecated in favour of tokamax, whose flash attention
takes no segment ids or dropout, so neither is compared here.) The Mosaic GPU build runs on
Hopper (H100, H200) in half precision; elsewhere its rows say why not. Packed rows still report the
causal FLOPs, so their TFLOP/s is "causal-equivalent" throughput: ms are the honest comparison.

An implementation that cannot run here (cuDNN or Triton on CPU, out of memory) is reported as
unavailable with a one-word reason instead of stopping the run. On CPU both builds of our kernel
run in interpret mode: slow, only there to show the benchmark works.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


TOKENS_PER_CALL = 16384
MODEL_WIDTH = 1024  # heads * head_dim


def packed_segment_ids(rng: np.random.Generator, batch: int, seq_len: int, mean_len: int) -> np.ndarray:
    """Sorted ids 1, 1, ..., 2, 2, ... per row, document lengths uniform in [mean/2, 3*mean/2]."""
    rows = []
    for _ in range(batch):
        lengths = []
        while sum(lengths) < seq_len:
            lengths.append(int(rng.integers(max(1, mean_len // 2), max(2, 3 * mean_len // 2) + 1)))
        rows.append(np.repeat(np.arange(1, len(lengths) + 1), lengths)[:seq_len])
    return np.stack(rows).astype(np.int32)


def _implementations(case: str, seg, seq_len: int, head_dim: int):
    """name -> attention(q, k, v) for one case; every one causal (plus documents where it can)."""
    dpa = jax.nn.dot_product_attention
    impls = {}
    mosaic, triton = _kernel("mosaic").flash_attention, _kernel("triton").flash_attention
    if case == "causal":
        impls["mosaic (gptjax)"] = lambda q, k, v: mosaic(q, k, v, causal=True)
        impls["triton (gptjax)"] = lambda q, k, v: triton(q, k, v, causal=True)
        impls["cudnn"] = lambda q, k, v: dpa(q, k, v, is_causal=True, implementation="cudnn")
        impls["xla"] = lambda q, k, v: dpa(q, k, v, is_causal=True, implementation="xla")
    else:
        doc_mask = (seg[:, None, :, None] == seg[:, None, None, :])  # [B, 1, T, T]
        impls["mosaic (gptjax)"] = lambda q, k, v: mosaic(q, k, v, segment_ids=seg, causal=True)
        impls["triton (gptjax)"] = lambda q, k, v: triton(q, k, v, segment_ids=seg, causal=True)
        impls["cudnn (causal only)"] = lambda q, k, v: dpa(q, k, v, is_causal=True, implementation="cudnn")
        impls["xla (dense mask)"] = lambda q, k, v: dpa(q, k, v, mask=doc_mask, is_causal=True,
                                                        implementation="xla")
    return impls


def _median_seconds(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    jax.block_until_ready(fn(*args))  # warm up
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _reason(error: Exception, name: str) -> str:
    text = f"{type(error).__name__} {error}".lower()
    if "resource_exhausted" in text or "out of memory" in text:
        return "oom"
    if "bfloat16 or all float16" in text:
        return "needs-half"
    if jax.default_backend() != "gpu" and "cudnn" in name:
        return "no-gpu"
    if "cudnn" in text:
        return "cudnn-unsupported"
    return type(error).__name__


def bench_attention(seq_lens=(1024, 2048, 4096, 8192), head_dims=(64, 128), batch=None, heads=None,
                    dtype=jnp.bfloat16, repeats: int = 10, cases=("causal", "packed")) -> list[dict]:
    """One dict per (case, T, head_dim, implementation): ms and TFLOP/s for fwd, bwd, fwd+bwd,
    or `status` = "unavailable: <reason>" (with the full `error`) when it could not run."""
    rows = []
    rng = np.random.default_rng(0)
    for seq_len in seq_lens:
        for head_dim in head_dims:
            b = batch or max(1, TOKENS_PER_CALL // seq_len)
            h = heads or max(1, MODEL_WIDTH // head_dim)
            q, k, v, ct = (jnp.asarray(rng.standard_normal((b, seq_len, h, head_dim)), dtype) for _ in range(4))
            seg = jnp.asarray(packed_segment_ids(rng, b, seq_len, max(1, seq_len // 8)))
            fwd_flops = 2 * 2 * b * h * seq_len * seq_len * head_dim / 2
            for case in cases:
                for name, attn in _implementations(case, seg, seq_len, head_dim).items():
                    row = dict(case=case, impl=name, seq_len=seq_len, head_dim=head_dim, batch=b, heads=h,
                               dtype=jnp.dtype(dtype).name, status="ok")
                    fwd = jax.jit(attn)
                    fwd_bwd = jax.jit(lambda q, k, v, ct, attn=attn: jax.vjp(attn, q, k, v)[1](ct))
                    try:
                        t_fwd = _median_seconds(fwd, (q, k, v), repeats)
                        t_both = _median_seconds(fwd_bwd, (q, k, v, ct), repeats)
                    except Exception as e:  # noqa: BLE001 - report and go on to the next one
                        row.update(status=f"unavailable: {_reason(e, name)}", error=f"{type(e).__name__}: {e}"[:500])
                        rows.append(row)
                        continue
                    t_bwd = max(t_both - t_fwd, 1e-9)
                    for part, secs, mult in (("fwd", t_fwd, 1.0), ("bwd", t_bwd, 2.5), ("fwd_bwd", t_both, 3.5)):
                        row[f"{part}_ms"] = secs * 1e3
                        row[f"{part}_tflops"] = mult * fwd_flops / secs / 1e12
                    rows.append(row)
                    del fwd, fwd_bwd
    return rows


# The grids `tune` searches, per build of the kernel: forward tiles (and Triton's launch
# parameters) first, the backward at its default; then the backward's with the best forward.
GRIDS = {
    "triton": ([dict(block_q=bq, block_k=bk, num_warps=w, num_stages=s)
                for bq in (64, 128) for bk in (32, 64, 128) for w in (4, 8) for s in (2, 3)],
               [dict(block_q_bwd=bq, block_k_bwd=bk, num_warps_bwd=w, num_stages_bwd=s)
                for bq in (32, 64, 128) for bk in (32, 64, 128) for w in (4, 8) for s in (2,)]),
    "mosaic": ([dict(block_q=bq, block_k=bk) for bq in (64, 128) for bk in (64, 128)],
               [dict(block_q_bwd=bq, block_k_bwd=bk) for bq in (64, 128) for bk in (64, 128)]),
}
KERNELS = ("mosaic", "triton")


def _kernel(name: str):
    # Imported when used: the Triton build loads Pallas's Triton backend, which JAX 0.11+ warns of.
    return importlib.import_module(f"gptjax.kernels.{name}_attention")


def tune(seq_len: int, head_dim: int, batch=None, heads=None, dtype=jnp.bfloat16, repeats: int = 10,
         forward_grid=None, backward_grid=None, kernel: str = "triton"):
    """The fastest BlockSizes for a build of the kernel on packed rows (documents of average
    length T/8) at one shape: the forward's settings by forward time, then the backward's by
    forward + backward time. Returns (best, every trial: settings, ms or the error that ruled it out)."""
    module = _kernel(kernel)
    b = batch or max(1, TOKENS_PER_CALL // seq_len)
    h = heads or max(1, MODEL_WIDTH // head_dim)
    rng = np.random.default_rng(0)
    q, k, v, ct = (jnp.asarray(rng.standard_normal((b, seq_len, h, head_dim)), dtype) for _ in range(4))
    seg = jnp.asarray(packed_segment_ids(rng, b, seq_len, max(1, seq_len // 8)))
    best = module.default_block_sizes(head_dim) if kernel == "triton" else module.BlockSizes()
    trials = []

    def timed(sizes, backward: bool) -> float:
        def attn(q, k, v):
            return module.flash_attention(q, k, v, segment_ids=seg, block_sizes=sizes)
        if not backward:
            return _median_seconds(jax.jit(attn), (q, k, v), repeats)
        return _median_seconds(jax.jit(lambda q, k, v, ct: jax.vjp(attn, q, k, v)[1](ct)), (q, k, v, ct), repeats)

    forward, backward_settings = GRIDS[kernel]
    for backward, grid in ((False, forward_grid or forward), (True, backward_grid or backward_settings)):
        results = []
        for settings in grid:
            sizes = dataclasses.replace(best, **settings)
            trial = dict(settings, part="fwd+bwd" if backward else "fwd")
            try:
                trial["ms"] = 1e3 * timed(sizes, backward)
                results.append((trial["ms"], sizes))
            except Exception as e:  # noqa: BLE001 - a tile that does not fit rules itself out
                trial["error"] = f"{type(e).__name__}: {e}"[:200]
            trials.append(trial)
        if results:
            best = min(results, key=lambda r: r[0])[1]
    return best, trials


def format_rows(rows: list[dict]) -> str:
    """A markdown table; unavailable rows show their reason in place of the numbers."""
    head = ("| case | implementation | T | D | B x H | fwd ms | bwd ms | fwd+bwd ms "
            "| fwd TFLOP/s | bwd TFLOP/s | fwd+bwd TFLOP/s |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        shape = f"| {r['case']} | {r['impl']} | {r['seq_len']} | {r['head_dim']} | {r['batch']} x {r['heads']} |"
        if r["status"] != "ok":
            lines.append(f"{shape} {r['status']} | | | | | |")
            continue
        nums = [f"{r[p + '_ms']:.3f}" for p in ("fwd", "bwd", "fwd_bwd")]
        nums += [f"{r[p + '_tflops']:.1f}" if r[p + "_tflops"] >= 1 else f"{r[p + '_tflops']:.2g}"
                 for p in ("fwd", "bwd", "fwd_bwd")]
        lines.append(f"{shape} " + " | ".join(nums) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ints = lambda s: tuple(int(x) for x in s.split(","))
    p = argparse.ArgumentParser(prog="python -m gptjax.bench attention", description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-lens", type=ints, default=(1024, 2048, 4096, 8192))
    p.add_argument("--head-dims", type=ints, default=(64, 128))
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--tune", action="store_true", help="search the kernel's tile sizes and launch parameters at "
                                                       "each (T, head dim) instead, and print the best")
    p.add_argument("--kernel", choices=KERNELS, default="mosaic", help="the build --tune searches")
    a = p.parse_args(argv)
    if a.tune:
        for seq_len in a.seq_lens:
            for head_dim in a.head_dims:
                best, trials = tune(seq_len, head_dim, a.batch, a.heads, jnp.dtype(a.dtype), a.repeats,
                                    kernel=a.kernel)
                failed = sum("error" in t for t in trials)
                print(f"{a.kernel} T={seq_len} head_dim={head_dim}: {best} ({len(trials)} trials, {failed} ruled out)",
                      flush=True)
        return 0
    rows = bench_attention(a.seq_lens, a.head_dims, a.batch, a.heads, jnp.dtype(a.dtype), a.repeats)
    print(f"backend: {jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}")
    print(format_rows(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
