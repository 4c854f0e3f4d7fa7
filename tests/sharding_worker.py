"""Runs the tiny model's train step on one mesh per argument; prints per-step losses as JSON.

Started by test_sharding.py in a fresh process with 8 fake CPU devices (XLA_FLAGS must be set
before JAX starts, which the pytest process has already done).
"""

import json
import re
import sys

import jax
import numpy as np

from gptjax import checkpoint, sharding
from gptjax.config import load_config
from gptjax.data.packing import as_batch
from gptjax.train import Trainer

STEPS = 10


def losses(arg: str) -> dict:
    overrides = [f"mesh.{kv}" for kv in arg.split(",") if kv and kv != "single"]
    config = load_config("configs/tiny.py", ["model.dtype=float32", "train.batch_size=16", "train.seq_len=32",
                                             "model.n_layer=2", "train.warmup_steps=2", *overrides])
    mesh = None
    if arg == "single":
        config.mesh.data = 1
        mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
    trainer = Trainer(config, mesh=mesh)
    rng = np.random.default_rng(0)
    out = []
    for step in range(STEPS):
        rows = rng.integers(6, 512, size=(16, 33)).astype(np.int32)
        batch = as_batch(rows, 2, 0, False)
        if step == 0:
            with jax.set_mesh(trainer.mesh):
                text = trainer._step.lower(trainer.state, batch).as_text()
            # Activation layouts pinned in the step: "<spec> : <shape>" of every constraint.
            constraints = sorted(set(re.findall(r"sdy.sharding_constraint %\S+ <@mesh, (.*)>", text)))
        out.append(float(trainer.step(batch)["loss"]))
    flat = checkpoint.flatten(trainer.state.params)
    specs = {name: tuple(flat[name].sharding.spec) for name in
             ("wte", "wpe", "blocks.0.attn.qkv_kernel", "blocks.0.attn.out_kernel", "blocks.0.mlp.fc_kernel",
              "blocks.0.mlp.proj_bias", "blocks.0.ln_1.scale")}
    local = {name: list(flat[name].addressable_shards[0].data.shape) for name in ("wte", "blocks.0.attn.qkv_kernel")}
    return {"losses": out, "specs": specs, "local_shapes": local, "mesh": dict(trainer.mesh.shape),
            "constraints": constraints}


if __name__ == "__main__":
    print(json.dumps({arg: losses(arg) for arg in sys.argv[1:]}))
