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


# Words an argument may carry besides mesh sizes: the model settings they stand for.
MODEL_WORDS = {"dropout": ["model.dropout=0.1", "model.attn_dropout=0.1"], "pallas": ["model.attention=pallas"]}


def losses(arg: str) -> dict:
    words = [kv for kv in arg.split(",") if kv in MODEL_WORDS]
    overrides = [f"mesh.{kv}" for kv in arg.split(",") if kv and kv != "single" and kv not in MODEL_WORDS]
    overrides += [setting for word in words for setting in MODEL_WORDS[word]]
    config = load_config("configs/tiny.py", ["model.dtype=float32", "train.batch_size=16", "train.seq_len=32",
                                             "model.n_layer=1", "train.warmup_steps=2", *overrides])
    mesh = None
    if arg.split(",")[0] == "single":
        config.mesh.data = 1
        mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
    trainer = Trainer.from_config(config, mesh=mesh)
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


def held(tree) -> dict:
    """{device id: bytes} of the shards each device really holds of `tree`'s arrays."""
    out: dict = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            out[shard.device.id] = out.get(shard.device.id, 0) + shard.data.nbytes
    return out


def account(params, opt_state) -> dict:
    """Bytes each device holds of the parameters and of the optimizer state, their totals, and the
    bytes of the leaves the rules do not split over every fsdp x tensor device (biases, LayerNorm,
    the position table: vectors or tables with one split dimension), with their moments."""
    def unsplit(name):
        return name.endswith(("bias", "scale")) or name.endswith("wpe")
    names = checkpoint.flatten(params)
    opt_names = checkpoint.opt_state_names(opt_state)
    specs = {}
    for name, leaf in opt_names.items():
        param = next((p for p in names if name.endswith("." + p)), None)
        specs[name] = {"spec": [None if a is None else a for a in leaf.sharding.spec],
                       "param_spec": None if param is None else list(names[param].sharding.spec),
                       "same_sharding": param is not None and leaf.sharding == names[param].sharding}
    return {"params": held(params), "opt": held(opt_state),
            "params_total": sum(x.nbytes for x in names.values()),
            "opt_total": sum(x.nbytes for x in opt_names.values()),
            "params_unsplit": sum(x.nbytes for n, x in names.items() if unsplit(n)),
            "opt_unsplit": sum(x.nbytes for n, x in opt_names.items() if unsplit(n) or x.ndim == 0),
            "opt_specs": specs}


def layouts(meshes: list[str]) -> dict:
    """The per-device memory account of pretraining and fine-tuning state on each mesh, and the
    collectives of the compiled fsdp train step."""
    from gptjax import finetune as ft
    from gptjax.tasks import get_task
    out = {}
    for arg in meshes:
        trainer = _trainer(arg)
        config = load_config("configs/tiny.py", ["model.dtype=float32", "train.batch_size=16", "model.n_layer=1",
                                                 "task=synthetic_sentiment",
                                                 *[f"mesh.{kv}" for kv in arg.split(",")]])
        runner = ft.TaskRunner.from_config(config, get_task(config.task), total_steps=4)
        out[arg] = {"mesh": dict(trainer.mesh.shape),
                    "pretrain": account(trainer.state.params, trainer.state.opt_state),
                    "finetune": account(runner.state.params, runner.state.opt_state)}
        if trainer.mesh.shape["tensor"] == 1:
            out[arg]["hlo"] = collectives(trainer)
    return out


_OP = re.compile(r"^\s*(?:ROOT )?%\S+ = (\(.*?\)|\w+\[[0-9,]*\]\S*) (all-gather|all-reduce|reduce-scatter)"
                 r"(?:-start)?\(", re.M)


def collectives(trainer) -> dict:
    """What the fsdp train step compiles to: the shapes every collective produces, and the shapes
    of the step's optimizer-state inputs and outputs."""
    batch = as_batch(np.random.default_rng(0).integers(6, 512, size=(16, 33)).astype(np.int32), 2, 0, False)
    with jax.set_mesh(trainer.mesh):
        compiled = trainer._step.lower(trainer.state, batch).compile()
    text = compiled.as_text()
    ops = [(op, re.findall(r"\w+\[([0-9,]*)\]", shapes)) for shapes, op in _OP.findall(text)]
    names = checkpoint.opt_state_names(trainer.state.opt_state)
    # (full shape, the shard the compiled step takes, the shard it returns) of each leaf.
    shards = {name: [list(x.shape), list(a.shard_shape(x.shape)), list(b.shard_shape(x.shape))]
              for (name, x), a, b in zip(names.items(), jax.tree.leaves(compiled.input_shardings[0][0].opt_state),
                                         jax.tree.leaves(compiled.output_shardings[0].opt_state))}
    params = checkpoint.flatten(trainer.state.params)
    return {"ops": [[op, [[int(d) for d in s.split(",") if d] for s in shapes]] for op, shapes in ops],
            "weights": {n: list(x.shape) for n, x in params.items() if x.ndim >= 2},
            "opt_shards": shards, "backend": jax.default_backend()}


def _trainer(arg: str) -> Trainer:
    overrides = [f"mesh.{kv}" for kv in arg.split(",") if kv and kv != "single"]
    config = load_config("configs/tiny.py", ["model.dtype=float32", "train.batch_size=16", "train.seq_len=32",
                                             "model.n_layer=1", *overrides])
    if arg == "single":
        config.mesh.data = 1
        return Trainer.from_config(config, mesh=sharding.make_mesh(config.mesh, devices=jax.devices()[:1]))
    return Trainer.from_config(config)


def restore(workdir: str, saved_on: str, targets: list[str]) -> dict:
    """Trains 3 steps on `saved_on`, checkpoints, and restores onto each target mesh."""
    trainer = _trainer(saved_on)
    rng = np.random.default_rng(0)
    for _ in range(3):
        trainer.step(as_batch(rng.integers(6, 512, size=(16, 33)).astype(np.int32), 2, 0, False))
    saver = checkpoint.Checkpointer(workdir)
    saver.save(3, trainer.state.params, trainer.state.opt_state, {"step": 3}, None)
    saver.close()
    expected = {k: np.asarray(v) for k, v in checkpoint.flatten(trainer.state.params).items()}
    expected_opt = [np.asarray(x) for x in jax.tree.leaves(trainer.state.opt_state)]
    out = {}
    for target in targets:
        fresh = _trainer(target)
        reader = checkpoint.Checkpointer(workdir, read_only=True)
        params, opt_state, _ = reader.restore(3, fresh.state.params, fresh.state.opt_state)
        reader.close()
        flat = checkpoint.flatten(params)
        out[target] = {
            "params_equal": all(np.array_equal(np.asarray(flat[k]), expected[k]) for k in expected),
            "opt_equal": all(np.array_equal(np.asarray(a), b) for a, b in zip(jax.tree.leaves(opt_state), expected_opt)),
            "init_differs": not all(np.array_equal(np.asarray(v), expected[k])
                                    for k, v in checkpoint.flatten(fresh.state.params).items()),
            # Each array arrives in the target mesh's layout, as the rules give it.
            "layout_matches": all(flat[k].sharding.is_equivalent_to(v.sharding, v.ndim)
                                  for k, v in checkpoint.flatten(fresh.state.params).items()),
            "devices": len(flat["wte"].sharding.device_set),
            "account": account(params, opt_state),
            "mesh": dict(fresh.mesh.shape),
        }
    return out


if __name__ == "__main__":
    if sys.argv[1] == "restore":
        print(json.dumps(restore(sys.argv[2], sys.argv[3], sys.argv[4:])))
    elif sys.argv[1] == "layouts":
        print(json.dumps(layouts(sys.argv[2:])))
    else:
        print(json.dumps({arg: losses(arg) for arg in sys.argv[1:]}))
