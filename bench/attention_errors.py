"""Relative error of the attention kernel against float32 XLA attention, forward and each
gradient, per case (the cases of tests/test_mosaic_attention.py), on fresh random inputs.

    JAX_PLATFORMS=cpu python bench/attention_errors.py              # Mosaic GPU build, interpret mode
    JAX_PLATFORMS=cpu python bench/attention_errors.py --kernel triton

Relative error is ||kernel - reference|| / ||reference|| over the whole array. On a GPU the same
command runs the compiled kernel.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from gptjax import attention
from gptjax.bench.attention import packed_segment_ids
from gptjax.dropout import seed_of
from gptjax.kernels import mosaic_attention, triton_attention

CASES = [  # (name, t, heads, kv_heads, head_dim, documents, dropout, dtype)
    ("ragged T, grouped heads", 100, 4, 2, 64, "several", 0.0, jnp.bfloat16),
    ("head dim 128, dropout", 150, 4, 1, 128, "several", 0.1, jnp.bfloat16),
    ("causal only, float16", 130, 2, 2, 40, None, 0.2, jnp.float16),
    ("a row of padding", 128, 2, 2, 64, "padding row", 0.1, jnp.bfloat16),
]


def errors(kernel, t, heads, kv_heads, d, documents, rate, dtype, rng) -> list[float]:
    q, k, v = (jnp.asarray(rng.standard_normal((2, t, h, d)), dtype) for h in (heads, kv_heads, kv_heads))
    ct = jnp.asarray(rng.standard_normal((2, t, heads, d)), dtype)
    seg = None
    if documents:
        seg = packed_segment_ids(rng, 2, t, t // 4)
        if documents == "padding row":
            seg[1] = 0
        seg = jnp.asarray(seg)
    key = jax.random.key(int(rng.integers(2 ** 31)))
    seed = jax.lax.bitcast_convert_type(seed_of(key), jnp.int32)
    f = lambda *a: kernel.flash_attention(*a, segment_ids=seg, dropout_rate=rate, dropout_seed=seed if rate else None)
    out, vjp = jax.jit(lambda *a: jax.vjp(f, *a))(q, k, v)
    got = (out, *vjp(ct))
    group = heads // kv_heads
    up = lambda x: jnp.repeat(x.astype(jnp.float32), group, axis=2)

    def xla(q, k, v):
        return attention.xla_attention(q, up(k), up(v), segment_ids=seg, dropout_rate=rate,
                                       dropout_key=key if rate else None)
    out, vjp = jax.vjp(xla, q.astype(jnp.float32), k, v)
    want = (out, *vjp(ct.astype(jnp.float32)))
    return [float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64))
                  / np.linalg.norm(np.asarray(b, np.float64))) for a, b in zip(got, want)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernel", choices=("mosaic", "triton"), default="mosaic")
    p.add_argument("--seed", type=int, default=None, help="default: fresh inputs each run")
    a = p.parse_args(argv)
    seed = a.seed if a.seed is not None else int(np.random.SeedSequence().entropy % 2 ** 32)
    rng = np.random.default_rng(seed)
    kernel = {"mosaic": mosaic_attention, "triton": triton_attention}[a.kernel]
    print(f"{a.kernel} kernel, jax {jax.__version__}, {jax.default_backend()}, seed {seed}")
    print("| case | T | H / KV | D | dropout | dtype | out | dq | dk | dv |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, t, heads, kv_heads, d, documents, rate, dtype in CASES:
        errs = errors(kernel, t, heads, kv_heads, d, documents, rate, dtype, rng)
        print(f"| {name} | {t} | {heads} / {kv_heads} | {d} | {rate} | {jnp.dtype(dtype).name} | "
              + " | ".join(f"{e:.1e}" for e in errs) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
