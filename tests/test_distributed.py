"""Two real processes through jax.distributed on CPU match one process with the same global batch."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from free_port import free_port

from gptjax import distributed
from gptjax.errors import UserError

ARGS = ["--config", "configs/tiny.py", "--no-progress", "--config.train.steps=6", "--config.train.log_every=1",
        "--config.data.num_documents=300", "--config.model.n_layer=1", "--config.train.batch_size=8",
        "--config.train.eval_every=3"]


def _losses(workdir):
    return [r.get("loss", r.get("eval_loss")) for r in map(json.loads, open(workdir / "metrics.jsonl"))]


def test_two_processes_match_one(tmp_path):
    cli = [sys.executable, "-m", "gptjax.cli", "pretrain"]
    # Two devices per process: fsdp runs inside each process, the data axis across the two (DCN).
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               GPTJAX_PORT=free_port())
    mesh = ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.dcn_data=2"]
    two = subprocess.run(["launch/local.sh", "2", *cli, "--workdir", str(tmp_path / "two"), *ARGS, *mesh],
                         capture_output=True, text=True, timeout=600, env=env)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    # Every line names its process, and both processes finished the same run.
    done = sorted(line for line in two.stdout.splitlines() if " done: " in line)
    assert [line[:6] for line in done] == ["[0/2] ", "[1/2] "]
    assert all(line.startswith(("[0/2] ", "[1/2] ")) for line in two.stdout.splitlines())
    one = subprocess.run([*cli, "--workdir", str(tmp_path / "one"), *ARGS], capture_output=True, text=True,
                         timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = _losses(tmp_path / "two"), _losses(tmp_path / "one")
    assert len(a) == len(b) == 8  # 6 steps and 2 evaluations, written once (by process 0)
    np.testing.assert_allclose(a, b, rtol=1e-5)


def test_partial_multiprocess_settings_are_an_error(monkeypatch):
    for name in ("GPTJAX_COORDINATOR", "GPTJAX_NUM_PROCESSES", "GPTJAX_PROCESS_ID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(UserError, match="--coordinator, --num-processes and --process-id together"):
        distributed.initialize("localhost:1234", None, None)
    distributed.initialize()  # nothing described: a lone process, nothing to do
