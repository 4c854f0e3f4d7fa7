"""The `gptjax` command: user mistakes end in one `error:` line and exit code 2."""

import json
import subprocess
import sys

import pytest


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "gptjax.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


@pytest.mark.parametrize("args, message", [
    (["pretrain", "--config", "configs/tiny.py", "--workdir", "W", "--config.train.stepz=3"],
     "error: unknown config key 'train.stepz'; did you mean 'train.steps'?"),
    (["pretrain", "--config", "configs/tiny.py", "--workdir", "W", "--config.train.steps=three"],
     "error: config key 'train.steps' expects int, got 'three'"),
    (["pretrain", "--config", "configs/missing.py", "--workdir", "W"],
     "error: config file not found: configs/missing.py"),
    (["pretrain", "--config", "configs/tiny.py", "--workdir", "W", "--steps", "3"],
     "error: unrecognised argument '--steps'"),
    (["finetune", "--config", "configs/glue.py", "--workdir", "W", "--config.task=wnli", "--config.source=tsv:x"],
     "error: config key 'source' is now 'task_data' (the fine-tuning / eval task data; pretraining text stays "
     "data.source): set task_data instead"),
    (["generate", "--workdir", "no/such/run", "--prompt", "x"],
     "error: no/such/run is not a gptjax workdir"),
])
def test_user_errors_are_one_line_with_exit_code_2(tmp_path, args, message):
    result = run(*[str(tmp_path / a) if a == "W" else a for a in args])
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr
    assert "Traceback" not in result.stderr


def test_debug_shows_the_traceback(tmp_path):
    result = run("pretrain", "--config", "configs/tiny.py", "--workdir", str(tmp_path), "--config.nope=1",
                 "--debug")
    assert result.returncode != 0 and "Traceback" in result.stderr and "UserError" in result.stderr


def test_tokenizer_pretrain_generate(tmp_path):
    corpus = tmp_path / "corpus.txt"
    from gptjax.data import synthetic
    corpus.write_text("\n\n".join(synthetic.documents(300)))
    result = run("tokenizer", "--input", str(corpus), "--vocab-size", "400", "--output", str(tmp_path / "tok"))
    assert result.returncode == 0, result.stderr
    assert "pad=0 eos=2 start=3 delim=4 extract=5" in result.stdout

    workdir = tmp_path / "run"
    result = run("pretrain", "--config", "configs/tiny.py", "--workdir", str(workdir), "--no-progress",
                 f"--config.data.tokenizer={tmp_path / 'tok.model'}", "--config.data.num_documents=400",
                 "--config.train.steps=6", "--config.train.log_every=2", "--config.train.eval_every", "3",
                 "--config.model.n_layer=1")
    assert result.returncode == 0, result.stderr
    assert "done: loss" in result.stdout
    assert [r["step"] for r in map(json.loads, open(workdir / "metrics.jsonl")) if "loss" in r] == [1, 2, 4, 6]

    result = run("generate", "--workdir", str(workdir), "--prompt", "the cat", "--prompt", "anna is",
                 "--max-new-tokens", "5", "--temperature", "0", "--json")
    assert result.returncode == 0, result.stderr
    outputs = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [o["prompt"] for o in outputs] == ["the cat", "anna is"]
    assert all(isinstance(o["completion"], str) for o in outputs)


def test_model_smaller_than_tokenizer_is_refused(tmp_path):
    result = run("pretrain", "--config", "configs/tiny.py", "--workdir", str(tmp_path), "--no-progress",
                 "--config.model.vocab_size=300", "--config.data.num_documents=300")
    assert result.returncode == 2
    assert "model.vocab_size" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_prepare_then_pretrain_reads_the_prepared_shards(tmp_path):
    workdir = tmp_path / "run"
    args = ["--config", "configs/tiny.py", "--workdir", str(workdir), "--config.data.num_documents=300",
            "--config.data.document_mask=true"]
    result = run("prepare", *args)
    assert result.returncode == 0, result.stderr
    assert "synthetic [train]: 294 documents" in result.stdout
    shards = sorted((workdir / "data").glob("*/shard-*"))
    assert len(shards) == 2 and all(s.suffix == ".u16" for s in shards)
    # Another corpus setting must not silently reuse the shards.
    result = run("pretrain", *args, "--no-progress", "--config.train.steps=3", "--config.data.eval_fraction=0.1")
    assert result.returncode == 2 and "run `gptjax prepare` again" in result.stderr
    result = run("pretrain", *args, "--no-progress", "--config.train.steps=3", "--config.model.n_layer=1")
    assert result.returncode == 0, result.stderr
