"""Resume equals uninterrupted: SIGTERM, kill -9 mid-save, damaged checkpoints, changed configs."""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from gptjax import checkpoint, cli
from gptjax.config import load_config
from gptjax.errors import REQUEUE_EXIT_CODE, UserError
from gptjax.model import init_decoder
from gptjax.model_config import ModelConfig
from gptjax.resume import config_changes, settings_of
from gptjax.train import Trainer

STEPS = 12
# Dropout on: the resumed run must also replay the dropout masks of the steps it redoes.
ARGS = ["--config", "configs/tiny.py", "--no-progress", f"--config.train.steps={STEPS}", "--config.train.log_every=1",
        "--config.data.num_documents=300", "--config.model.n_layer=1", "--config.train.batch_size=8",
        "--config.train.checkpoint_every=4", "--config.train.eval_every=0", "--config.model.dropout=0.1",
        "--config.model.attn_dropout=0.1"]


def _losses(workdir) -> dict:
    return {r["step"]: r["loss"] for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))
            if "loss" in r}


def _params(workdir, step=None) -> dict:
    config = load_config("configs/tiny.py", ["model.n_layer=1"])
    _, like = nnx.split(nnx.eval_shape(lambda: init_decoder(ModelConfig.from_config(config.model), 0)), nnx.Param)
    params, _ = checkpoint.load_params(str(workdir), like, step)
    return {k: np.asarray(v) for k, v in checkpoint.flatten(params).items()}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("baseline")
    assert cli.main(["pretrain", "--workdir", str(workdir), *ARGS]) == 0
    return workdir


def test_sigterm_saves_and_the_same_command_resumes_bitwise(baseline, tmp_path, monkeypatch, capsys):
    original, calls = Trainer.step, []

    def step_then_terminate(self, batch):
        metrics = original(self, batch)
        calls.append(1)
        if len(calls) == 6:  # SIGTERM arrives while step 6 runs
            os.kill(os.getpid(), signal.SIGTERM)
        return metrics

    monkeypatch.setattr(Trainer, "step", step_then_terminate)
    assert cli.main(["pretrain", "--workdir", str(tmp_path), *ARGS]) == REQUEUE_EXIT_CODE
    assert "stopped by a termination signal after step 6" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4", "6"]
    monkeypatch.setattr(Trainer, "step", original)
    assert cli.main(["pretrain", "--workdir", str(tmp_path), *ARGS]) == 0
    assert f"resumed from {tmp_path}/checkpoints/6" in capsys.readouterr().out
    base, resumed = _losses(baseline), _losses(tmp_path)
    assert sorted(resumed) == list(range(1, STEPS + 1))  # steps 1-6 kept, 7-12 from the resumed run
    assert all(resumed[s] == base[s] for s in range(1, STEPS + 1))  # bitwise, not approximately
    assert len(set(base.values())) > 5  # the losses move, so agreement is not trivial
    a, b = _params(baseline), _params(tmp_path)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    # The checkpoint holds what resuming needs: data position, seed, config and the tokenizer.
    meta = checkpoint.Checkpointer(str(tmp_path), read_only=True)
    try:
        saved = meta.read_meta(6)
        assert saved["loader"] == {"step": 6} and saved["seed"] == 0 and saved["config"]["model"]["n_layer"] == 1
        assert meta.tokenizer_bytes(6) == (tmp_path / "tokenizer.model").read_bytes()
    finally:
        meta.close()


KILL_DURING_SAVE = """
import os, signal, sys
from gptjax import checkpoint, cli
save = checkpoint.Checkpointer.save
def save_then_die(self, step, *args):
    path = save(self, step, *args)  # returns while the files are still being written
    if step == 8:
        os.kill(os.getpid(), signal.SIGKILL)
    return path
checkpoint.Checkpointer.save = save_then_die
sys.exit(cli.main(sys.argv[1:]))
"""


def test_kill_9_during_an_async_save_resumes_from_a_complete_checkpoint(baseline, tmp_path):
    killed = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, "pretrain", "--workdir", str(tmp_path), *ARGS],
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    names = os.listdir(tmp_path / "checkpoints")
    complete = checkpoint.latest_step(str(tmp_path))
    assert complete in (4, 8)
    if complete == 4:  # the save of step 8 was cut short: it left only a temporary directory
        assert "8" not in names and any(n.startswith("8.") for n in names)
    assert cli.main(["pretrain", "--workdir", str(tmp_path), *ARGS]) == 0
    base, resumed = _losses(baseline), _losses(tmp_path)
    assert all(resumed[s] == base[s] for s in range(complete + 1, STEPS + 1))
    a, b = _params(baseline), _params(tmp_path)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def _damage(workdir, step):
    """Truncates the largest file of a checkpoint's parameters."""
    files = [os.path.join(d, f) for d, _, fs in os.walk(workdir / "checkpoints" / str(step) / "params") for f in fs]
    biggest = max(files, key=os.path.getsize)
    os.truncate(biggest, os.path.getsize(biggest) // 2)


def test_a_damaged_newest_checkpoint(baseline, tmp_path, capsys):
    workdir = tmp_path / "run"
    subprocess.run(["cp", "-r", str(baseline), str(workdir)], check=True)
    _damage(workdir, 12)
    longer = [*ARGS, "--config.train.steps=16"]
    # An explicit step that cannot be read is an error naming it; nothing is touched.
    assert cli.main(["pretrain", "--workdir", str(workdir), *longer, "--config.train.resume=12"]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {workdir}/checkpoints/12 cannot be read" in err and "train.resume=latest" in err
    assert "12" in os.listdir(workdir / "checkpoints")
    # latest: says so, keeps the damaged one aside, continues from step 8 exactly.
    assert cli.main(["pretrain", "--workdir", str(workdir), *longer]) == 0
    out = capsys.readouterr().out
    assert f"warning: checkpoint {workdir}/checkpoints/12 cannot be read" in out
    assert "falling back to the previous complete checkpoint" in out
    assert f"resumed from {workdir}/checkpoints/8" in out
    names = os.listdir(workdir / "checkpoints")
    assert any(n.startswith("12.set-aside-") for n in names) and {"12", "16"} <= set(names)
    assert f"kept the unreadable checkpoint 12 as {workdir}/checkpoints/12.set-aside-" in out
    # The old metrics (steps 9-12 of the first run) are kept beside the new file.
    assert os.path.exists(workdir / "metrics.jsonl.1")
    # The same as resuming from step 8 on purpose (train.steps=16 changes the schedule, so the
    # 12-step baseline is no reference here).
    again = tmp_path / "again"
    subprocess.run(["cp", "-r", str(baseline), str(again)], check=True)
    assert cli.main(["pretrain", "--workdir", str(again), *longer, "--config.train.resume=8"]) == 0
    assert "kept the newer checkpoint 12 as" in capsys.readouterr().out
    assert _losses(again) == _losses(workdir) and len(_losses(workdir)) == 16


def test_only_damaged_checkpoints_is_a_clear_error(baseline, tmp_path, capsys):
    workdir = tmp_path / "run"
    subprocess.run(["cp", "-r", str(baseline), str(workdir)], check=True)
    for step in (4, 8, 12):
        _damage(workdir, step)
    assert cli.main(["pretrain", "--workdir", str(workdir), *ARGS, "--config.train.steps=16"]) == 2
    assert "no checkpoint in" in capsys.readouterr().err
    assert sorted(os.listdir(workdir / "checkpoints")) == ["12", "4", "8"]  # nothing renamed or deleted


def test_resume_policy_and_config_changes(baseline, tmp_path, capsys):
    workdir = tmp_path / "run"
    subprocess.run(["cp", "-r", str(baseline), str(workdir)], check=True)
    # The same command again on a finished run does nothing and says so.
    assert cli.main(["pretrain", "--workdir", str(workdir), *ARGS]) == 0
    assert f"already holds step {STEPS} of train.steps={STEPS}" in capsys.readouterr().out
    assert cli.main(["pretrain", "--workdir", str(workdir), *ARGS, "--config.train.resume=none"]) == 2
    assert "train.resume=none" in capsys.readouterr().err
    assert cli.main(["pretrain", "--workdir", str(workdir), *ARGS, "--config.train.resume=5"]) == 2
    assert "no complete checkpoint for step 5 (complete: [4, 8, 12])" in capsys.readouterr().err
    assert cli.main(["pretrain", "--workdir", str(workdir), *ARGS, "--config.train.steps=16",
                     "--config.model.d_ff=256"]) == 2
    assert "model.d_ff is 256 but the checkpoint at step 12 was trained with 512" in capsys.readouterr().err
    # The whole architecture is fixed, not only the shapes: the epsilon the weights were trained with.
    assert cli.main(["pretrain", "--workdir", str(workdir), *ARGS, "--config.train.steps=16",
                     "--config.model.ln_eps=0.1"]) == 2
    assert ("model.ln_eps is 0.1 but the checkpoint at step 12 was trained with 1e-05; the architecture is fixed "
            "by the weights") in capsys.readouterr().err
    # A setting that can change is applied, with a line that says so.
    assert cli.main(["pretrain", "--workdir", str(workdir), *ARGS, "--config.train.steps=14",
                     "--config.train.lr=0.001"]) == 0
    assert "resuming with changed settings: train.lr 0.003 -> 0.001, train.steps 12 -> 14" in capsys.readouterr().out
    config = load_config("configs/tiny.py")
    saved = json.loads(open(baseline / "config.json").read())
    assert set(config_changes(saved, settings_of(config))) >= {"train.steps", "model.n_layer", "model.dropout"}


def test_keep_and_keep_every(tmp_path):
    args = [a for a in ARGS if "checkpoint_every" not in a]
    assert cli.main(["pretrain", "--workdir", str(tmp_path), *args, "--config.train.checkpoint_every=2",
                     "--config.train.keep=2", "--config.train.keep_every=5", "--config.model.dropout=0.0"]) == 0
    # Newest two, plus every multiple of 5 that was saved (step 10; 5 is not a save step).
    assert sorted(int(n) for n in os.listdir(tmp_path / "checkpoints")) == [10, 12]
    assert cli.main(["pretrain", "--workdir", str(tmp_path / "b"), *args, "--config.train.checkpoint_every=2",
                     "--config.train.keep=1", "--config.train.keep_every=4"]) == 0
    assert sorted(int(n) for n in os.listdir(tmp_path / "b" / "checkpoints")) == [4, 8, 12]


def test_from_pretrained_reads_a_checkpoint_path_params_only(baseline):
    from gptjax import GPT
    model = GPT.from_pretrained(str(baseline / "checkpoints" / "8"))
    flat = {k: np.asarray(v) for k, v in checkpoint.flatten(nnx.state(model.module, nnx.Param)).items()}
    expected = _params(baseline, 8)
    assert all(np.array_equal(flat[k], expected[k]) for k in expected)
    assert not all(np.array_equal(flat[k], _params(baseline)[k]) for k in expected)  # not the newest
    assert model.config.model.n_layer == 1 and model.tokenizer is not None  # both from the checkpoint
    assert model.tokenizer.decode(model.tokenizer.encode("the cat")) == "the cat"


def _trainer(*overrides):
    return Trainer.from_config(load_config("configs/tiny.py", ["model.n_layer=1", "train.batch_size=4", *overrides]))


def test_optimizer_state_is_saved_and_restored_by_name(tmp_path):
    trainer = _trainer()
    # Distinct values in every leaf, so that a swap (mu for nu) could not pass unnoticed.
    leaves, treedef = jax.tree.flatten(trainer.state.opt_state)
    opt_state = jax.tree.unflatten(treedef, [x + i for i, x in enumerate(leaves)])
    saver = checkpoint.Checkpointer(str(tmp_path))
    saver.save(1, trainer.state.params, opt_state, {"step": 1}, None)
    saver.close()
    names = checkpoint.opt_state_names(opt_state)
    assert "1.0.mu.blocks.0.attn.qkv_kernel" in names and "1.0.nu.wte" in names
    reader = checkpoint.Checkpointer(str(tmp_path), read_only=True)
    # On disk under those names, read back with Orbax's own metadata reader.
    assert set(reader._opt_state_metadata(1)) == set(names)
    _, restored, _ = reader.restore(1, trainer.state.params, trainer.state.opt_state)
    reader.close()
    for name, value in checkpoint.opt_state_names(restored).items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(names[name]), err_msg=name)


def test_another_optimizer_structure_is_refused_with_the_path(tmp_path):
    trainer = _trainer()
    opt = trainer.state.opt_state
    saver = checkpoint.Checkpointer(str(tmp_path))
    saver.save(1, trainer.state.params, opt, {"step": 1}, None)
    # A reshaped leaf: the same number of leaves, the same names.
    reshaped = jax.tree_util.tree_map_with_path(
        lambda path, x: x.reshape(-1) if checkpoint._name(path) == "1.0.nu.blocks.0.mlp.fc_kernel" else x, opt)
    saver.save(2, trainer.state.params, reshaped, {"step": 2}, None)
    saver.close()
    reader = checkpoint.Checkpointer(str(tmp_path), read_only=True)
    with pytest.raises(UserError, match=r"optimizer state '1\.0\.nu\.blocks\.0\.mlp\.fc_kernel' as float32\[65536\], "
                                        r"this optimizer has float32\[128, 512\]"):
        reader.restore(2, trainer.state.params, opt)
    # Another optimizer setting (no clipping): the chain's positions, so the names, differ.
    other = _trainer("train.grad_clip=0")
    with pytest.raises(UserError, match=r"has no optimizer state '0\.0\.count'.*train\.grad_clip"):
        reader.restore(1, other.state.params, other.state.opt_state)
    reader.close()


def test_checkpoints_written_before_names_still_resume(tmp_path):
    import orbax.checkpoint as ocp
    trainer = _trainer()
    leaves = jax.tree.leaves(trainer.state.opt_state)
    old = {f"{i:05d}": x + i for i, x in enumerate(leaves)}  # the earlier layout: leaves by position
    with ocp.CheckpointManager(str(tmp_path / "checkpoints"), options=ocp.CheckpointManagerOptions(create=True)) as m:
        m.save(1, args=ocp.args.Composite(params=ocp.args.StandardSave(checkpoint.flatten(trainer.state.params)),
                                          opt_state=ocp.args.StandardSave(old), meta=ocp.args.JsonSave({"step": 1})))
        m.wait_until_finished()
    reader = checkpoint.Checkpointer(str(tmp_path), read_only=True)
    _, restored, _ = reader.restore(1, trainer.state.params, trainer.state.opt_state)
    for i, x in enumerate(jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(old[f"{i:05d}"]))
    other = Trainer.from_config(load_config("configs/tiny.py", ["model.n_layer=2", "train.batch_size=4"]))  # more leaves
    with pytest.raises(UserError, match=r"optimizer state '\d{5} \(1\.0\.mu\.blocks\.\d"):
        reader.restore(1, other.state.params, other.state.opt_state)
    reader.close()
