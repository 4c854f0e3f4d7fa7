"""Fine-tunes the tiny model for a few updates on one mesh per mesh spec; prints losses and
validation logits as JSON. Started by test_finetune.py with 8 fake CPU devices."""

import json
import sys

import jax
from flax import nnx

from gptjax import finetune as ft, sharding
from gptjax.api import GPT
from gptjax.config import load_config
from gptjax.tasks import get_task, synthetic_split, transforms

MESHES = ["single", "data=2,fsdp=4", "data=2,fsdp=2,tensor=2", "data=1,fsdp=4,tensor=2"]


def run(pretrained: str, arg: str) -> dict:
    overrides = [f"mesh.{kv}" for kv in arg.split(",") if kv != "single"]
    config = load_config("configs/tiny.py", ["model.n_layer=1", "model.dtype=float32", "train.batch_size=16",
                                             "train.lr=1e-3", "task=synthetic_paraphrase", *overrides])
    source = GPT.from_pretrained(pretrained)
    config = ft.effective_config(config, source)
    mesh = None
    if arg == "single":
        config.mesh.data = 1
        mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
    task = get_task(config.task)
    runner = ft.TaskRunner.from_config(config, task, total_steps=6, mesh=mesh)
    runner.load_decoder(nnx.state(source.module, nnx.Param))
    train = transforms.encode(task, synthetic_split(task, "train", size=96), source.tokenizer, 128)
    losses = [float(runner.step(ft.make_batch(train, ft.epoch_rows(96, 16, 0, 0, i), 16))["loss"]) for i in range(6)]
    valid = transforms.encode(task, synthetic_split(task, "validation", size=40), source.tokenizer, 128)
    return {"losses": losses, "logits": runner.logits(valid).tolist()}


if __name__ == "__main__":
    print(json.dumps({arg: run(sys.argv[1], arg) for arg in MESHES}))
