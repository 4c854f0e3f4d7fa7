"""The benchmark commands print real figures, and the XLA flag presets are flags XLA knows."""

import json
import math
import os
import re
import subprocess
import sys

import jax
import pytest

from gptjax import xla_flags
from gptjax.bench import cli, train_step
from gptjax.errors import UserError

TINY = ["--config", "configs/tiny.py", "--config.model.n_layer=2", "--config.train.seq_len=32"]


def table_rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| config") and not line.startswith("| part")]


def _recorded(monkeypatch, module, name) -> list:
    """What each call of module.name returns, as it returned it: the table prints them rounded."""
    real, results = getattr(module, name), []

    def record(*args, **kwargs):
        results.append(real(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(module, name, record)
    return results


def test_train_prints_one_row_per_batch_size(monkeypatch, capsys):
    from gptjax.train import Trainer

    results = _recorded(monkeypatch, train_step, "bench_train")
    steps_run = []
    real_step = Trainer.step

    def step(self, batch):
        steps_run.append(self._step)
        return real_step(self, batch)

    monkeypatch.setattr(Trainer, "step", step)
    assert cli.main(["train", *TINY, "--batches", "2,4", "--steps", "2", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    assert [r[1] for r in table_rows(out)] == ["2", "4"]
    for r in results:
        assert train_step.format_row(r) in out.splitlines()
        # Both figures come from the same timing; only float rounding separates them.
        assert r["tokens_per_sec"] * r["step_ms"] / 1000 == pytest.approx(r["batch"] * 32, rel=1e-9)
        assert r["compile_s"] > 0 and r["first_step_s"] > 0 and r["plan_gib"] > 0
    # Compilation is timed on its own: every step (first, warmup, timed; two batch sizes) runs the
    # executable compiled ahead of time, which cannot compile again while it is timed.
    assert len(steps_run) == 2 * (1 + 1 + 2)
    assert all(isinstance(s, jax.stages.Compiled) for s in steps_run)


def test_parts_add_up_to_the_step(monkeypatch, capsys):
    from gptjax.bench import step_parts

    measured = _recorded(monkeypatch, step_parts, "time_parts")
    assert cli.main(["parts", *TINY, "--config.train.batch_size=2", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    (parts,) = measured
    assert step_parts.format_parts(parts) in out
    ms = {name.strip(): each for name, _, each in parts}
    count = {name.strip(): n for name, n, _ in parts}
    assert list(ms) == ["embedding", "block (forward + backward)", "of which attention",
                        "vocabulary projection + loss", "optimizer update", "whole train step"]
    assert all(each > 0 for each in ms.values())
    assert count["block (forward + backward)"] == count["of which attention"] == 2  # once per layer
    # "other" is the step less its parts, attention counted once: inside the blocks.
    counted = sum(count[n] * ms[n] for n in ms if n not in ("of which attention", "whole train step"))
    rows = {r[0]: r for r in table_rows(out)}
    assert rows["other (step - parts)"][3] == f"{ms['whole train step'] - counted:.1f}"


def test_memory_compiles_without_running(monkeypatch, capsys):
    from gptjax import compiled

    plans = _recorded(monkeypatch, compiled, "memory_plan")
    saved = _recorded(monkeypatch, compiled, "saved_activations_gib")
    assert cli.main(["memory", *TINY, "--batches", "2", "--config.model.dtype=bfloat16", "--kinds", "pretrain",
                       "--config.model.vocab_size=1000", "--config.model.loss_chunk_len=8"]) == 0
    (row,), (plan,), (saved_gib,) = table_rows(capsys.readouterr().out), plans, saved
    assert row[1:4] == ["cpu:1", "1x1x1", "pretrain"] and row[7] == "8" and row[14] == "yes"
    assert plan["peak"] >= plan["arguments"] > 0 and saved_gib >= 0
    assert row[10] == f"{plan['arguments']:.2f}" and row[13] == f"{plan['peak']:.2f}"
    # With chunks of 8 positions, the logits buffers hold 2 x 8 rows, never the batch's 2 x 32.
    shapes = [[int(d) for d in dims.split(", ")] for dims in re.findall(r"\[([0-9, ]+)\]", row[16])]
    assert [2, 8, 1024] in shapes
    # Every one is a chunk's 16 rows (the embedding's [d_model, V] is not listed).
    assert {math.prod(s[:-1]) for s in shapes} == {16}


def test_unknown_flag_preset_is_one_clear_error(capsys):
    assert cli.main(["train", *TINY, "--xla-flags", "fastest"]) == 2
    assert "unknown XLA flag preset 'fastest'" in capsys.readouterr().err


def test_flags_cannot_be_set_once_a_backend_runs():
    import jax
    jax.devices()
    with pytest.raises(UserError, match="before JAX starts a backend"):
        xla_flags.apply("gpu")
    assert xla_flags.apply("none") == []


def test_presets_add_to_the_xla_flags_already_set(monkeypatch):
    monkeypatch.setattr(xla_flags, "backends_started", lambda: False)  # (this process started one long ago)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    monkeypatch.setenv(xla_flags.ENV, "gpu, deterministic")
    added = xla_flags.apply()
    assert added == [*xla_flags.PRESETS["gpu"], "--xla_gpu_deterministic_ops=true"]
    assert os.environ["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=2", *added]
    xla_flags.apply()  # a launcher and the command it starts may both apply them: no flag twice
    assert os.environ["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=2", *added]


def test_every_preset_flag_is_known_to_the_installed_xla():
    flags = sorted({f for preset in xla_flags.PRESETS.values() for f in preset})
    check = "import jax; jax.devices()"
    env = dict(os.environ, XLA_FLAGS=" ".join(flags))
    run = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    # And the check can fail: XLA stops the process on a flag it does not know.
    env["XLA_FLAGS"] = "--xla_gpu_no_such_flag=true"
    run = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "Unknown flag" in run.stderr


def test_cli_reads_flag_presets_from_the_environment(tmp_path):
    env = dict(os.environ, GPTJAX_XLA_FLAGS="fastest")
    run = subprocess.run([sys.executable, "-m", "gptjax.cli", "generate", "--workdir", str(tmp_path), "--prompt", "a"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "unknown XLA flag preset 'fastest'" in run.stderr


def test_saved_activations_follow_the_remat_policy():
    from gptjax.config import load_config
    from gptjax.compiled import saved_activations_gib

    def saved(remat):
        config = load_config("configs/tiny.py", ["model.n_layer=2", "train.seq_len=32", "train.batch_size=2",
                                                 f"model.remat={remat}"])
        return saved_activations_gib(config) * 2**30

    none, dots, full = saved("none"), saved("save_dots"), saved("full")
    assert none > dots > full
    # Full remat keeps each block's float32 input [2, 32, 128] and recomputes the rest; what else
    # stays is the final LayerNorm's and the loss's.
    block_inputs = 2 * 2 * 32 * 128 * 4
    assert block_inputs <= full < none / 4


def test_attention_benchmark_is_a_bench_command(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["attention", "--help"])
    assert stop.value.code == 0 and "--seq-lens" in capsys.readouterr().out


def test_the_step_benchmarks_need_no_data_packages():
    """A bare GPU machine has jax, flax and optax but not grain, TFDS or sentencepiece."""
    code = ("import sys\n"
            "for m in ('grain', 'tensorflow_datasets', 'array_record', 'sentencepiece', 'tensorflow'):\n"
            "    sys.modules[m] = None\n"
            "from gptjax.bench import cli\n"
            "sys.exit(cli.main(['memory', '--config', 'configs/tiny.py', '--batches', '2', '--kinds', 'pretrain',\n"
            "                     '--config.train.seq_len=32', '--config.model.n_layer=1']))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "| tiny | cpu:1 | 1x1x1 | pretrain | 2 | 32 |" in run.stdout


def test_memory_accounts_per_device_on_a_mesh_of_fake_devices():
    """A fresh process asks XLA for the mesh's 8 devices itself; each holds 1/8 of the state."""
    code = ("import json, sys\n"
            "import jax\n"
            "from gptjax import compiled\nfrom gptjax.bench import cli\n"
            "seen, real_compile = [], compiled.compile_train_step\n"
            "def compile_train_step(config, devices, kind, platform):\n"
            "    step, seconds, state = real_compile(config, devices, kind, platform)\n"
            "    total = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))\n"
            "    seen.append({'kind': kind, 'devices': len(devices), 'held': compiled.state_gib_per_device(state),\n"
            "                 'params': total(state.params) / 2**30, 'opt': total(state.opt_state) / 2**30,\n"
            "                 'arguments': compiled.memory_plan(step)['arguments']})\n"
            "    return step, seconds, state\n"
            "compiled.compile_train_step = compile_train_step\n"
            "code = cli.main(['memory', '--config', 'configs/tiny.py', '--batches', '16', '--config.mesh.fsdp=8',\n"
            "                   '--config.train.seq_len=32', '--config.model.n_layer=2'])\n"
            "print(json.dumps(seen))\n"
            "sys.exit(code)\n")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "| tiny | cpu:8 | 1x8x1 | pretrain | 16 | 32 |" in run.stdout
    assert "| tiny | cpu:8 | 1x8x1 | finetune | 16 | 128 |" in run.stdout
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert [s["kind"] for s in seen] == ["pretrain", "finetune"] and {s["devices"] for s in seen} == {8}
    for s in seen:
        # An eighth of each, give or take the vectors fsdp does not split (the fused QKV bias).
        assert s["params"] / 8 <= s["held"]["params"] < s["params"] / 8 * 1.1, s
        assert s["opt"] / 8 <= s["held"]["opt_state"] < s["opt"] / 8 * 1.1, s
        # The compiled step takes the shards as its arguments, not whole copies.
        assert s["held"]["params"] + s["held"]["opt_state"] <= s["arguments"] < (s["params"] + s["opt"]) / 2, s


def test_a_batch_that_does_not_fit_is_one_row_not_a_crash(monkeypatch, capsys):
    real = train_step.bench_train

    def bench_train(config, *args):
        if config.train.batch_size > 2:
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 80.00GiB.")
        return real(config, *args)

    monkeypatch.setattr(train_step, "bench_train", bench_train)
    assert cli.main(["train", *TINY, "--batches", "8,2,4", "--steps", "1", "--warmup", "0"]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert [r[1] for r in rows] == ["2", "4"]  # ascending; 8 is not tried once 4 did not fit
    assert rows[1][3].startswith("out of memory: RESOURCE_EXHAUSTED")
