"""parquet: and hf: (datasets) pretraining sources: the same documents given as JSONL, Parquet and a
save_to_disk folder make the same token rows; prepare, mixtures, processes, fingerprints, errors."""

import json
import os
import shutil

import datasets
import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gptjax import cli
from gptjax.config import load_config
from gptjax.data import corpus, synthetic
from gptjax.data.hf_datasets_source import hf_documents, parse_hf_spec
from gptjax.data.parquet_source import parquet_documents
from gptjax.data.sources import iter_source_documents, parse_sources, source_fingerprint
from gptjax.data.tokenizer import train_tokenizer
from gptjax.errors import UserError
from gptjax.train import batch_settings

datasets.disable_progress_bars()

OPENINGS = ["Grüße aus Köln — ein Test.", "日本語のテキストです。", "Ελληνικά κείμενα εδώ.", "emoji 🙂🚀 and a\ttab",
            "Ünïcödé: ñ ç ø å ß", "русский текст, строка.", "עברית טקסט", "中文文本，标点。", "naïve café façade",
            "→ ∑ ∫ ≠ ≤"]
DOCS = [f"{OPENINGS[i % len(OPENINGS)]}\n{doc}" for i, doc in enumerate(synthetic.documents(60, seed=3))]
VALIDATION = [f"validation {i}: {OPENINGS[i]}" for i in range(5)]
# Rows that are no documents: every source skips them (JSONL has no null, so it gets the others).
BLANKS = ["", "  \n\t"]


def _batches(config, tokenizer, workdir: str):
    return corpus.pretraining_batches(config.data, tokenizer, workdir, **batch_settings(config.train))


def _with_blanks(docs):
    """The documents with a null, an empty and a whitespace-only value among them."""
    return docs[:7] + [None] + docs[7:20] + BLANKS[:1] + docs[20:41] + BLANKS[1:] + docs[41:]


def write_jsonl(path, docs, field="text"):
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"id": len(doc), field: doc}, ensure_ascii=False) + "\n")


def write_parquet(folder, docs, field="text", files=3, row_group_size=6):
    """Several files of several row groups each, in an order that only sorting the names restores."""
    os.makedirs(folder, exist_ok=True)
    cut = -(-len(docs) // files)
    for number in range(files):
        part = docs[number * cut:(number + 1) * cut]
        table = pa.table({"id": list(range(len(part))), field: part})
        pq.write_table(table, os.path.join(folder, f"part-{number:02d}.parquet"), row_group_size=row_group_size)


@pytest.fixture(scope="module")
def formats(tmp_path_factory):
    """The same documents as JSONL, Parquet, a Dataset and a DatasetDict saved with save_to_disk."""
    root = tmp_path_factory.mktemp("formats")
    write_jsonl(root / "docs.jsonl", [d for d in _with_blanks(DOCS) if d is not None])
    write_parquet(root / "parquet", _with_blanks(DOCS))
    column = _with_blanks(DOCS)
    datasets.Dataset.from_dict({"id": list(range(len(column))), "text": column}).save_to_disk(root / "single")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": _with_blanks(DOCS)}),
                          "validation": datasets.Dataset.from_dict({"text": VALIDATION})}).save_to_disk(root / "dict")
    pf = pq.ParquetFile(root / "parquet" / "part-00.parquet")
    assert pf.metadata.num_row_groups > 1  # the reader really walks row groups
    return {"jsonl": f"jsonl:{root}/docs.jsonl", "parquet": f"parquet:{root}/parquet/*.parquet",
            "hf": f"hf:{root}/single", "hf_dict": f"hf:{root}/dict", "hf_dict_train": f"hf:{root}/dict:train",
            "root": root}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(iter(DOCS), 512, tmp_path_factory.mktemp("sp") / "sp")


def _config(source, *extra):
    return load_config("configs/tiny.py", [f"data.source={source}", "train.batch_size=4", "train.seq_len=32",
                                           "data.eval_fraction=0.1", "data.document_mask=true",
                                           "model.n_layer=1", *extra])


def _assert_same_batches(a, b, steps=(0, 1, 7, 10**5)):
    (train_a, eval_a), (train_b, eval_b) = a, b
    for step in steps:
        x, y = train_a.batch(step), train_b.batch(step)
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    assert len(eval_a) == len(eval_b) > 0
    for x, y in zip(eval_a, eval_b):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def test_every_format_reads_the_same_documents_in_order(formats):
    config = _config("synthetic")
    for name in ("jsonl", "parquet", "hf", "hf_dict", "hf_dict_train"):
        assert list(iter_source_documents(formats[name], config.data)) == DOCS, name
    assert hf_documents(f"{formats['root']}/dict:validation", "text") == VALIDATION


def test_jsonl_parquet_and_save_to_disk_give_identical_token_rows(formats, tokenizer, tmp_path):
    runs = {name: _batches(_config(formats[name]), tokenizer, str(tmp_path / name))
            for name in ("jsonl", "parquet", "hf", "hf_dict")}
    for name in ("parquet", "hf", "hf_dict"):
        _assert_same_batches(runs["jsonl"], runs[name])


def test_prepared_mixture_of_parquet_and_hf_equals_on_the_fly(formats, tokenizer, tmp_path):
    config = _config(f"{formats['parquet']},{formats['hf_dict']}:validation,{formats['jsonl']}",
                     "data.weights=2,1,1", "data.eval_fraction=0.2")
    workdir = str(tmp_path)
    fly = _batches(config, tokenizer, workdir)
    written = corpus.prepare(config.data, workdir, tokenizer)
    assert {m["source"] for m in written} == set(parse_sources(config.data.source))
    assert all(m["text_field"] == "text" for m in written if not m["source"].startswith("jsonl:"))
    disk = _batches(config, tokenizer, workdir)
    assert isinstance(disk[0].parts[0].rows.__dict__["_shards"][0], str)  # really read from files
    _assert_same_batches(fly, disk)
    # Parquet fills the first two rows of every batch: those of a run on Parquet alone, 2 rows a batch.
    alone, _ = _batches(_config(formats["parquet"], "train.batch_size=2", "data.eval_fraction=0.2"),
                                          tokenizer, str(tmp_path / "alone"))
    for step in (0, 5):
        np.testing.assert_array_equal(fly[0].batch(step)["tokens"][:2], alone.batch(step)["tokens"])


def test_prepared_parquet_and_hf_are_refused_after_their_files_change(formats, tokenizer, tmp_path):
    parquet, saved = tmp_path / "parquet", tmp_path / "saved"
    shutil.copytree(formats["root"] / "parquet", parquet)
    shutil.copytree(formats["root"] / "dict", saved)
    for source, change in ((f"parquet:{parquet}/*.parquet", lambda: (parquet / "part-01.parquet").unlink()),
                           (f"hf:{saved}", lambda: os.utime(saved / "train" / "state.json", (1, 1)))):
        config = _config(source)
        workdir = str(tmp_path / str(abs(hash(source))))
        before = source_fingerprint(source, config.data)
        corpus.prepare(config.data, workdir, tokenizer)
        _batches(config, tokenizer, workdir)
        # Another text column is another corpus too.
        with pytest.raises(UserError, match="prepared with text_field='text', but this run has 'other'"):
            _batches(_config(source, "data.text_field=other"), tokenizer, workdir)
        change()
        assert source_fingerprint(source, config.data) != before
        with pytest.raises(UserError, match="files_sha1"):
            _batches(config, tokenizer, workdir)


def test_two_processes_read_disjoint_rows_that_make_the_global_parquet_batch(formats, tokenizer, tmp_path,
                                                                              monkeypatch):
    config = _config(formats["parquet"], "train.batch_size=8")
    whole, _ = _batches(config, tokenizer, str(tmp_path))
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    parts = []
    for index in (0, 1):
        monkeypatch.setattr(jax, "process_index", lambda index=index: index)
        parts.append(_batches(config, tokenizer, str(tmp_path))[0])
    for step in (0, 3, 11):
        local = [part.batch(step)["tokens"] for part in parts]
        assert local[0].shape == (4, 32)
        assert not {tuple(r) for r in local[0]} & {tuple(r) for r in local[1]}
        assert sorted(map(tuple, np.concatenate(local))) == sorted(map(tuple, whole.batch(step)["tokens"]))


def test_hf_split_parsing_keeps_colons_in_paths(tmp_path):
    assert parse_hf_spec("owner/corpus:validation") == ("owner/corpus", "validation")
    assert parse_hf_spec("owner/corpus") == ("owner/corpus", None)
    assert parse_hf_spec("/no/such/run:2/data") == ("/no/such/run:2/data", None)  # '2/data' is no split
    folder = tmp_path / "run:2" / "corpus:v1"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": DOCS[:3]}),
                          "validation": datasets.Dataset.from_dict({"text": VALIDATION})}).save_to_disk(folder)
    assert parse_hf_spec(str(folder)) == (str(folder), None)  # an existing path is taken whole
    assert parse_hf_spec(f"{folder}:validation") == (str(folder), "validation")
    assert hf_documents(str(folder), "text") == DOCS[:3]
    assert hf_documents(f"{folder}:validation", "text") == VALIDATION


def test_hf_reads_data_files_and_folders_of_them_through_datasets(formats, tmp_path):
    assert hf_documents(str(formats["root"] / "parquet"), "text") == DOCS
    assert hf_documents(str(formats["root"] / "parquet" / "part-00.parquet"), "text") == \
        parquet_documents(str(formats["root"] / "parquet" / "part-00.parquet"), "text")
    csv = tmp_path / "docs.csv"
    csv.write_text("text,n\nfirst,1\n,2\nsecond,3\n")
    assert hf_documents(str(csv), "text") == ["first", "second"]
    with pytest.raises(UserError, match="column 'n' holds int values, not text"):
        hf_documents(str(csv), "n")


def test_text_field_names_the_column_and_jsonl_field_is_its_older_name(tmp_path):
    docs = DOCS[:5]
    write_jsonl(tmp_path / "d.jsonl", docs, field="body")
    write_parquet(tmp_path / "p", docs, field="body", files=2)
    for source in (f"jsonl:{tmp_path}/d.jsonl", f"parquet:{tmp_path}/p/*.parquet"):
        assert list(iter_source_documents(source, _config(source, "data.text_field=body").data)) == docs
        # A config from before data.text_field, naming the column data.jsonl_field, reads the same.
        assert list(iter_source_documents(source, _config(source, "data.jsonl_field=body").data)) == docs
    with pytest.raises(UserError, match=r"data.jsonl_field='body' and data.text_field='content' disagree.*"
                                        r"set data.text_field alone"):
        _config("synthetic", "data.jsonl_field=body", "data.text_field=content")


def _one_error_line(capsys, *args):
    code = cli.main(list(args))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_bad_inputs_are_one_line_and_exit_code_2(formats, tokenizer, tmp_path, capsys, monkeypatch):
    common = ["prepare", "--config", "configs/tiny.py", f"--config.data.tokenizer={tokenizer.path}"]

    def error(name, *settings):
        return _one_error_line(capsys, *common, "--workdir", str(tmp_path / name), *settings)

    assert "part-00.parquet has no column 'body' (its columns: id, text); set data.text_field" in error(
        "column", f"--config.data.source={formats['parquet']}", "--config.data.text_field=body")
    assert "has no split 'test'; its splits are ['train', 'validation']" in error(
        "split", f"--config.data.source={formats['hf_dict']}:test")
    mixed = tmp_path / "mixed"
    shutil.copytree(formats["root"] / "parquet", mixed)
    (mixed / "notes.parquet").write_text("not a table\n")
    assert "notes.parquet is not a Parquet file" in error("not-parquet", f"--config.data.source=parquet:{mixed}/*")
    # Offline mode fails as a machine without network does, without minutes of retries.
    import huggingface_hub.constants
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert "the Hugging Face Hub cannot be reached" in error(
        "hub", "--config.data.source=hf:gptjax-tests/no-such-corpus:train")
    assert "does not exist, and is no Hugging Face Hub name" in error(
        "missing", f"--config.data.source=hf:{tmp_path}/nothing/here")


def test_pretraining_from_a_parquet_source_through_the_cli(formats, tmp_path, capsys):
    workdir = tmp_path / "run"
    code = cli.main(["pretrain", "--config", "configs/tiny.py", "--workdir", str(workdir), "--no-progress",
                     f"--config.data.source={formats['parquet']}", "--config.model.n_layer=1",
                     "--config.train.steps=4", "--config.train.log_every=2", "--config.train.eval_every=4",
                     "--config.train.batch_size=4", "--config.train.seq_len=32", "--config.train.warmup_steps=1",
                     "--config.data.eval_fraction=0.1"])
    assert code == 0, capsys.readouterr().err
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert any("eval_loss" in r for r in records) and any(r.get("step") == 4 for r in records)


def test_bench_data_times_jsonl_parquet_and_a_datasets_folder(tmp_path, capsys):
    from gptjax.bench import cli as bench

    assert bench.main(["data", "--config", "configs/tiny.py", "--workdir", str(tmp_path), "--steps", "2",
                       "--config.data.num_documents=200", "--config.train.batch_size=4",
                       "--config.train.seq_len=64"]) == 0
    out = capsys.readouterr().out
    for label in ("JSONL", "Parquet", "datasets folder"):
        for what in ("read", "read + tokenize"):
            assert f"{label} {what} (" in out and " documents/s): " in out, out
    assert os.path.isfile(tmp_path / "formats" / "hf" / "state.json")
