"""The train steps compiled for GPUs and TPUs this machine does not have (`gptjax compile`).

Everything here is read from the program XLA's GPU compiler (H100 target config) or libtpu
(v5e slice) writes for the real `loop.train_step`, never from the CPU's: the collectives the
target runs, its attention kernels, its [tokens, V] buffers and its memory plan.
"""

import json
import math
import os
import re
import subprocess
import sys
from collections import Counter

import jax
import numpy as np
import pytest

from gptjax import compiled, sharding, targets
from gptjax.config import load_config
from gptjax.errors import UserError
from gptjax.model import compute_dtype

N_LAYER = 2
VOCAB = 1000  # padded to 1024: unlike the MLP width (512), so a [tokens, V] buffer is the logits
BASE = [f"model.n_layer={N_LAYER}", "train.seq_len=128", f"model.vocab_size={VOCAB}", "train.batch_size=16",
        "finetune.max_len=128"]
VARIANTS = {"plain": [], "docs": ["data.document_mask=true"],
            "dropout": ["model.dropout=0.1", "model.attn_dropout=0.1"]}


def _config(mesh: str, variant: str):
    return load_config("configs/tiny.py", BASE + [f"mesh.{kv}" for kv in mesh.split(",")] + VARIANTS[variant])


@pytest.fixture(scope="module")
def h100_8():
    return targets.open_target("h100:8")


@pytest.fixture(scope="module")
def hlo_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("hlo")


def _analyse(target, mesh, variant, kind, hlo_dir):
    config = _config(mesh, variant)
    where = hlo_dir / f"{target.name}-{mesh}-{variant}".replace(":", "_").replace(",", "_")
    record = compiled.analyse(config, target, kind, str(where))
    return config, record, (where / f"{kind}.hlo.txt").read_text()


_TYPE = re.compile(r"\b(pred|[fsu]\d+|bf16)\[([0-9,]*)\]")


def _elements(type_text: str) -> list[int]:
    return [math.prod(int(d) for d in dims.split(",") if d) for _, dims in _TYPE.findall(type_text)]


def collective_outputs(hlo: str) -> dict:
    """{kind: [elements of each array a collective writes]}, from the instructions that run as
    launches of their own (not the insides of fusions): the synchronous op, the `-done` of an
    asynchronous pair, or TPU's fused all-reduce-scatter."""
    out = {"reduce-scatter": [], "all-reduce": [], "all-gather": []}
    for block in compiled._unfused_blocks(hlo):
        for line in block.splitlines()[1:]:
            m = re.match(r"\s*(?:ROOT )?%\S+ = (.*?) ([a-z\-]+)\(", line)
            if not m:
                continue
            op = m.group(2)
            if op == "fusion" and re.search(r"calls=%all-reduce-scatter", line):
                op = "reduce-scatter"
            op = op[:-len("-done")] if op.endswith("-done") else op
            if op in out:
                out[op] += _elements(m.group(1))
    return out


def _param_shards(config, mesh_shape: dict, kind: str) -> dict:
    """{parameter: (elements, elements of one device's shard, whether it is a weight fsdp splits)}
    under the sharding rules. Weights: the matrices (ndim >= 2) but the position table."""
    from flax import nnx

    from gptjax.model import init_decoder, init_task_model
    from gptjax.model_config import ModelConfig
    cfg = ModelConfig.from_config(config.model)
    make = (lambda: init_decoder(cfg, 0)) if kind == "pretrain" else (lambda: init_task_model(cfg, 2, "single", 0))
    params = nnx.state(nnx.eval_shape(make), nnx.Param)
    specs = sharding.param_specs(params)
    out = {}
    for (path, leaf), (_, spec) in zip(jax.tree_util.tree_leaves_with_path(params),
                                       jax.tree_util.tree_leaves_with_path(specs)):
        axes = [(e,) if isinstance(e, str) else e or () for e in spec]
        size = math.prod(leaf.shape)
        name = jax.tree_util.keystr(path)
        weight = len(leaf.shape) >= 2 and "wpe" not in name and any("fsdp" in a for a in axes) and mesh_shape["fsdp"] > 1
        out[name] = (size, size // math.prod(math.prod(mesh_shape[x] for x in a) for a in axes), weight)
    return out


# (mesh, what attention needs, kind): every mesh, each attention path `auto` takes on a GPU.
CASES = [
    ("data=8", "plain", "pretrain"), ("data=8", "plain", "finetune"),
    ("data=1,fsdp=8", "plain", "pretrain"), ("data=1,fsdp=8", "docs", "pretrain"),
    ("data=1,fsdp=8", "dropout", "finetune"),
    ("data=2,fsdp=4", "plain", "pretrain"), ("data=2,fsdp=4", "dropout", "pretrain"),
    ("data=2,fsdp=4", "plain", "finetune"),
    ("data=1,fsdp=4,tensor=2", "plain", "pretrain"), ("data=1,fsdp=4,tensor=2", "docs", "pretrain"),
    ("data=1,fsdp=4,tensor=2", "dropout", "finetune"),
]


@pytest.mark.parametrize("mesh,variant,kind", CASES)
def test_the_train_step_compiles_for_eight_h100s(h100_8, hlo_dir, mesh, variant, kind):
    config, r, hlo = _analyse(h100_8, mesh, variant, kind, hlo_dir)
    sizes = {a: int(v) for a, v in (kv.split("=") for kv in mesh.split(","))}
    sizes = {a: sizes.get(a, 1) for a in ("data", "fsdp", "tensor")}
    assert r["devices"] == 8 and r["mesh"] == sizes and r["dtype"] == "bfloat16" and r["fits"]

    # `auto` resolved for the H100: cuDNN for plain causal attention, the project's kernel for
    # document masks and attention dropout; one forward and one backward per layer.
    calls = r["custom_calls"]
    fine_tuning_docs = kind == "finetune" and variant == "docs"  # (fine-tuning packs no documents)
    if variant == "plain" or fine_tuning_docs:
        assert r["attention"] == "cudnn"
        assert calls["__cudnn$fmhaSoftmax"] == calls["__cudnn$fmhaSoftmaxBackward"] == N_LAYER
    else:
        assert r["attention"] == "pallas" and not any("cudnn$fmha" in c for c in calls)
        # The Mosaic GPU build on an H100: forward, dq, dk/dv per layer, and no Triton kernel.
        assert calls["mosaic_gpu_v2"] == 3 * N_LAYER and not any("triton" in c for c in calls)

    # The memory-lean loss holds on the GPU: no float32 buffer spans [tokens, V].
    assert all(buffer.startswith("bf16") for buffer in r["vocab_buffers"]), r["vocab_buffers"]
    if sizes["tensor"] == 1:
        assert r["vocab_buffers"]  # the logits are there, in bf16 (tensor=2 splits V itself)

    # FSDP: each weight's gradient leaves the device by reduce-scatter into the 1/fsdp shard the
    # weight lives in; none is all-reduced whole. (XLA may sum a vector's gradient, or the
    # position table's, whole and slice it: d_model floats, or max_len x d_model, 3 MiB for GPT-2.)
    outputs = collective_outputs(hlo)
    shards = _param_shards(config, sizes, kind)
    if sizes["fsdp"] > 1:
        scattered = Counter(outputs["reduce-scatter"])
        needed = Counter(shard for size, shard, weight in shards.values() if weight)
        assert needed and all(scattered[n] >= k for n, k in needed.items()), (needed, scattered)
        if sizes["tensor"] == 1:
            # What is all-reduced: vectors and the position table (whole at most), each weight
            # shard's sum over data (data > 1), and scalars (the loss, the norm's partial sums).
            whole = sum(size for size, _, weight in shards.values() if not weight)
            over_data = sum(shard for _, shard, weight in shards.values() if weight) if sizes["data"] > 1 else 0
            scalars = 2 * len(shards) + 16
            assert sum(outputs["all-reduce"]) <= whole + over_data + scalars, outputs["all-reduce"]
            smallest_split = min(size for size, _, weight in shards.values() if weight)
            assert scalars < smallest_split  # so one gradient all-reduced whole would break the bound
    else:  # data parallel: every gradient is summed whole, once
        assert not outputs["reduce-scatter"]
        assert sum(outputs["all-reduce"]) >= sum(size for size, _, _ in shards.values())


@pytest.mark.parametrize("mesh", ["data=1,fsdp=8", "data=1,fsdp=4,tensor=2"])
@pytest.mark.parametrize("kind", ["pretrain", "finetune"])
def test_the_compiled_step_takes_each_devices_shard_of_the_state(h100_8, mesh, kind):
    """The GPU program's own arguments: every leaf of the state in the layout the rules give it,
    and per device exactly the bytes of its shards of the state and of its batch rows."""
    config = _config(mesh, "plain")
    step, _, state = compiled.compile_train_step(config, list(h100_8.devices), kind, h100_8.platform)
    taken = jax.tree.leaves(step.input_shardings[0][0])
    assert len(taken) == len(jax.tree.leaves(state))
    for leaf, sharding_in in zip(jax.tree.leaves(state), taken):
        assert sharding_in.is_equivalent_to(leaf.sharding, len(leaf.shape)), (leaf.shape, sharding_in)
    held = sharding.bytes_per_device(state)
    assert len(held) == 8 and len(set(held.values())) == 1  # SPMD: every device holds as much
    mesh_shape = taken[0].mesh.shape
    rows = config.train.batch_size // (mesh_shape["data"] * mesh_shape["fsdp"])
    if kind == "pretrain":
        batch = 4 * rows * config.train.seq_len * 4  # tokens, targets, positions, loss mask
    else:
        batch = rows * config.finetune.max_len * 4 + 3 * rows * 4  # tokens; extract, label, weight
    whole = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state))
    assert held[next(iter(held))] < whole / 3  # sharded, not replicated
    assert step.memory_analysis().argument_size_in_bytes == held[next(iter(held))] + batch


def test_one_h100_resolves_auto_for_the_gpu_not_the_host(hlo_dir):
    h100 = targets.open_target("h100")
    _, r, _ = _analyse(h100, "data=1", "plain", "pretrain", hlo_dir)
    assert r["devices"] == 1 and r["dtype"] == "bfloat16" and r["attention"] == "cudnn"
    assert r["custom_calls"]["__cudnn$fmhaSoftmax"] == N_LAYER
    assert r["vocab_buffers"] and all(b.startswith("bf16") for b in r["vocab_buffers"])
    assert r["collectives"] == {}
    assert math.isclose(r["device_gib"], targets.GPUS["h100"].memory_bytes / 2 ** 30)
    # The host is untouched: outside the compile, auto is the CPU's again.
    assert targets.current().name == "cpu" and compute_dtype("auto") == np.float32


@pytest.fixture(scope="module")
def v5e():
    return targets.open_target("v5e:2x2")


@pytest.mark.parametrize("mesh,kind", [("data=1,fsdp=4", "pretrain"), ("data=1,fsdp=2,tensor=2", "finetune")])
def test_the_train_step_compiles_for_a_tpu_slice(v5e, hlo_dir, mesh, kind):
    config, r, hlo = _analyse(v5e, mesh, "plain", kind, hlo_dir)
    assert r["devices"] == 4 and r["device"] == "TPU v5 lite" and r["dtype"] == "bfloat16" and r["fits"]
    # Splash attention, traced without touching a device: forward, dq and dk/dv per layer.
    assert r["attention"] == "splash" and r["custom_calls"]["tpu_custom_call"] == 3 * N_LAYER
    assert all(b.startswith("bf16") for b in r["vocab_buffers"])
    sizes = r["mesh"]
    shards = _param_shards(config, sizes, kind)
    scattered = Counter(collective_outputs(hlo)["reduce-scatter"])
    # The weights' gradients leave by reduce-scatter (TPU's fused all-reduce-scatter), but one:
    # libtpu sums the attention output projection's ([heads, head_dim, embed], split on its last
    # dimension) whole over fsdp and slices it, as read from this program.
    assert r["collectives"]["reduce-scatter"] >= 1
    if sizes["tensor"] == 1:
        matrices = Counter(shard for name, (_, shard, weight) in shards.items() if weight and "out_kernel" not in name)
        assert matrices and all(scattered[n] >= k for n, k in matrices.items()), (matrices, scattered)


def test_attention_dropout_on_a_tpu_takes_xla(v5e, hlo_dir):
    _, r, _ = _analyse(v5e, "data=4", "dropout", "pretrain", hlo_dir)
    assert r["attention"] == "xla" and "tpu_custom_call" not in r["custom_calls"]


def test_targets_name_what_they_take():
    for bad, words in [("h300", "unknown device 'h300'"), ("h100:x", "device count"), ("h1 00", "not a target"), ("h100:0", "device count"),
                       ("v5e", "names its slice"), ("h100:12", "whole hosts of 8")]:
        with pytest.raises(UserError, match=re.escape(words)):
            targets.open_target(bad)
    assert targets.needed_host_devices("cpu:8") == 8 and targets.needed_host_devices("h100:8") == 0


def test_a_missing_plugin_says_which_extra_installs_it(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith(("jax_plugins.xla_cuda", "libtpu")) else real(name, *a))
    for name in ("h100:8", "v5e:2x2"):
        with pytest.raises(UserError, match=re.escape("pip install 'gptjax[targets]'")):
            targets.open_target(name)


def _cli(args, **env_changes):
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    env.update({k: v for k, v in env_changes.items() if v is not None})
    return subprocess.run([sys.executable, "-m", "gptjax.cli", "compile", "--config", "configs/tiny.py",
                           *[f"--config.{o}" for o in BASE], *args], env=env, capture_output=True, text=True,
                          timeout=600)


def test_the_command_compiles_both_steps_whatever_jax_platforms_says(tmp_path):
    """JAX_PLATFORMS unset: the CUDA and TPU plugins installed beside jax must not be opened."""
    run = _cli(["--target", "h100:8", "--kind", "both", "--json", "--hlo", str(tmp_path),
                "--config.mesh.data=1", "--config.mesh.fsdp=8"])
    assert run.returncode == 0, run.stderr[-3000:]
    records = [json.loads(line) for line in run.stdout.splitlines()]
    assert [r["kind"] for r in records] == ["pretrain", "finetune"]
    for r in records:
        assert {"target", "kind", "devices", "mesh", "fits", "peak_gib", "device_gib", "collectives", "custom_calls",
                "kernels", "compile_s"} <= set(r)
        assert r["target"] == "h100:8" and r["devices"] == 8 and r["fits"] and r["collectives"]["reduce-scatter"]
        assert 0 < r["peak_gib"] < r["usable_gib"] < r["device_gib"]
        assert r["kernels"]["fusion"] > 0 and r["kernels"]["custom-call"] >= 2 * N_LAYER
        assert "reduce-scatter" in (tmp_path / f"{r['kind']}.hlo.txt").read_text()


def test_a_plan_that_does_not_fit_is_refused_with_one_line():
    # An allocator that may take a millionth of the device: no step fits.
    run = _cli(["--target", "h100"], JAX_PLATFORMS="cuda", XLA_PYTHON_CLIENT_MEM_FRACTION="0.000001")
    assert run.returncode == 3, run.stderr[-3000:]
    (line,) = run.stderr.strip().splitlines()
    assert line.startswith("error: the pretrain step of tiny needs ") and "GiB per device on h100" in line
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION=0.000001" in line
    for change in ("train.batch_size (now 16)", "model.remat=full", "model.loss_chunk_len"):
        assert change in line
    assert "DOES NOT FIT" in run.stdout
