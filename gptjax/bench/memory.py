"""`bench memory`: one table row per batch size and kind of step (pretraining, fine-tuning) with
what each device holds and what the compiled step needs, on the config's mesh, from shapes alone.

A view of `gptjax compile` (gptjax/compiled.py): the same records, as a table over batch sizes,
with the activations autodiff saves for the backward beside them. Without --target the step
compiles for this host: its accelerators, or as many fake CPU devices as the mesh needs when it
has fewer (the per-device account is a property of the layout, not of the hardware).
"""

from __future__ import annotations

import math

from gptjax import compiled, targets
from gptjax.errors import UserError

MEMORY_HEADER = ("| config | target | mesh data x fsdp x tensor | step | batch | seq | remat | loss_chunk_len | "
                 "params GiB/device | optimizer GiB/device | compiled arguments GiB | saved activations GiB | "
                 "compiled temporaries GiB | compiled peak GiB | fits | compile s | [tokens, V] buffers |\n"
                 + "|---" * 17 + "|")


def mesh_devices(mesh_cfg) -> int:
    """Devices a mesh config asks for, counting a -1 ("the rest") as 1."""
    return math.prod(max(int(mesh_cfg[axis]), 1) for axis in ("data", "fsdp", "tensor"))


def print_table(config_for, batches: list, kinds: str, target_name: str = "") -> None:
    """config_for(batch) is the config at that batch size (None: as configured); kinds is
    "pretrain", "finetune" or both, comma-separated; target_name as `gptjax compile --target`
    takes it (empty: this host)."""
    unknown = set(kinds.split(",")) - set(compiled.KINDS)
    if unknown:
        raise UserError(f"--kinds {kinds}: unknown step {sorted(unknown)[0]!r}; use pretrain, finetune or both")
    print(MEMORY_HEADER)
    target = targets.open_target(target_name) if target_name else None
    for batch in batches:
        config = config_for(batch)
        here = target or targets.host_target(mesh_devices(config.mesh))
        for kind in kinds.split(","):
            r = compiled.analyse(config, here, kind)
            saved = None
            if kind == "pretrain":
                # One device's rows: the batch splits over data x fsdp.
                per_device = config_for(config.train.batch_size // (r["mesh"]["data"] * r["mesh"]["fsdp"]))
                with targets.compiling_for(here.platform):
                    saved = compiled.saved_activations_gib(per_device)
            sizes = "x".join(str(r["mesh"][a]) for a in ("data", "fsdp", "tensor"))
            buffers = ", ".join(r["vocab_buffers"]) or "none"
            print(f"| {r['config']} | {r['target']} | {sizes} | {kind} | {r['batch']} | {r['seq']} | {r['remat']} | "
                  f"{r['loss_chunk_len']} | {r['params_gib']:.2f} | {r['opt_state_gib']:.2f} | "
                  f"{r['arguments_gib']:.2f} | {'-' if saved is None else f'{saved:.2f}'} | "
                  f"{r['temporaries_gib']:.2f} | {r['peak_gib']:.2f} | {'yes' if r['fits'] else 'no'} | "
                  f"{r['compile_s']:.1f} | {buffers} |", flush=True)


def ask_for_fake_devices(config, target_name: str = "") -> None:
    """Before a backend starts: the CPU devices the config's mesh needs, or the host set up for
    `target_name` as `gptjax compile` sets it up."""
    targets.prepare_host(target_name, mesh_devices(config.mesh))
