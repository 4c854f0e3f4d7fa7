"""The train steps compiled for a target, without running them or allocating the model.

    gptjax compile --config configs/gpt2_xl.py --target h100:8 --config.mesh.fsdp=8
    python -m gptjax.bench memory --config configs/gpt2_xl.py --batches 8,16   # the host's view

The step is `loop.TrainStep`, the one pretraining and fine-tuning run, lowered from shapes alone
(`jax.eval_shape`) on the config's mesh over the target's devices (targets.py), so a 1.5B model
can be planned for eight GPUs on a laptop. What is read of the compiled program:

- the memory plan (`memory_analysis`): arguments (parameters, optimizer state, batch), outputs,
  temporaries and what donation lets outputs reuse; their sum is the peak one device must hold
  for the step, a lower bound for the allocator's real peak;
- the collectives (all-gather, reduce-scatter, all-reduce, ...) and the custom calls (cuDNN
  attention, Pallas kernels, cuBLAS GEMMs) of the optimized program, and how many kernels (fusions
  and custom calls) one step launches;
- the buffers written to memory that span the whole vocabulary for every token ([..., V] with
  B x T x V elements): where the loss's logits and their gradient live, and in which dtype.

These are the target compiler's own program and plan, not measurements; XLA's CPU pipeline lacks
passes the GPU and TPU pipelines run (it forms no reduce-scatter; jax 0.10's writes bf16 matmul
outputs in float32, 0.12's in bf16), so read GPU and TPU properties from a GPU or TPU target,
never from `cpu:N`.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections import Counter
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from gptjax import attention, sharding, targets
from gptjax.errors import CompileFailed, DoesNotFit, UserError
from gptjax.model import compute_dtype, init_decoder
from gptjax.model_config import ModelConfig
from gptjax.optim import Schedule, lr_schedule, make_optimizer

KINDS = ("pretrain", "finetune")


def abstract_batch(config) -> dict:
    b, t = config.train.batch_size, config.train.seq_len
    names = ["tokens", "targets", "positions"] + (["segment_ids"] if config.data.document_mask else [])
    batch = {name: jax.ShapeDtypeStruct((b, t), jnp.int32) for name in names}
    return dict(batch, loss_mask=jax.ShapeDtypeStruct((b, t), jnp.float32))


def _abstract_decoder(config):
    """(graphdef, params as shapes) of the config's decoder; nothing is allocated."""
    return nnx.split(nnx.eval_shape(lambda: init_decoder(ModelConfig.from_config(config.model), config.train.seed)), nnx.Param)


def _on_mesh(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _abstract_state(mesh, tx, params):
    """The train state as shapes in the layout training gives it: parameters by the rules, the
    optimizer state by its parameters, the step replicated."""
    from gptjax.loop import TrainState
    params = _on_mesh(params, sharding.param_shardings(mesh, params))
    opt = jax.eval_shape(tx.init, params)
    opt = _on_mesh(opt, sharding.opt_state_shardings(tx, params, mesh))
    return TrainState(jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding.replicated(mesh)), params, opt)


def step_length(config, kind: str) -> int:
    return config.train.seq_len if kind == "pretrain" else (config.finetune.max_len or config.model.max_len)


def compile_train_step(config, devices=None, kind: str = "pretrain", platform: targets.Platform | None = None):
    """(compiled step, seconds to lower and compile, abstract train state) of pretraining or of
    fine-tuning (a two-class task on one sequence per example) on the config's mesh over
    `devices` (default: one host device), traced for `platform` (default: the host's)."""
    if kind not in KINDS:
        raise UserError(f"unknown kind of step {kind!r}; use pretrain, finetune or both")
    with targets.compiling_for(platform or targets.current()):
        return _compile(config, devices, kind)


def _compile(config, devices, kind: str):
    from gptjax.loop import TrainStep

    mesh = sharding.make_mesh(config.mesh if devices is not None else {"data": 1, "fsdp": 1, "tensor": 1},
                              devices if devices is not None else jax.devices()[:1])
    sharding.check_divisible(ModelConfig.from_config(config.model), config.train, mesh)
    t = config.train
    if kind == "pretrain":
        graphdef, params = _abstract_decoder(config)
        schedule = lr_schedule(Schedule.of_train(t))
        from gptjax.train import batch_loss
        tx = make_optimizer(t, schedule)
        step = TrainStep(partial(batch_loss, graphdef), tx, schedule, t.grad_accum, t.seed)
        batch_sharding = sharding.batch_sharding(mesh)
        batch = abstract_batch(config)
    else:
        from gptjax import finetune as ft
        from gptjax.model import init_task_model
        graphdef, params = nnx.split(nnx.eval_shape(
            lambda: init_task_model(ModelConfig.from_config(config.model), 2, "single", t.seed)), nnx.Param)
        schedule = lr_schedule(ft.finetune_schedule(t.lr, config.finetune.warmup_fraction, max(t.steps, 1)))
        f = config.finetune
        loss = partial(ft.batch_loss, graphdef, "classification", f.lm_weight, f.clf_dropout, 0)
        tx = make_optimizer(t, schedule)
        step = TrainStep(loss, tx, schedule, 1, t.seed)
        batch_sharding = jax.sharding.NamedSharding(mesh, sharding.spec(("batch",)))
        b, length = t.batch_size, step_length(config, kind)
        batch = {"tokens": jax.ShapeDtypeStruct((b, 1, length), jnp.int32),
                 "extract": jax.ShapeDtypeStruct((b, 1), jnp.int32),
                 "labels": jax.ShapeDtypeStruct((b,), jnp.int32),
                 "weights": jax.ShapeDtypeStruct((b,), jnp.float32)}
    state = _abstract_state(mesh, tx, params)
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    jitted = jax.jit(step, in_shardings=(state_shardings, batch_sharding),
                     out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=(0,))
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        try:
            compiled = jitted.lower(state, batch).compile()
        except UserError:
            raise
        except Exception as e:  # the compiler's own refusal, e.g. an op it cannot partition
            first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
            raise CompileFailed(f"the {kind} step does not compile: {type(e).__name__}: {first[:400]}") from e
    return compiled, time.perf_counter() - start, state


def state_gib_per_device(state) -> dict:
    """GiB of parameters and of optimizer state on the device that holds the most of each."""
    def most(tree):
        held = sharding.bytes_per_device(tree)
        return max(held.values()) / 2.0 ** 30 if held else 0.0
    return {"params": most(state.params), "opt_state": most(state.opt_state)}


def saved_activations_gib(config) -> float | None:
    """GiB of the values the forward pass keeps for the backward (the residuals of autodiff, after
    the remat policy): the activation memory of a step as JAX asks for it, before any backend
    schedules it. Read from the traced program, so it holds for every backend, with the
    attention implementation this machine resolves to. None where this JAX cannot tell."""
    try:
        from jax._src.ad_checkpoint import saved_residuals  # the function behind print_saved_residuals
    except ImportError:
        return None
    from gptjax.train import batch_loss

    graphdef, params = _abstract_decoder(config)

    def loss(params, batch):
        return batch_loss(graphdef, params, batch, None)[0]

    residuals = saved_residuals(loss, params, abstract_batch(config))
    return sum(math.prod(aval.shape) * aval.dtype.itemsize for aval, why in residuals
               if "from the argument" not in why) / 2.0 ** 30


def memory_plan(compiled) -> dict:
    """GiB the step needs on its device: arguments + outputs not aliased to them + temporaries."""
    m = compiled.memory_analysis()
    gib = 2.0 ** 30
    plan = {"arguments": m.argument_size_in_bytes / gib, "outputs": m.output_size_in_bytes / gib,
            "aliased": m.alias_size_in_bytes / gib, "temporaries": m.temp_size_in_bytes / gib}
    plan["peak"] = plan["arguments"] + plan["outputs"] - plan["aliased"] + plan["temporaries"]
    return plan


_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) ", re.M)
_BUFFER = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\w+)\[([0-9,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%\S+ = .*? ([a-z][a-z0-9\-]*)\(", re.M)
_CUSTOM_CALL = re.compile(r'custom_call_target="([^"]+)"')
_CALLS = re.compile(r"calls=%([\w.\-]+)")
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute",
               "collective-broadcast", "ragged-all-to-all")


def _unfused_blocks(hlo_text: str):
    """The computations of an optimized HLO module that run as launches of their own (the entry,
    loop bodies, called computations), not the insides of fusions, which live in registers."""
    fusion_bodies = set(re.findall(r"fusion\(.*?calls=%([\w.\-]+)", hlo_text))
    # A computation starts at its header line; an instruction may span lines (a TPU kernel's
    # backend config), so a line that merely starts unindented does not start one.
    for block in re.split(r"\n(?=(?:ENTRY )?%[\w.\-]+ \()", hlo_text):
        name = _COMPUTATION.match(block)
        if name is None or name.group(1) in fusion_bodies or "fused" in name.group(1):
            continue
        yield block


def vocabulary_buffers(hlo_text: str, vocab: int, min_rows: int) -> list[tuple[str, str, tuple]]:
    """(instruction, dtype, shape) of every array the optimized HLO writes to memory (not a value
    inside a fusion, not an input) whose last dimension is the vocabulary and whose other
    dimensions hold at least `min_rows` rows: logits, or a chunk of them."""
    found = []
    for block in _unfused_blocks(hlo_text):
        for line in block.split("\n")[1:]:
            m = _BUFFER.match(line)
            if not m or not m.group(3) or re.search(r" (parameter|get-tuple-element|bitcast)\(", line):
                continue
            shape = tuple(int(d) for d in m.group(3).split(","))
            if len(shape) > 1 and shape[-1] == vocab and math.prod(shape[:-1]) >= min_rows:
                found.append((m.group(1), m.group(2), shape))
    return found


def program_ops(hlo_text: str) -> dict:
    """Counts read from an optimized HLO module: collectives by kind (an asynchronous pair, start
    and done, counts once), custom calls by target, and the kernels a step launches (fusions and
    custom calls outside fusions; a loop body's count once, however often it runs)."""
    collectives, calls, kernels = Counter(), Counter(), Counter()
    for block in _unfused_blocks(hlo_text):
        for line in block.split("\n")[1:]:
            m = _INSTRUCTION.match(line)
            if not m:
                continue
            op = m.group(1)
            base = op[:-len("-start")] if op.endswith("-start") else op
            if base in COLLECTIVES and not op.endswith("-done"):
                collectives[base] += 1
            if op == "custom-call":
                target = _CUSTOM_CALL.search(line)
                calls[target.group(1) if target else "?"] += 1
                kernels["custom-call"] += 1
            elif op == "fusion":
                kernels["fusion"] += 1
                # TPU writes a reduce-scatter as a fusion of an all-reduce and its slice.
                body = _CALLS.search(line)
                if body and body.group(1).startswith("all-reduce-scatter"):
                    collectives["reduce-scatter"] += 1
    return {"collectives": dict(sorted(collectives.items())), "custom_calls": dict(sorted(calls.items())),
            "kernels": dict(sorted(kernels.items()))}


def resolved_attention(config, kind: str) -> str:
    """What `model.attention` becomes in the step, for the platform being traced for."""
    m = config.model
    dropout = m.attn_dropout > 0
    return attention.resolve(m.attention, compute_dtype(m.dtype), m.d_model // m.n_head, needs_mask=False,
                             needs_dropout=dropout, segments=kind == "pretrain" and bool(config.data.document_mask),
                             seq_len=step_length(config, kind))


def analyse(config, target: targets.Target, kind: str, hlo_dir: str | None = None) -> dict:
    """One record of the `kind` step of `config` compiled for `target` (see the module doc)."""
    from gptjax.config import padded_vocab_size

    devices = list(target.devices)
    compiled, seconds, state = compile_train_step(config, devices, kind, target.platform)
    plan = memory_plan(compiled)
    held = state_gib_per_device(state)
    text = compiled.as_text()
    if hlo_dir:
        try:
            os.makedirs(hlo_dir, exist_ok=True)
            with open(os.path.join(hlo_dir, f"{kind}.hlo.txt"), "w") as f:
                f.write(text)
        except OSError as e:
            raise UserError(f"cannot write the HLO to --hlo {hlo_dir}: {e.strerror}; pass a writable folder") from None
    mesh = sharding.mesh_shape(config.mesh, len(devices))
    m = config.model
    rows = config.train.batch_size // (mesh["data"] * mesh["fsdp"])
    length = step_length(config, kind)
    vocab = padded_vocab_size(m.vocab_size, m.vocab_pad_multiple)
    found = vocabulary_buffers(text, vocab, rows * min(m.loss_chunk_len or length, length))
    buffers = Counter(f"{dtype}{list(shape)}" for _, dtype, shape in found if shape[:-1] != (m.d_model,))
    with targets.compiling_for(target.platform):
        dtype = jnp.dtype(compute_dtype(m.dtype)).name
        impl = resolved_attention(config, kind)
    return {"target": target.name, "kind": kind, "config": config.name, "device": target.platform.device_kind,
            "devices": len(devices), "mesh": mesh, "batch": config.train.batch_size, "seq": length,
            "dtype": dtype, "attention": impl, "remat": m.remat, "loss_chunk_len": m.loss_chunk_len,
            "params_gib": held["params"], "opt_state_gib": held["opt_state"],
            "arguments_gib": plan["arguments"], "outputs_gib": plan["outputs"], "aliased_gib": plan["aliased"],
            "temporaries_gib": plan["temporaries"], "peak_gib": plan["peak"],
            "device_gib": target.device_gib, "usable_gib": target.usable_gib, "usable_note": target.note,
            "fits": plan["peak"] <= target.usable_gib,
            **program_ops(text), "vocab_buffers": dict(sorted(buffers.items())), "compile_s": seconds}


def advice(record: dict) -> str:
    """The one line for a plan that does not fit: the peak, the device's memory, what to change."""
    r = record
    fsdp = r["mesh"]["fsdp"]
    changes = [f"a smaller train.batch_size (now {r['batch']})"]
    if r["remat"] != "full":
        changes.append(f"model.remat=full (now {r['remat']})")
    if not r["loss_chunk_len"]:
        changes.append("model.loss_chunk_len=256")
    if fsdp < r["devices"]:
        changes.append(f"a larger mesh.fsdp (now {fsdp})")
    return (f"the {r['kind']} step of {r['config']} needs {r['peak_gib']:.2f} GiB per device on {r['target']}, "
            f"more than the {r['usable_gib']:.2f} GiB a step may use of the {r['device_gib']:.2f} GiB device "
            f"({r['usable_note']}); try " + ", ".join(changes))


def _gib(x: float) -> str:
    return f"{x:.2f}"


def format_record(r: dict) -> str:
    """The record as the lines `gptjax compile` prints."""
    mesh = " x ".join(f"{k}={v}" for k, v in r["mesh"].items())
    calls = ", ".join(f"{k} {v}" for k, v in r["custom_calls"].items()) or "none"
    collectives = ", ".join(f"{k} {v}" for k, v in r["collectives"].items()) or "none"
    kernels = r["kernels"]
    buffers = ", ".join(f"{k} x{v}" for k, v in r["vocab_buffers"].items()) or "none"
    verdict = "fits" if r["fits"] else "DOES NOT FIT"
    return "\n".join([
        f"{r['kind']} step of {r['config']} for {r['target']} ({r['device']} x{r['devices']}), mesh {mesh}, "
        f"batch {r['batch']} x {r['seq']}, {r['dtype']}, attention {r['attention']}, remat {r['remat']}, "
        f"loss_chunk_len {r['loss_chunk_len']}",
        f"  per device: params {_gib(r['params_gib'])} GiB, optimizer state {_gib(r['opt_state_gib'])} GiB, "
        f"arguments {_gib(r['arguments_gib'])} GiB, temporaries {_gib(r['temporaries_gib'])} GiB, "
        f"peak {_gib(r['peak_gib'])} GiB of {_gib(r['usable_gib'])} GiB usable "
        f"({_gib(r['device_gib'])} GiB device; {r['usable_note']}): {verdict}",
        f"  collectives: {collectives}",
        f"  custom calls: {calls}",
        f"  kernels per step: {sum(kernels.values())} (fusions {kernels.get('fusion', 0)}, "
        f"custom calls {kernels.get('custom-call', 0)})",
        f"  [tokens, V] buffers: {buffers}",
        f"  compiled in {r['compile_s']:.1f} s (the compiler's plan, not a measurement)",
    ])
