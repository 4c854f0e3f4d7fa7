"""Text and JSONL corpora, mixtures, and document masks through the model and the CLI."""

import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from gptjax.config import base_config, load_config, validate
from gptjax.data import synthetic
from gptjax.data.mixture import MixedBatches, quotas
from gptjax.data.packing import RowBatches, as_batch, pack_rows
from gptjax.data.sources import jsonl_documents, parse_sources, parse_weights, text_documents
from gptjax.errors import UserError
from gptjax.model import init_decoder
from gptjax.model_config import ModelConfig


def test_text_documents_per_file_or_per_blank_line(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\nstill first\n\n\nsecond doc\n")
    (tmp_path / "b.txt").write_text("third doc\n")
    assert text_documents(str(tmp_path / "*.txt"), "file") == ["first doc\nstill first\n\n\nsecond doc",
                                                              "third doc"]
    assert text_documents(str(tmp_path / "*.txt"), "blank_line") == ["first doc\nstill first", "second doc",
                                                                    "third doc"]
    with pytest.raises(UserError, match="matches no files"):
        text_documents(str(tmp_path / "*.md"), "file")
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9")
    with pytest.raises(UserError, match="bad.txt is not UTF-8"):
        text_documents(str(tmp_path / "bad.txt"), "file")


def test_jsonl_documents_and_their_errors(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two", "meta": 1}\n')
    assert jsonl_documents(str(path), "text") == ["one", "two"]
    path.write_text('{"text": "one"}\n{"body": "two"}\n')
    with pytest.raises(UserError, match=r"c.jsonl:2: no string field 'text'"):
        jsonl_documents(str(path), "text")
    path.write_text('{"text": "one"}\n{"text": \n')
    with pytest.raises(UserError, match=r"c.jsonl:2: not valid JSON"):
        jsonl_documents(str(path), "text")


def test_source_specs_and_weights():
    assert parse_sources("synthetic, text:a/*.txt,jsonl:b.jsonl") == ["synthetic", "text:a/*.txt", "jsonl:b.jsonl"]
    for bad in ("", "tfdz:lm1b", "text"):
        with pytest.raises(UserError, match="data.source"):
            parse_sources(bad)
    assert parse_weights("", 2) == [0.5, 0.5]
    assert parse_weights("3,1", 2) == [0.75, 0.25]
    with pytest.raises(UserError, match="needs 2 positive numbers"):
        parse_weights("1", 2)
    config = base_config()
    config.data.source = "synthetic,synthetic"
    config.data.weights = "1,2,3"
    with pytest.raises(UserError, match="data.weights"):
        validate(config)


def test_mixture_quotas_and_batches():
    assert quotas([0.75, 0.25], 8, ["a", "b"]) == [6, 2]
    assert quotas([0.5, 0.3, 0.2], 7, ["a", "b", "c"]) == [4, 2, 1]  # 3.5, 2.1, 1.4: largest remainders win
    with pytest.raises(UserError, match="leave source b no row"):
        quotas([0.95, 0.05], 4, ["a", "b"])
    a = RowBatches(np.full((10, 5), 1, np.int32), 3, seed=0, eos_id=0, pad_id=-1)
    b = RowBatches(np.full((10, 5), 2, np.int32), 1, seed=0, eos_id=0, pad_id=-1)
    mixed = MixedBatches([a, b])
    batch = mixed.batch(7)
    assert mixed.batch_size == 4 and batch["tokens"].shape == (4, 4)
    np.testing.assert_array_equal(batch["tokens"][:, 0], [1, 1, 1, 2])


@pytest.mark.parametrize("block", ["pre_ln", "post_ln"])
def test_document_mask_isolates_documents_in_the_model(block):
    config = load_config("configs/tiny.py", ["model.n_layer=2", "model.d_model=32", "model.n_head=2",
                                             "model.d_ff=64", "model.vocab_size=64", f"model.block={block}"])
    model = init_decoder(ModelConfig.from_config(config.model), 0)
    eos, pad = 2, 0
    rng = np.random.default_rng(0)
    docs = [list(rng.integers(6, 64, n)) for n in (5, 7, 6)]
    rows = pack_rows(docs, eos, 20, pad)
    other = [docs[0], list(rng.integers(6, 64, 7)), docs[2]]  # only the middle document changes
    rows_other = pack_rows(other, eos, 20, pad)

    def logits(r):
        b = as_batch(r, eos, pad, True)
        return np.asarray(model.lm_logits(model(jnp.asarray(b["tokens"]), jnp.asarray(b["positions"]),
                                               jnp.asarray(b["segment_ids"]))))

    a, c = logits(rows), logits(rows_other)
    first, third = slice(0, 6), slice(14, 20)  # each document with its end-of-document token
    np.testing.assert_allclose(a[0, first], c[0, first], atol=1e-6)
    np.testing.assert_allclose(a[0, third], c[0, third], atol=1e-6)
    assert np.abs(a[0, 6:13] - c[0, 6:13]).max() > 1e-3
    # The third document alone, at positions 0.., gives the same logits as inside the packed row.
    alone = pack_rows([docs[2]], eos, 6, pad)
    np.testing.assert_allclose(logits(alone)[0, :6], a[0, third], atol=1e-5)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "gptjax.cli", *args], capture_output=True, text=True, timeout=600)


def test_pretraining_from_text_and_jsonl_sources_through_the_cli(tmp_path):
    docs = synthetic.documents(400)
    for i in range(4):
        (tmp_path / f"part{i}.txt").write_text("\n\n".join(docs[i * 50:(i + 1) * 50]))
    with open(tmp_path / "more.jsonl", "w") as f:
        for doc in docs[200:]:
            f.write(json.dumps({"text": doc}) + "\n")
    workdir = tmp_path / "run"
    result = _cli("pretrain", "--config", "configs/tiny.py", "--workdir", str(workdir), "--no-progress",
                  f"--config.data.source=text:{tmp_path}/*.txt,jsonl:{tmp_path}/more.jsonl",
                  "--config.data.weights=1,1", "--config.data.text_documents=blank_line",
                  "--config.data.document_mask=true", "--config.train.steps=30", "--config.train.log_every=10",
                  "--config.train.eval_every=30", "--config.train.batch_size=8", "--config.model.n_layer=2",
                  "--config.data.tokenizer_vocab_size=400", "--config.model.vocab_size=400")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < 0.8 * losses[0]
    assert any("eval_loss" in r for r in records)

    result = _cli("pretrain", "--config", "configs/tiny.py", "--workdir", str(tmp_path / "x"),
                  f"--config.data.source=text:{tmp_path}/*.nothing")
    assert result.returncode == 2 and "matches no files" in result.stderr


def test_jsonl_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(UserError, match=r"d.jsonl:2: not UTF-8"):
        jsonl_documents(str(path), "text")
