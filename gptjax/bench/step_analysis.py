"""What the compiler makes of the train step, without running it or allocating the model.

    python -m gptjax.bench memory --config configs/gpt2_xl.py --batches 4,8,16 --config.model.dtype=bfloat16

The step is lowered from shapes alone (`jax.eval_shape`), so a 1.5B model can be analysed on a
machine that could not hold its optimizer state, and compiled for whatever backend JAX runs on.
Three readings:

- the activations the forward pass saves for the backward, read from the traced program (the
  autodiff residuals after the remat policy): backend-independent, and the number to choose a
  remat policy and batch size by. XLA on CPU schedules rematerialised work early and so does not
  show remat's savings in its own plan;
- the compiled executable's memory plan (`memory_analysis`): arguments (params, optimizer state, batch), outputs, the
  temporaries of the step and what donation lets outputs reuse; their sum is the peak one device
  must hold for this step, a lower bound for the allocator's real peak;
- the buffers of the optimized HLO that span the whole vocabulary for every token
  ([..., V] with B x T x V elements): where the loss's logits and their gradient live, and in which
  dtype. On GPU the memory-lean loss should leave only bf16 ones. XLA on CPU runs bf16 matmuls
  in float32 and fuses fewer elementwise ops into reductions, so float32 ones there are
  expected: run this on the GPU for the figure that counts.
"""

from __future__ import annotations

import math
import re
import time
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from gptjax import sharding
from gptjax.model import init_decoder
from gptjax.model_config import ModelConfig
from gptjax.optim import lr_schedule, make_optimizer


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


def compile_train_step(config, devices=None, kind: str = "pretrain"):
    """(compiled step, seconds to lower and compile, abstract train state) of pretraining or of
    fine-tuning (a two-class task on one sequence per example) on the config's mesh over
    `devices` (default: one device); nothing is allocated."""
    from gptjax.loop import train_step

    mesh = sharding.make_mesh(config.mesh if devices is not None else {"data": 1, "fsdp": 1, "tensor": 1},
                              devices if devices is not None else jax.devices()[:1])
    sharding.check_divisible(config, mesh)
    t = config.train
    if kind == "pretrain":
        graphdef, params = _abstract_decoder(config)
        tx = make_optimizer(t)
        from gptjax.train import batch_loss
        step = partial(train_step, partial(batch_loss, graphdef), tx, lr_schedule(t), t.grad_accum, t.seed)
        batch_sharding = sharding.batch_sharding(mesh)
        batch = abstract_batch(config)
    else:
        from gptjax import finetune as ft
        from gptjax.model import init_task_model
        graphdef, params = nnx.split(nnx.eval_shape(
            lambda: init_task_model(ModelConfig.from_config(config.model), 2, "single", t.seed)), nnx.Param)
        train_cfg = ft.schedule_config(config, max(t.steps, 1))
        tx = make_optimizer(train_cfg)
        f = config.finetune
        loss = partial(ft.batch_loss, graphdef, "classification", f.lm_weight, f.clf_dropout, 0)
        step = partial(train_step, loss, tx, lr_schedule(train_cfg), 1, t.seed)
        batch_sharding = jax.sharding.NamedSharding(mesh, sharding.spec(("batch",)))
        b, length = t.batch_size, config.finetune.max_len or config.model.max_len
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
        compiled = jitted.lower(state, batch).compile()
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


def vocabulary_buffers(hlo_text: str, vocab: int, min_rows: int) -> list[tuple[str, str, tuple]]:
    """(instruction, dtype, shape) of every array the optimized HLO writes to memory (not a value
    inside a fusion, not an input) whose last dimension is the vocabulary and whose other
    dimensions hold at least `min_rows` rows: logits, or a chunk of them."""
    found = []
    fusion_bodies = set(re.findall(r"fusion\(.*?calls=%([\w.\-]+)", hlo_text))
    for block in re.split(r"\n(?=\S)", hlo_text):
        name = _COMPUTATION.match(block)
        if name is None or name.group(1) in fusion_bodies or "fused" in name.group(1):
            continue  # the insides of a fusion live in registers, not memory
        for line in block.split("\n")[1:]:
            m = _BUFFER.match(line)
            if not m or not m.group(3) or re.search(r" (parameter|get-tuple-element|bitcast)\(", line):
                continue
            shape = tuple(int(d) for d in m.group(3).split(","))
            if len(shape) > 1 and shape[-1] == vocab and math.prod(shape[:-1]) >= min_rows:
                found.append((m.group(1), m.group(2), shape))
    return found
