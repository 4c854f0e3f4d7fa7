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
from gptjax.optim import lr_schedule, make_optimizer


def abstract_batch(config) -> dict:
    b, t = config.train.batch_size, config.train.seq_len
    names = ["tokens", "targets", "positions"] + (["segment_ids"] if config.data.document_mask else [])
    batch = {name: jax.ShapeDtypeStruct((b, t), jnp.int32) for name in names}
    return dict(batch, loss_mask=jax.ShapeDtypeStruct((b, t), jnp.float32))


def _abstract_decoder(config):
    """(graphdef, params as shapes) of the config's decoder; nothing is allocated."""
    return nnx.split(nnx.eval_shape(lambda: init_decoder(config.model, config.train.seed)), nnx.Param)


def compile_train_step(config):
    """(compiled train step on one device, seconds to lower and compile); nothing is allocated."""
    from gptjax.train import TrainState, train_step

    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    graphdef, params = _abstract_decoder(config)
    tx = make_optimizer(config.train)
    state = TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, jax.eval_shape(tx.init, params))
    step = jax.jit(partial(train_step, graphdef, tx, lr_schedule(config.train), config.train.grad_accum,
                           config.train.seed), donate_argnums=(0,))
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = step.lower(state, abstract_batch(config)).compile()
    return compiled, time.perf_counter() - start


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
