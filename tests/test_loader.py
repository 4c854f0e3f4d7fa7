"""Prepared token files, the grain loader, resume by state, and one disjoint shard per process."""

import os

import jax
import numpy as np
import pytest

from gptjax.config import load_config
from gptjax.data import corpus, token_files
from gptjax.data.loader import Loader
from gptjax.data.packing import RowBatches, pack_rows
from gptjax.errors import UserError
from gptjax.train import batch_settings

EOS, PAD = 2, 0


def _batches(config, tokenizer, workdir: str):
    return corpus.pretraining_batches(config.data, tokenizer, workdir, **batch_settings(config.train))


def _docs(n, seed=0):
    rng = np.random.default_rng(seed)
    return [list(map(int, rng.integers(6, 300, rng.integers(0, 30)))) for _ in range(n)]


def test_prepared_shards_give_the_packed_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(token_files, "SHARD_TOKENS", 50)  # many shards, rows that straddle them
    docs = _docs(40)
    writer = token_files.ShardWriter(str(tmp_path / "d"), 300)
    for doc in docs:
        writer.add([*doc, EOS])
    meta = writer.close({"source": "x"})
    assert len(meta["shard_tokens"]) > 5
    shards = token_files.read_prepared(str(tmp_path / "d"), {"source": "x"})
    rows = token_files.TokenRows(shards, 11, PAD)
    expected = pack_rows(docs, EOS, 11, PAD)
    assert len(rows) == len(expected)
    np.testing.assert_array_equal(rows[np.arange(len(rows))], expected)
    np.testing.assert_array_equal(rows[[3, 0, 3]], expected[[3, 0, 3]])
    with pytest.raises(UserError, match="prepared with source='x'"):
        token_files.read_prepared(str(tmp_path / "d"), {"source": "y"})
    first = shards[0]
    with open(first, "r+b") as f:
        f.truncate(os.path.getsize(first) - 2)
    with pytest.raises(UserError, match="missing or truncated"):
        token_files.read_prepared(str(tmp_path / "d"), {"source": "x"})


def _config(*extra):
    return load_config("configs/tiny.py", ["data.num_documents=300", "train.batch_size=4", "train.seq_len=32",
                                           "data.document_mask=true", *extra])


def test_prepared_and_on_the_fly_batches_are_identical(tmp_path):
    config = _config()
    workdir = str(tmp_path)
    tokenizer = corpus.workdir_tokenizer(config.data, workdir, config.model.vocab_size)
    fly, fly_eval = _batches(config, tokenizer, workdir)
    corpus.prepare(config.data, workdir, tokenizer)
    disk, disk_eval = _batches(config, tokenizer, workdir)
    assert isinstance(disk.rows.__dict__["_shards"][0], str)  # really read from files
    for step in (0, 1, 57, 10**5):
        a, b = fly.batch(step), disk.batch(step)
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert len(fly_eval) == len(disk_eval) > 0
    # A prepared corpus made for another config is refused, not silently used.
    with pytest.raises(UserError, match="gptjax prepare"):
        _batches(_config("data.eval_fraction=0.1"), tokenizer, workdir)


def _rows(n=37, width=9):
    return np.arange(n * width, dtype=np.int32).reshape(n, width) + 10


def _collect(loader, count):
    return [jax.device_get(next(loader)) for _ in range(count)]


def test_loader_is_deterministic_and_resumes_from_its_state():
    batches = RowBatches(_rows(), 4, seed=5, eos_id=EOS, pad_id=PAD)
    whole = _collect(Loader(batches, 12), 12)
    again = _collect(Loader(batches, 12), 12)
    for a, b in zip(whole, again):
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
    first = Loader(batches, 12)
    _collect(first, 5)
    state = first.state()
    assert state == {"step": 5}
    resumed = _collect(Loader(batches, 12, start=state["step"]), 7)
    for a, b in zip(resumed, whole[5:]):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert isinstance(next(Loader(batches, 12))["tokens"], jax.Array)
    with pytest.raises(StopIteration):
        _collect(Loader(batches, 2), 3)


def test_loader_with_worker_threads_matches_a_single_one():
    batches = RowBatches(_rows(), 4, seed=5, eos_id=EOS, pad_id=PAD)
    inline = _collect(Loader(batches, 6), 6)
    workers = _collect(Loader(batches, 6, num_workers=2), 6)
    for a, b in zip(inline, workers):
        np.testing.assert_array_equal(a["tokens"], b["tokens"])


def test_processes_read_disjoint_rows_that_make_the_global_batch():
    rows = _rows()
    whole = RowBatches(rows, 8, seed=1, eos_id=EOS, pad_id=PAD)
    parts = [RowBatches(rows, 8, seed=1, eos_id=EOS, pad_id=PAD, process_index=p, process_count=2) for p in (0, 1)]
    for step in (0, 3, 11):
        local = [p.batch(step)["tokens"] for p in parts]
        assert local[0].shape == (4, 8)
        assert not {tuple(r) for r in local[0]} & {tuple(r) for r in local[1]}
        assert sorted(map(tuple, np.concatenate(local))) == sorted(map(tuple, whole.batch(step)["tokens"]))
    with pytest.raises(ValueError, match="does not split over 3 processes"):
        RowBatches(rows, 8, seed=1, eos_id=EOS, pad_id=PAD, process_index=0, process_count=3)


def test_prepared_text_is_refused_after_its_files_change(tmp_path):
    from gptjax.data import synthetic
    folder = tmp_path / "txt"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.txt").write_text("\n\n".join(synthetic.documents(60, start=60 * i)))
    config = _config(f"data.source=text:{folder}/*.txt", "data.text_documents=blank_line")
    workdir = str(tmp_path / "w")
    os.makedirs(workdir)
    tokenizer = corpus.workdir_tokenizer(config.data, workdir, config.model.vocab_size)
    corpus.prepare(config.data, workdir, tokenizer)
    _batches(config, tokenizer, workdir)
    (folder / "2.txt").unlink()
    with pytest.raises(UserError, match="files_sha1"):
        _batches(config, tokenizer, workdir)
