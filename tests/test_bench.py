"""The benchmark commands print real figures, and the XLA flag presets are flags XLA knows."""

import math
import os
import re
import subprocess
import sys

import pytest

from gptjax import bench, xla_flags
from gptjax.errors import UserError

TINY = ["--config", "configs/tiny.py", "--config.model.n_layer=2", "--config.train.seq_len=32"]


def table_rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| config") and not line.startswith("| part")]


def test_train_prints_one_row_per_batch_size(capsys):
    assert bench.main(["train", *TINY, "--batches", "2,4", "--steps", "2", "--warmup", "1"]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert [r[1] for r in rows] == ["2", "4"]
    for r in rows:
        tokens_per_sec, step_ms = float(r[3].replace(",", "")), float(r[5])
        assert tokens_per_sec == pytest.approx(int(r[1]) * 32 / step_ms * 1000, rel=0.01)
        # Compilation is timed on its own: it takes far longer than a steady step of this model.
        compile_s, first_step_s, plan_gib = float(r[6]), float(r[7]), float(r[9])
        assert compile_s > 10 * step_ms / 1000 and first_step_s > 0 and plan_gib > 0


def test_parts_add_up_to_the_step(capsys):
    assert bench.main(["parts", *TINY, "--config.train.batch_size=2", "--steps", "2"]) == 0
    rows = {r[0]: r for r in table_rows(capsys.readouterr().out)}
    parts = ("embedding", "block (forward + backward)", "of which attention", "vocabulary projection + loss",
             "optimizer update")
    assert set(rows) == set(parts) | {"other (step - parts)", "whole train step"}
    each = {name: float(rows[name][2]) for name in parts}
    assert all(ms > 0 for ms in each.values())
    # Attention is part of a block, and one block's forward and backward part of the step.
    assert each["of which attention"] < each["block (forward + backward)"] < float(rows["whole train step"][3])
    assert rows["block (forward + backward)"][1] == "2"  # counted once per layer


def test_memory_compiles_without_running(capsys):
    assert bench.main(["memory", *TINY, "--batches", "2", "--config.model.dtype=bfloat16",
                       "--config.model.vocab_size=1000", "--config.model.loss_chunk_len=8"]) == 0
    (row,) = table_rows(capsys.readouterr().out)
    assert row[4] == "8" and float(row[8]) >= float(row[5]) > 0 and float(row[6]) >= 0
    # With chunks of 8 positions, the logits buffers hold 2 x 8 rows, never the batch's 2 x 32.
    shapes = [[int(d) for d in dims.split(", ")] for dims in re.findall(r"\[([0-9, ]+)\]", row[10])]
    assert [2, 8, 1024] in shapes
    # Every one is a chunk's 16 rows (the embedding's [d_model, V] is not listed).
    assert {math.prod(s[:-1]) for s in shapes} == {16}


def test_unknown_flag_preset_is_one_clear_error(capsys):
    assert bench.main(["train", *TINY, "--xla-flags", "fastest"]) == 2
    assert "unknown XLA flag preset 'fastest'" in capsys.readouterr().err


def test_flags_cannot_be_set_once_a_backend_runs():
    import jax
    jax.devices()
    with pytest.raises(UserError, match="before JAX starts a backend"):
        xla_flags.apply("gpu")
    assert xla_flags.apply("none") == []


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
    from gptjax.step_analysis import saved_activations_gib

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
        bench.main(["attention", "--help"])
    assert stop.value.code == 0 and "--seq-lens" in capsys.readouterr().out


def test_the_step_benchmarks_need_no_data_packages():
    """A bare GPU machine has jax, flax and optax but not grain, TFDS or sentencepiece."""
    code = ("import sys\n"
            "for m in ('grain', 'tensorflow_datasets', 'array_record', 'sentencepiece', 'tensorflow'):\n"
            "    sys.modules[m] = None\n"
            "from gptjax import bench\n"
            "sys.exit(bench.main(['memory', '--config', 'configs/tiny.py', '--batches', '2',\n"
            "                     '--config.train.seq_len=32', '--config.model.n_layer=1']))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "| tiny | 2 | 32 |" in run.stdout


def test_a_batch_that_does_not_fit_is_one_row_not_a_crash(monkeypatch, capsys):
    real = bench.bench_train

    def bench_train(config, *args):
        if config.train.batch_size > 2:
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 80.00GiB.")
        return real(config, *args)

    monkeypatch.setattr(bench, "bench_train", bench_train)
    assert bench.main(["train", *TINY, "--batches", "8,2,4", "--steps", "1", "--warmup", "0"]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert [r[1] for r in rows] == ["2", "4"]  # ascending; 8 is not tried once 4 did not fit
    assert rows[1][3].startswith("out of memory: RESOURCE_EXHAUSTED")
