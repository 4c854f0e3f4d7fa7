"""The launch scripts, run against stub srun / scontrol / gcloud that record what they were given."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parent.parent / "launch"
SCRIPTS = sorted(p for p in LAUNCH.iterdir() if p.suffix in (".sh", ".sbatch"))
# Arguments a careless launcher would split, glob or expand.
TRICKY = ["--workdir", "/shared/runs/with space", "--config.data.source=text:corpus/*.txt",
          "it's", "$HOME", "a\"b", "semi;colon", "tab\there", ""]


def _stub(path: Path, body: str) -> None:
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


def _args(path: Path) -> list[str]:
    """Reads an argv that a stub wrote NUL-separated."""
    return path.read_bytes().decode().split("\0")[:-1]


def test_scripts_parse():
    assert {p.name for p in SCRIPTS} >= {"local.sh", "slurm.sbatch", "tpu_vm.sh"}
    for script in SCRIPTS:
        subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_scripts_shellcheck_clean():
    result = subprocess.run(["shellcheck", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.fixture
def slurm(tmp_path):
    """Runs launch/slurm.sbatch inside a fake job; srun runs the command (a stub that exits with $RC)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # srun: records its argv, drops its own options, runs the rest like srun runs a task.
    _stub(bin_dir / "srun", f"""printf '%s\\0' "$@" > {tmp_path}/srun.args
[ -n "${{SIGNAL_BATCH_SHELL:-}}" ] && kill -TERM "$PPID" && sleep 0.2
while [ "${{1#--}}" != "$1" ]; do shift; done
"$@"
""")
    _stub(bin_dir / "scontrol", f"""printf '%s\\0' "$@" > {tmp_path}/scontrol.args\n""")
    _stub(bin_dir / "train", f"""printf '%s\\0' "$@" > {tmp_path}/train.args\nexit "$RC"\n""")

    def run(*command, rc=0, **env):
        full_env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RC": str(rc),
                    "SLURM_JOB_ID": "4242", "SLURM_GPUS_ON_NODE": "8", "SLURM_NTASKS_PER_NODE": "8", **env}
        return subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), *command], env=full_env,
                              capture_output=True, text=True, timeout=60)

    return run, tmp_path


def test_slurm_header_requests_requeue_and_early_sigterm():
    directives = re.findall(r"^#SBATCH\s+(\S+)", (LAUNCH / "slurm.sbatch").read_text(), re.M)
    assert "--requeue" in directives
    # SIGTERM to the job steps (the training processes), at least a minute before the limit.
    signal = [d for d in directives if d.startswith("--signal=")]
    assert len(signal) == 1 and re.fullmatch(r"--signal=TERM@(\d+)", signal[0])
    assert int(signal[0].split("@")[1]) >= 60
    tasks = [d for d in directives if d.startswith("--ntasks-per-node=")]
    gpus = [d for d in directives if d.startswith("--gpus-per-node=")]
    assert tasks[0].split("=")[1] == gpus[0].split("=")[1]  # one process per GPU


def test_slurm_success_passes_the_command_through(slurm):
    run, tmp = slurm
    result = run("train", *TRICKY, rc=0)
    assert result.returncode == 0, result.stderr
    assert _args(tmp / "train.args") == TRICKY
    srun_args = _args(tmp / "srun.args")
    assert "--label" in srun_args and "--gpu-bind=none" in srun_args
    assert srun_args[srun_args.index("train"):] == ["train", *TRICKY]
    assert not (tmp / "scontrol.args").exists()


def test_slurm_exit_75_requeues(slurm):
    run, tmp = slurm
    result = run("train", "--workdir", "/shared/runs/x", rc=75)
    assert result.returncode == 0, result.stderr
    assert _args(tmp / "scontrol.args") == ["requeue", "4242"]


def test_slurm_failure_fails_without_requeue(slurm):
    run, tmp = slurm
    for rc in (1, 2, 137):
        result = run("train", rc=rc)
        assert result.returncode == rc
        assert not (tmp / "scontrol.args").exists()


def test_slurm_storage_failure_is_not_requeued_and_says_why(slurm):
    run, tmp = slurm
    result = run("train", rc=74)
    assert result.returncode == 74 and "not requeued" in result.stderr and "free space" in result.stderr
    assert not (tmp / "scontrol.args").exists()


def test_slurm_batch_shell_survives_sigterm(slurm):
    # A whole-job SIGTERM reaches the batch shell too; it must outlive it to requeue the job.
    run, tmp = slurm
    result = run("train", rc=75, SIGNAL_BATCH_SHELL="1")
    assert result.returncode == 0, result.stderr
    assert "got SIGTERM" in result.stderr
    assert _args(tmp / "scontrol.args") == ["requeue", "4242"]


def test_slurm_usage_and_misconfiguration(slurm):
    run, tmp = slurm
    result = run()
    assert result.returncode == 2 and "usage:" in result.stderr
    result = run("train", SLURM_JOB_ID="")
    assert result.returncode == 2 and "sbatch" in result.stderr
    result = run("train", SLURM_GPUS_ON_NODE="4")  # 8 tasks on 4 GPUs
    assert result.returncode == 2 and "--ntasks-per-node (8)" in result.stderr
    assert not (tmp / "srun.args").exists()


@pytest.fixture
def tpu(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir / "gcloud", f"""printf '%s\\0' "$@" > {tmp_path}/gcloud.args\nexit "${{RC:-0}}"\n""")

    def run(*args, **env):
        full_env = {k: v for k, v in os.environ.items() if k not in ("PROJECT", "GPTJAX_REMOTE_DIR")}
        full_env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", **env)
        return subprocess.run(["bash", str(LAUNCH / "tpu_vm.sh"), *args], env=full_env,
                              capture_output=True, text=True, timeout=60)

    return run, tmp_path


def _option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_tpu_vm_runs_the_command_on_every_worker(tpu):
    run, tmp = tpu
    repo = tmp / "repo dir"  # stands for the repository on the worker
    repo.mkdir()
    result = run("my-tpu", "us-central2-b", "gptjax", "pretrain", *TRICKY, GPTJAX_REMOTE_DIR=str(repo))
    assert result.returncode == 0, result.stderr
    args = _args(tmp / "gcloud.args")
    assert args[:5] == ["compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
    assert "--worker=all" in args
    assert _option(args, "--zone") == "us-central2-b"
    assert "--project" not in args
    # What a worker's shell makes of the string: cd into the repository, then exactly the argv given.
    remote = _option(args, "--command")
    _stub(tmp / "bin" / "gptjax", f"""pwd > {tmp}/remote.pwd\nprintf '%s\\0' "$@" > {tmp}/remote.args\n"""
          f"""echo "$GPTJAX_DISTRIBUTED" > {tmp}/remote.env\n""")
    env = {**os.environ, "PATH": f"{tmp / 'bin'}:{os.environ['PATH']}", "HOME": "/nowhere"}
    subprocess.run(["sh", "-c", remote], env=env, check=True, cwd=tmp)
    assert (tmp / "remote.pwd").read_text().strip() == str(repo)
    assert _args(tmp / "remote.args") == ["pretrain", *TRICKY]
    assert (tmp / "remote.env").read_text().strip() == "auto"  # gptjax joins the slice's jax.distributed job


def test_tpu_vm_project_remote_dir_and_exit_code(tpu):
    run, tmp = tpu
    result = run("t", "europe-west4-a", "true", PROJECT="my-proj", GPTJAX_REMOTE_DIR="/opt/it's here", RC="75")
    assert result.returncode == 75  # gcloud's exit status comes back unchanged
    args = _args(tmp / "gcloud.args")
    assert _option(args, "--project") == "my-proj"
    assert _option(args, "--command") == "cd '/opt/it'\\''s here' && GPTJAX_DISTRIBUTED=auto 'true'"
    # Without GPTJAX_REMOTE_DIR the workers use this repository's path.
    run("t", "z", "true")
    repo = os.path.realpath(LAUNCH.parent)
    assert _option(_args(tmp / "gcloud.args"), "--command") == f"cd '{repo}' && GPTJAX_DISTRIBUTED=auto 'true'"


def test_tpu_vm_usage(tpu):
    run, tmp = tpu
    for args in ((), ("name",), ("name", "zone")):
        result = run(*args)
        assert result.returncode == 2 and "usage:" in result.stderr
    assert not (tmp / "gcloud.args").exists()
