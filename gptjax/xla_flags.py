"""XLA compiler flags for GPU training: the one place they are named, grouped into presets.

    python -m gptjax.bench train --config configs/gpt2_small.py --xla-flags=gpu
    GPTJAX_XLA_FLAGS=gpu gptjax pretrain --config configs/gpt2_small.py --workdir runs/gpt2_small
    GPTJAX_XLA_FLAGS=gpu,deterministic gptjax pretrain ...   # bitwise resume on GPUs

No preset is on by default: a speed flag is worth setting only where the benchmark shows it pays on
the machine at hand (bench/NOTES.md keeps the measurements). XLA reads its flags once, when JAX
first starts a backend, so they are applied before anything touches a device; an unknown flag
stops the process there, which is why every flag below is checked against the installed XLA in
the tests.
"""

from __future__ import annotations

import os

from gptjax.errors import UserError

PRESETS = {
    "none": (),
    # Overlap the step's asynchronous copies and collectives with compute; on one GPU this
    # mostly reorders host-to-device copies and the optimizer's reductions.
    "overlap": ("--xla_gpu_enable_latency_hiding_scheduler=true",
                "--xla_gpu_enable_highest_priority_async_stream=true"),
    # cuBLAS for every matmul instead of letting XLA weigh Triton-generated GEMMs against it: to
    # measure whether the autotuner's choice for the large vocabulary matmul is the fast one.
    "cublas": ("--xla_gpu_enable_triton_gemm=false",),
    # No CUDA graphs: fewer launches saved, but no capture cost and no graph-update stalls.
    "no_command_buffers": ("--xla_gpu_enable_command_buffer=",),
    # Bitwise the same results on every run, which resuming needs to match an uninterrupted run bit
    # for bit on a GPU: deterministic kernels instead of ones that add with atomics in whatever
    # order threads arrive (the embedding gradient's scatter-add, GEMMs, cuDNN attention), and no
    # autotuning, whose timed pick of a kernel can differ between the first process and the
    # resumed one. It costs speed, so it is not part of "gpu".
    "deterministic": ("--xla_gpu_deterministic_ops=true",),
}
PRESETS["gpu"] = PRESETS["overlap"] + PRESETS["cublas"]

ENV = "GPTJAX_XLA_FLAGS"


def flags_for(spec: str) -> list[str]:
    """The flags of a comma-separated list of preset names (raw --xla_* flags are passed through)."""
    flags = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        if item.startswith("--xla_"):
            flags.append(item)
        elif item in PRESETS:
            flags.extend(PRESETS[item])
        else:
            raise UserError(f"unknown XLA flag preset '{item}'; use one of {sorted(PRESETS)} or --xla_... flags")
    return flags


def backends_started() -> bool:
    from jax._src import xla_bridge  # no public way to ask without starting one
    return bool(getattr(xla_bridge, "_backends", None))


def apply(spec: str | None = None) -> list[str]:
    """Adds the flags of `spec` (default: $GPTJAX_XLA_FLAGS) to XLA_FLAGS; returns them."""
    spec = os.environ.get(ENV, "") if spec is None else spec
    flags = flags_for(spec)
    if not flags:
        return []
    if backends_started():
        raise UserError(f"XLA flags ({spec}) must be set before JAX starts a backend; set {ENV} in the "
                        f"environment of the command instead")
    present = os.environ.get("XLA_FLAGS", "").split()
    os.environ["XLA_FLAGS"] = " ".join(present + [f for f in flags if f not in present])
    return flags
