"""`bench memory`: one table row per batch size and kind of step (pretraining, fine-tuning) with
what each device holds and what the compiled step needs, on the config's mesh, from shapes alone.

The readings come from step_analysis.py. When the host has fewer devices than the mesh, the
step compiles over as many fake CPU devices: the per-device account is a property of the layout,
not of the hardware.
"""

from __future__ import annotations

import math
import os

import jax

from gptjax.bench import step_analysis
from gptjax.errors import UserError

MEMORY_HEADER = ("| config | mesh data x fsdp x tensor | step | batch | seq | remat | loss_chunk_len | "
                 "params GiB/device | optimizer GiB/device | compiled arguments GiB | saved activations GiB | "
                 "compiled temporaries GiB | compiled peak GiB | compile s | [tokens, V] buffers |\n"
                 + "|---" * 15 + "|")


def mesh_devices(mesh_cfg) -> int:
    """Devices a mesh config asks for, counting a -1 ("the rest") as 1."""
    return math.prod(max(int(mesh_cfg[axis]), 1) for axis in ("data", "fsdp", "tensor"))


def print_table(config_for, batches: list, kinds: str) -> None:
    """config_for(batch) is the config at that batch size (None: as configured); kinds is
    "pretrain", "finetune" or both, comma-separated."""
    from gptjax.config import padded_vocab_size
    unknown = set(kinds.split(",")) - {"pretrain", "finetune"}
    if unknown:
        raise UserError(f"--kinds {kinds}: unknown step {sorted(unknown)[0]!r}; use pretrain, finetune or both")
    print(MEMORY_HEADER)
    for batch in batches:
        config = config_for(batch)
        need = mesh_devices(config.mesh)
        # The accelerators when there are enough, else as many fake CPU devices (the command asked
        # XLA for them before a backend started).
        devices = jax.devices() if jax.device_count() >= need else jax.devices("cpu")
        if len(devices) < need:
            raise UserError(f"the mesh needs {need} devices and this process has {len(devices)}; run "
                            f"`python -m gptjax.bench memory` in a fresh process, which makes them")
        sizes = _mesh_sizes(config, need)
        # One device's rows: the batch splits over data x fsdp.
        per_device = config_for(config.train.batch_size // (sizes[0] * sizes[1]))
        m = config.model
        for kind in kinds.split(","):
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


def ask_for_fake_devices(config) -> None:
    """Asks XLA for as many CPU devices as the config's mesh needs, before a backend starts
    (they cost nothing until used, and a GPU host keeps its GPUs)."""
    from gptjax import xla_flags
    need = mesh_devices(config.mesh)
    if need > 1 and not xla_flags.backends_started():
        present = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in present:
            os.environ["XLA_FLAGS"] = f"{present} --xla_force_host_platform_device_count={need}".strip()
