"""Sharded equals unsharded on 8 fake CPU devices; gradient accumulation; mesh errors."""

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from gptjax.config import load_config
from gptjax.data.packing import as_batch
from gptjax.errors import UserError
from gptjax.model_config import ModelConfig
from gptjax.sharding import _hybrid_devices, check_divisible, mesh_shape, spec
from gptjax.train import Trainer

MESHES = ["data=8", "data=1,fsdp=8", "data=2,fsdp=2,tensor=2", "data=2,tensor=4"]


# Dropout on (residual, embedding and attention), through XLA attention and the Pallas kernel.
DROPOUT_RUNS = ["single,dropout", "data=1,fsdp=8,dropout", "single,dropout,pallas", "data=2,fsdp=4,dropout,pallas"]


@pytest.fixture(scope="module")
def runs():
    out, stderr = _worker("single", *MESHES, *DROPOUT_RUNS)
    # XLA's warning that a layout change fell back to replicating a tensor on every device.
    assert "Involuntary full rematerialization" not in stderr
    return out


def _worker(*args) -> tuple[dict, str]:
    """(what tests/sharding_worker.py prints, its stderr), run in a process of its own with 8 CPU devices."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "tests/sharding_worker.py", *args], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_training_matches_one_device(runs, mesh):
    base, run = np.array(runs["single"]["losses"]), np.array(runs[mesh]["losses"])
    assert np.ptp(base) > 1e-3  # the losses move, so agreement is not trivial
    np.testing.assert_allclose(run, base, rtol=1e-5)
    sizes = dict(kv.split("=") for kv in mesh.split(","))
    assert runs[mesh]["mesh"] == {"data": int(sizes.get("data", 1)), "fsdp": int(sizes.get("fsdp", 1)),
                                  "tensor": int(sizes.get("tensor", 1))}


@pytest.mark.parametrize("run", [r for r in DROPOUT_RUNS if not r.startswith("single")])
def test_sharded_dropout_drops_what_one_device_drops(runs, run):
    """Dropout numbers every element by its index in the whole batch (the kernel's shard_map by
    where its block sits), so the sharded step draws the one mask of the unsharded step: the
    losses agree as closely as without dropout."""
    base = np.array(runs["single,dropout" + (",pallas" if run.endswith("pallas") else "")]["losses"])
    assert np.abs(base - np.array(runs["single"]["losses"])).max() > 1e-3  # dropout changes the losses
    np.testing.assert_allclose(runs[run]["losses"], base, rtol=1e-5)


@pytest.mark.parametrize("mesh", MESHES)
def test_parameters_live_where_the_rules_say(runs, mesh):
    specs = runs[mesh]["specs"]
    assert specs["wte"] == ["tensor", "fsdp"]  # vocab over tensor, embed over fsdp
    assert specs["blocks.0.attn.qkv_kernel"] == ["fsdp", None, "tensor", None]
    assert specs["blocks.0.attn.out_kernel"] == ["tensor", None, "fsdp"]
    assert specs["blocks.0.mlp.fc_kernel"] == ["fsdp", "tensor"]
    assert specs["blocks.0.ln_1.scale"] == ["fsdp"]
    m = runs[mesh]["mesh"]
    # The tiny model: padded vocabulary 512, d_model 128, 4 heads of 32.
    assert runs[mesh]["local_shapes"]["wte"] == [512 // m["tensor"], 128 // m["fsdp"]]
    assert runs[mesh]["local_shapes"]["blocks.0.attn.qkv_kernel"] == [128 // m["fsdp"], 3, 4 // m["tensor"], 32]


def test_activations_are_pinned_to_the_rules(runs):
    constraints = runs["data=2,fsdp=2,tensor=2"]["constraints"]
    batch = '{"data", "fsdp"}'
    # Logits split over the vocabulary, attention over heads, the MLP over its width, the
    # residual stream over the batch only.
    # (The tiny model's vocabulary and MLP width are both 512.)
    assert f'[{batch}, {{}}, {{"tensor"}}]> : tensor<16x32x512xf32' in constraints
    assert f'[{batch}, {{}}, {{"tensor"}}, {{}}]> : tensor<16x32x4x32xf32' in constraints
    assert f'[{batch}, {{}}, {{}}]> : tensor<16x32x128xf32' in constraints
    assert runs["single"]["constraints"] and all("tensor<" in c for c in runs["single"]["constraints"])


LAYOUT_MESHES = ["data=1,fsdp=8", "data=2,fsdp=4", "data=1,fsdp=4,tensor=2"]


@pytest.fixture(scope="module")
def layouts():
    return _worker("layouts", *LAYOUT_MESHES)[0]


def _assert_sharded(account: dict, mesh: dict) -> None:
    """Each device holds at most its 1/(fsdp x tensor) of the parameters and of the optimizer
    state, plus the leaves the rules leave whole on some axis (biases, LayerNorm, positions)."""
    split = mesh["fsdp"] * mesh["tensor"]
    assert len(account["params"]) == len(account["opt"]) == 8
    for kind in ("params", "opt"):
        bound = account[f"{kind}_total"] / split + account[f"{kind}_unsplit"]
        assert max(account[kind].values()) <= bound, (kind, account[kind], bound)
    # A moment lives exactly where its parameter does; step counters are replicated.
    for name, leaf in account["opt_specs"].items():
        if leaf["param_spec"] is None:
            assert leaf["spec"] == [], name
        else:
            assert leaf["same_sharding"] and leaf["spec"] == leaf["param_spec"], (name, leaf)


@pytest.mark.parametrize("mesh", LAYOUT_MESHES)
@pytest.mark.parametrize("kind", ["pretrain", "finetune"])
def test_parameters_and_optimizer_state_are_split_across_devices(layouts, mesh, kind):
    run = layouts[mesh]
    _assert_sharded(run[kind], run["mesh"])
    # Adam's two moments mirror every parameter: the count of mirrored leaves says so.
    mirrored = [n for n, leaf in run[kind]["opt_specs"].items() if leaf["param_spec"] is not None]
    assert len(mirrored) == 2 * len([n for n in mirrored if ".mu." in n])


@pytest.mark.parametrize("mesh", ["data=1,fsdp=8", "data=2,fsdp=4"])
def test_the_fsdp_step_gathers_weights_and_updates_shards(layouts, mesh):
    hlo, fsdp = layouts[mesh]["hlo"], layouts[mesh]["mesh"]["fsdp"]
    gathered = [tuple(shape) for op, shapes in hlo["ops"] if op == "all-gather" for shape in shapes]
    # Every weight matrix is gathered whole for use.
    for name, shape in hlo["weights"].items():
        if not name.endswith("bias"):  # the fused QKV bias is not split over fsdp
            assert tuple(shape) in gathered, (name, shape)
    # The optimizer update reads and writes each device's shard only: every moment of a weight
    # split over fsdp enters and leaves the step as 1/fsdp of it.
    for name, (full, taken, returned) in hlo["opt_shards"].items():
        if name.endswith(("bias",)) or not full:
            continue
        assert taken == returned and np.prod(taken) * fsdp == np.prod(full), (name, full, taken)


def test_logical_rules():
    assert tuple(spec(("batch", "length"))) == (("data", "fsdp"), None)
    assert tuple(spec(("vocab", "embed"))) == ("tensor", "fsdp")
    assert tuple(spec(("heads", "mlp"))) == ("tensor", None)  # one mesh axis splits one dimension


def test_gradient_accumulation_matches_the_full_batch():
    losses = {}
    for accum in (1, 4):
        config = load_config("configs/tiny.py", ["model.dtype=float32", "train.batch_size=16", "train.seq_len=32",
                                                 "model.n_layer=1", f"train.grad_accum={accum}"])
        trainer = Trainer.from_config(config)
        rng = np.random.default_rng(0)
        out = []
        for _ in range(5):
            rows = rng.integers(6, 512, size=(16, 33)).astype(np.int32)
            batch = as_batch(rows, 2, 0, True)  # document masks: microbatches hold different token counts
            out.append(float(trainer.step(batch)["loss"]))
        losses[accum] = out
    assert np.ptp(losses[1]) > 1e-3
    np.testing.assert_allclose(losses[4], losses[1], rtol=1e-5)


def test_meshes_that_do_not_fit_are_clear_errors():
    cfg = types.SimpleNamespace
    with pytest.raises(UserError, match="needs 6 devices, but there are 8"):
        mesh_shape({"data": 3, "fsdp": 2, "tensor": 1}, 8)
    with pytest.raises(UserError, match="not a multiple of 3"):
        mesh_shape({"data": -1, "fsdp": 3, "tensor": 1}, 8)
    assert mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == {"data": 2, "fsdp": 2, "tensor": 2}
    config = load_config("configs/tiny.py")
    fake = cfg(shape={"data": 1, "fsdp": 1, "tensor": 8})
    with pytest.raises(UserError, match=r"model.n_head \(4\) is not divisible by mesh.tensor \(8\)"):
        check_divisible(ModelConfig.from_config(config.model), config.train, fake)
    with pytest.raises(UserError, match="must be a multiple of mesh.data x mesh.fsdp"):
        check_divisible(ModelConfig.from_config(config.model), config.train, cfg(shape={"data": 3, "fsdp": 1, "tensor": 1}))


def test_dcn_groups_are_whole_processes():
    # 4 processes of 2 devices (ids 10*p + i); the data axis's outer factor runs across processes.
    devices = [types.SimpleNamespace(id=10 * p + i, process_index=p, platform="gpu", device_kind="fake")
               for p in (3, 1, 0, 2) for i in (1, 0)]
    grid = _hybrid_devices(devices, {"data": 4, "fsdp": 2, "tensor": 1}, groups=2)
    ids = [[d.id for d in row[:, 0]] for row in grid]
    assert ids == [[0, 1], [10, 11], [20, 21], [30, 31]]  # fsdp pairs never leave a process
    with pytest.raises(UserError, match="must split the 6 devices into groups of whole processes"):
        _hybrid_devices(devices[:6], {"data": 6, "fsdp": 1, "tensor": 1}, groups=2)  # 3 + 3 across pairs
    with pytest.raises(UserError, match=r"mesh.dcn_data \(3\) must divide mesh.data \(4\)"):
        _hybrid_devices(devices, {"data": 4, "fsdp": 2, "tensor": 1}, groups=3)


def test_a_checkpoint_restores_onto_another_mesh(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    targets = ["data=2,tensor=4", "single"]
    result = subprocess.run([sys.executable, "tests/sharding_worker.py", "restore", str(tmp_path), "data=1,fsdp=8",
                             *targets], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    for target in targets:
        account, mesh = out[target].pop("account"), out[target].pop("mesh")
        assert out[target] == {"params_equal": True, "opt_equal": True, "init_differs": True,
                               "layout_matches": True, "devices": 8 if target != "single" else 1}, target
        if target != "single":  # saved split over fsdp=8, restored split over tensor=4
            assert mesh == {"data": 2, "fsdp": 1, "tensor": 4}
            _assert_sharded(account, mesh)
