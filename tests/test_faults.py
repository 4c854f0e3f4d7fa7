"""Runs that meet trouble around them: two jobs on one workdir, Ctrl-C, a full disk, a process of
the job killed, damaged files. Each ends with one line, a known exit code, and nothing lost."""

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from free_port import free_port

from gptjax import checkpoint, cli
from gptjax.errors import PEER_FAILED_EXIT_CODE, WRITE_FAILED_EXIT_CODE

ARGS = ["--config", "configs/tiny.py", "--no-progress", "--config.data.num_documents=200", "--config.model.n_layer=1",
        "--config.train.batch_size=8", "--config.train.eval_every=0", "--config.train.log_every=1"]
FINETUNE = ["finetune", "--config", "configs/glue.py", "--no-progress", "--config.task=synthetic_sentiment",
            "--config.model.dtype=float32", "--config.train.batch_size=8", "--config.finetune.max_examples=48",
            "--config.finetune.epochs=2", "--config.finetune.max_len=64", "--config.train.log_every=1",
            "--config.finetune.eval_batch_size=16"]
ENV = dict(os.environ, JAX_PLATFORMS="cpu")
ENV.pop("XLA_FLAGS", None)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("pre")
    assert cli.main(["pretrain", "--workdir", str(workdir), *ARGS, "--config.train.steps=4"]) == 0
    return workdir


def _start(*args, env=ENV):
    return subprocess.Popen([sys.executable, "-m", "gptjax.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _wait_for_step(workdir, step: int, process, timeout: float = 300) -> int:
    """Blocks until the run in `process` has logged `step` (its metrics line); returns the newest."""
    deadline = time.monotonic() + timeout
    path = os.path.join(workdir, "metrics.jsonl")
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        if os.path.exists(path):
            steps = [r["step"] for r in map(json.loads, open(path).read().splitlines()[:-1]) if "loss" in r]
            if steps and steps[-1] >= step:
                return steps[-1]
        time.sleep(0.2)
    process.kill()
    raise AssertionError(f"the run did not reach step {step} in {timeout} s")


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


def test_a_second_run_is_refused_and_a_killed_run_leaves_no_stale_lock(tmp_path, capsys):
    first = _start("pretrain", "--workdir", str(tmp_path), *ARGS, "--config.train.steps=100000")
    try:
        _wait_for_step(tmp_path, 1, first)
        holder = f"{tmp_path} is in use by `gptjax pretrain`, pid {first.pid} on {socket.gethostname()}"
        for command in (["pretrain", "--workdir", str(tmp_path), *ARGS, "--config.train.steps=2"],
                        ["prepare", "--workdir", str(tmp_path), *ARGS[:2]],
                        [*FINETUNE, f"--config.init_from={tmp_path}", "--workdir", str(tmp_path)]):
            assert cli.main(command) == 2
            err = capsys.readouterr().err
            assert len(_error_lines(err)) == 1, err
            assert holder in err and "running since" in err and "pass another --workdir" in err, err
    finally:
        first.kill()  # SIGKILL: no handler runs, no cleanup
        first.communicate()
    assert os.path.exists(tmp_path / "gptjax.lock")  # left behind, but the kernel dropped the lock
    assert cli.main(["pretrain", "--workdir", str(tmp_path), *ARGS, "--config.train.steps=2"]) == 0
    assert checkpoint.latest_step(str(tmp_path)) == 2


def test_ctrl_c_saves_and_the_same_command_resumes(tmp_path, capsys):
    command = ["pretrain", "--workdir", str(tmp_path), *ARGS, "--config.train.steps=100000"]
    run = _start(*command)
    _wait_for_step(tmp_path, 3, run)
    run.send_signal(signal.SIGINT)
    out, err = run.communicate(timeout=120)
    assert run.returncode == 130, err[-3000:]
    lines = _error_lines(err)
    assert len(lines) == 1 and lines[0].startswith("interrupted (Ctrl-C) after step "), err[-3000:]
    step = int(lines[0].split("after step ")[1].split(";")[0])
    assert step >= 3 and checkpoint.latest_step(str(tmp_path)) == step
    assert f"saved {tmp_path}/checkpoints/{step}; run the same command again to resume from step {step}" in lines[0]
    resumed = subprocess.run([sys.executable, "-m", "gptjax.cli", "pretrain", "--workdir", str(tmp_path), *ARGS,
                              f"--config.train.steps={step + 2}"], capture_output=True, text=True, env=ENV, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {tmp_path}/checkpoints/{step}" in resumed.stdout
    assert resumed.stderr.strip() == ""  # no library noise (Orbax's, absl's) on a resume


def test_ctrl_c_in_fine_tuning_saves_and_resumes(pretrained, tmp_path, monkeypatch, capsys):
    from gptjax import loop
    workdir = tmp_path / "ft"
    command = [*FINETUNE, f"--config.init_from={pretrained}", "--workdir", str(workdir)]
    original, calls = loop.StepRunner.step, []

    def step_then_ctrl_c(self, batch):
        metrics = original(self, batch)
        calls.append(1)
        if len(calls) == 3:  # a real SIGINT, through the handler the run installed
            os.kill(os.getpid(), signal.SIGINT)
        return metrics

    monkeypatch.setattr(loop.StepRunner, "step", step_then_ctrl_c)
    assert cli.main(command) == 130
    lines = _error_lines(capsys.readouterr().err)
    assert lines == [f"interrupted (Ctrl-C) after step 3; saved {workdir}/checkpoints/3; run the same "
                     f"command again to resume from step 3"]
    assert checkpoint.latest_step(str(workdir)) == 3
    monkeypatch.setattr(loop.StepRunner, "step", original)
    assert cli.main(command) == 0
    assert f"resumed from {workdir}/checkpoints/3" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the run put Python's handler back


def _mount_tmpfs(path, size: str) -> bool:
    os.makedirs(path)
    if shutil.which("mount") is None or os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_a_full_disk_stops_at_once_with_the_checkpoint_to_resume_from(pretrained, tmp_path, capsys):
    """A real full disk: a small tmpfs that holds two checkpoints of this model but not three."""
    one = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(pretrained / "checkpoints" / "4") for f in fs)
    small = tmp_path / "small"
    size = 2 * one + (os.path.getsize(pretrained / "tokenizer.model") + one) // 2 + (1 << 20)
    if not _mount_tmpfs(small, str(size)):
        pytest.skip("mounting a tmpfs needs root and mount(8); test_an_error_while_saving covers the same path")
    try:
        workdir = small / "run"
        command = ["pretrain", "--workdir", str(workdir), *ARGS, "--config.train.steps=12",
                   "--config.train.checkpoint_every=2"]
        assert cli.main(command) == WRITE_FAILED_EXIT_CODE
        lines = _error_lines(capsys.readouterr().err)
        assert len(lines) == 1, lines
        assert "could not be written (no space left on the device); its partial files were removed and " \
               "the next run resumes from step " in lines[0]
        failed = int(lines[0].split("error: checkpoint ")[1].split()[0])
        resume = int(lines[0].split("resumes from step ")[1].split()[0])
        names = os.listdir(workdir / "checkpoints")
        assert resume == checkpoint.latest_step(str(workdir)) and failed == resume + 2
        assert not any(n.startswith(f"{failed}.") for n in names)  # the partial folder is gone
        # Space made (the older checkpoint removed by hand): the same command resumes and ends.
        shutil.rmtree(workdir / "checkpoints" / str(resume - 2))
        command.append("--config.train.keep=1")
        assert cli.main(command) == 0
        assert f"resumed from {workdir}/checkpoints/{resume}" in capsys.readouterr().out
        assert checkpoint.latest_step(str(workdir)) == 12
        # Any other write of a workdir on a full disk (here the tokenizer and config.json of a new run).
        with open(small / "filler", "wb") as f:
            try:
                while True:
                    f.write(b"\0" * (1 << 20))
                    f.flush()
            except OSError as e:
                assert e.errno == errno.ENOSPC
        assert cli.main(["pretrain", "--workdir", str(small / "new"), *ARGS, "--config.train.steps=2"]) \
            == WRITE_FAILED_EXIT_CODE
        lines = _error_lines(capsys.readouterr().err)
        assert len(lines) == 1 and "no space left on the device" in lines[0] and str(small / "new") in lines[0], lines
    finally:
        subprocess.run(["umount", str(small)], check=False)


def test_an_error_while_saving_stops_with_one_line(pretrained, tmp_path, monkeypatch, capsys):
    """The storage refuses the write itself (as a lost mount or quota does): exit 74, one line."""
    workdir = tmp_path / "run"
    save = checkpoint.Checkpointer.save

    def refuse_step_4(self, step, *args):
        if step == 4:
            def fail(*_, **__):
                raise OSError(errno.EDQUOT, "Disk quota exceeded")
            monkeypatch.setattr(self._manager, "save", fail)
        return save(self, step, *args)

    monkeypatch.setattr(checkpoint.Checkpointer, "save", refuse_step_4)
    command = ["pretrain", "--workdir", str(workdir), *ARGS, "--config.train.steps=6", "--config.train.checkpoint_every=2"]
    assert cli.main(command) == WRITE_FAILED_EXIT_CODE
    lines = _error_lines(capsys.readouterr().err)
    assert lines == [f"error: checkpoint 4 could not be written (no space left on the device); its partial files were "
                     f"removed and the next run resumes from step 2 ({workdir}/checkpoints/2); free space (or fix "
                     f"the storage) and run the same command again"]
    monkeypatch.setattr(checkpoint.Checkpointer, "save", save)
    assert cli.main(command) == 0
    assert checkpoint.latest_step(str(workdir)) == 6


@pytest.mark.parametrize("killed", [1, 0])
def test_a_killed_process_stops_the_other_with_one_line(tmp_path, killed):
    """kill -9 of either process (0 hosts JAX's coordination service) while the job checkpoints
    every other step, so the survivor is as likely to wait at a checkpoint's barrier as in a
    step's collectives: it names the killed process in one line and exits 76, with no traceback
    of Python, of JAX's heartbeat abort or of gloo."""
    env = dict(ENV, XLA_FLAGS="--xla_force_host_platform_device_count=2", GPTJAX_PORT=free_port())
    run = subprocess.Popen(["launch/local.sh", "2", sys.executable, "-m", "gptjax.cli", "pretrain", "--workdir",
                            str(tmp_path), *ARGS, "--config.train.steps=100000", "--config.mesh.data=2",
                            "--config.mesh.fsdp=2", "--config.mesh.dcn_data=2",
                            "--config.train.checkpoint_every=2"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                           start_new_session=True)
    try:
        _wait_for_step(tmp_path, 5, run)
        workers = [int(p) for p in os.listdir("/proc") if p.isdigit() and _is_process(int(p), str(tmp_path), killed)]
        assert len(workers) == 1
        os.kill(workers[0], signal.SIGKILL)
        out, _ = run.communicate(timeout=120)  # a guard against a hang, not a measure of speed
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    survivor = 1 - killed
    # gptjax's own lines; JAX's C++ runtime may log a warning or two of its own as the
    # connection to the dead process drops, but never its abort.
    errors = [line for line in out.splitlines() if line.startswith(f"[{survivor}/2] error: ")]
    assert len(errors) == 1, out[-3000:]
    assert errors[0].startswith(f"[{survivor}/2] error: process {killed} of this 2-process job ended without a "
                                f"word (killed, or crashed); the checkpoints up to step "), errors
    step = int(errors[0].split("the checkpoints up to step ")[1].split()[0])
    assert step in checkpoint.complete_steps(str(tmp_path / "checkpoints")) and step >= 2
    assert errors[0].endswith("once every process can run (relaunch the whole job)")
    assert "Traceback" not in out and "Check failure" not in out, out[-3000:]
    if killed == 1:
        assert "Terminating process" not in out, out[-3000:]
    # With process 0 gone, JAX's runtime in the survivor may log its fatal "Terminating process" line
    # in the same millisecond as the watch hears (the README says so); the exit is gptjax's.
    # local.sh passes on the status of the highest-numbered process that failed.
    assert run.returncode == (128 + signal.SIGKILL if killed == 1 else PEER_FAILED_EXIT_CODE)
    assert f"[{survivor}/2] exited with status {PEER_FAILED_EXIT_CODE}" in out
    assert f"[{killed}/2] exited with status 137" in out


def _is_process(pid: int, workdir: str, index: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = f.read().split(b"\0")
    except OSError:
        return False
    return (workdir.encode() in argv and b"gptjax.cli" in argv and argv[0] == sys.executable.encode()
            and f"GPTJAX_PROCESS_ID={index}".encode() in environ)


def _one_line(argv, capsys, *expected):
    assert cli.main(argv) == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1, lines
    for text in expected:
        assert text in lines[0], lines[0]


def test_damaged_files_of_a_run_are_one_line_naming_them(pretrained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(pretrained, run)
    config = run / "config.json"
    for text in ("[]", "null", '{"model": {"n_layer": "many"}}', "{not json"):
        config.write_text(text)
        _one_line(["generate", "--workdir", str(run), "--prompt", "a"], capsys, str(config))
    shutil.copy(pretrained / "config.json", config)
    # Truncated parameters: the readers name the checkpoint.
    files = [os.path.join(d, f) for d, _, fs in os.walk(run / "checkpoints" / "4" / "params") for f in fs]
    biggest = max(files, key=os.path.getsize)
    os.truncate(biggest, os.path.getsize(biggest) // 2)
    _one_line(["generate", "--workdir", str(run), "--prompt", "a"], capsys, f"checkpoint {run}/checkpoints/4")
    _one_line([*FINETUNE, f"--config.init_from={run}", "--workdir", str(tmp_path / "ft")], capsys,
              f"checkpoint {run}/checkpoints/4")
    # A damaged tokenizer is named as the workdir's own file.
    shutil.rmtree(run / "checkpoints")
    shutil.copytree(pretrained / "checkpoints", run / "checkpoints")
    (run / "tokenizer.model").write_bytes(b"\x00garbage")
    _one_line(["pretrain", "--workdir", str(run), *ARGS, "--config.train.steps=6"], capsys,
              f"{run}/tokenizer.model is damaged")


def test_a_damaged_best_json_is_one_line(pretrained, tmp_path, capsys):
    workdir = tmp_path / "ft"
    command = [*FINETUNE, f"--config.init_from={pretrained}", "--workdir", str(workdir), "--config.finetune.epochs=1"]
    assert cli.main(command) == 0
    capsys.readouterr()
    best = workdir / "best.json"
    for text in ('{"step": "x"}', "[1]", ""):
        best.write_text(text)
        _one_line(["eval", "--config", "configs/glue.py", "--workdir", str(workdir)], capsys, str(best), "damaged")


def test_another_tokenizer_on_a_workdir_is_refused(pretrained, tmp_path, capsys):
    other = tmp_path / "other"
    assert cli.main(["pretrain", "--workdir", str(other), *ARGS, "--config.train.steps=1",
                     "--config.data.tokenizer_vocab_size=300"]) == 0
    capsys.readouterr()
    run = tmp_path / "run"
    shutil.copytree(pretrained, run)
    before = (run / "tokenizer.model").read_bytes()
    _one_line(["pretrain", "--workdir", str(run), *ARGS, "--config.train.steps=6",
               f"--config.data.tokenizer={other}/tokenizer.model"], capsys,
              "holds the SentencePiece tokenizer its data and checkpoints were made with", "pass a new --workdir")
    assert (run / "tokenizer.model").read_bytes() == before and checkpoint.latest_step(str(run)) == 4


def test_pretraining_into_a_fine_tuning_workdir_is_refused(pretrained, tmp_path, capsys):
    workdir = tmp_path / "ft"
    (workdir).mkdir()
    (workdir / "config.json").write_text(json.dumps({"task": "sst2"}))
    _one_line(["pretrain", "--workdir", str(workdir), *ARGS, "--config.train.steps=2"], capsys,
              "holds a fine-tuning run (task sst2)")


def test_impossible_values_are_refused_before_any_work(tmp_path, capsys):
    for key, value in (("model.ln_eps", "-1e-5"), ("model.init_std", "0"), ("train.eps", "0"),
                       ("train.lr", "inf"), ("train.grad_clip", "-1")):
        _one_line(["pretrain", "--workdir", str(tmp_path / "w"), *ARGS, f"--config.{key}={value}"], capsys, key)
    assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_a_reader_retries_when_a_running_job_rotates_its_checkpoint_away(pretrained, monkeypatch):
    """`generate` or the API reading a workdir that a run is still writing: the newest step it
    listed can be removed (train.keep) before it is read; it reads the newer one instead."""
    from gptjax.api import GPT
    read, calls = checkpoint.Checkpointer.restore_params, []

    def rotated_once(self, step, like):
        calls.append(step)
        if len(calls) == 1:
            raise FileNotFoundError(f"{self.directory}/{step}")
        return read(self, step, like)

    monkeypatch.setattr(checkpoint.Checkpointer, "restore_params", rotated_once)
    assert GPT.from_pretrained(str(pretrained)).generate("a", max_new_tokens=2, temperature=0.0)
    assert calls == [4, 4]
