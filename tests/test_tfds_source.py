"""tfds: pretraining sources, read through tfds.data_source without TensorFlow or network access."""

import socket
import subprocess
import sys

import numpy as np
import pytest

from gptjax.data.tfds_source import parse_tfds_spec, tfds_documents, tfds_record_count
from gptjax.errors import UserError

tfds = pytest.importorskip("tensorflow_datasets")
pytest.importorskip("array_record")

TRAIN = [("t0", "héllo wörld"), ("t1", "second document"), ("t2", "  \n "), ("t3", "fourth")]


class GptjaxTestText(tfds.core.GeneratorBasedBuilder):
    """A real builder whose generator needs no download, so it can be prepared offline."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="a"), tfds.core.BuilderConfig(name="b")]

    def _info(self):
        # DatasetInfo directly: dataset_info_from_configs wants metadata files beside the module.
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "title": tfds.features.Text(), "body": tfds.features.Text(),
            "n": tfds.features.Scalar(dtype=np.int32)}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(TRAIN), "validation": self._generate_examples(TRAIN[:1])}

    def _generate_examples(self, rows):
        for i, (title, body) in enumerate(rows):
            yield i, {"title": f"{title}{self.builder_config.name}", "body": body, "n": i}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("tried to reach the network")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A data dir holding config b only, in the array_record format."""
    data_dir = tmp_path_factory.mktemp("tfds")
    GptjaxTestText(config="b", data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return str(data_dir)


def test_parse_spec():
    assert parse_tfds_spec("lm1b") == ("lm1b", "train")
    assert parse_tfds_spec("c4/en:validation") == ("c4/en", "validation")
    assert parse_tfds_spec("wikipedia/20230601.en:train[:10%]") == ("wikipedia/20230601.en", "train[:10%]")
    with pytest.raises(UserError, match="tfds:<name>"):
        parse_tfds_spec("No Such:train")


def test_prepared_dataset_reads_as_str(prepared):
    docs = tfds_documents("gptjax_test_text/b", prepared, text_field="body")
    # Records are stored shuffled; the blank body is dropped.
    assert sorted(docs) == sorted(["héllo wörld", "second document", "fourth"])
    assert all(type(d) is str for d in docs)
    assert tfds_record_count("gptjax_test_text/b", prepared) == 4
    assert tfds_documents("gptjax_test_text/b:validation", prepared, "title") == ["t0b"]
    head = tfds_documents("gptjax_test_text/b:train[:2]", prepared, "title")
    assert head == tfds_documents("gptjax_test_text/b", prepared, "title")[:2]


def test_text_field_choice(prepared):
    with pytest.raises(UserError, match=r"2 text features \['body', 'title'\].*data.tfds_text_field"):
        tfds_documents("gptjax_test_text/b", prepared)
    with pytest.raises(UserError, match="'n' is not a text feature"):
        tfds_documents("gptjax_test_text/b", prepared, text_field="n")
    assert sorted(tfds_documents("gptjax_test_text/b", prepared, "title")) == ["t0b", "t1b", "t2b", "t3b"]


def test_data_dir_from_environment(prepared, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", prepared)
    assert tfds_documents("gptjax_test_text/b:validation", None, "body") == ["héllo wörld"]


def test_bad_split_config_and_name(prepared):
    with pytest.raises(UserError, match="Unknown split 'test'"):
        tfds_documents("gptjax_test_text/b:test", prepared, "body")
    with pytest.raises(UserError, match=r"no config zz; its configs are \['a', 'b'\]"):
        tfds_documents("gptjax_test_text/zz", prepared, "body")
    with pytest.raises(UserError, match="no dataset no_such_dataset_xyz"):
        tfds_documents("no_such_dataset_xyz", prepared)


def test_unprepared_says_how_to_prepare(tmp_path, prepared):
    # Not timed: the no_network fixture refuses every connection, so nothing can wait on a download.
    for spec in ("lm1b", "tiny_shakespeare:train", "c4/en:validation"):
        name = spec.split(":")[0]
        with pytest.raises(UserError, match=f"not prepared under {tmp_path}.*`tfds build {name} "
                                            f"--file_format=array_record --data_dir DIR`.*TFDS_DATA_DIR"):
            tfds_documents(spec, str(tmp_path))
    # Config a exists in code but was never prepared beside config b.
    with pytest.raises(UserError, match="gptjax_test_text/a is not prepared"):
        tfds_record_count("gptjax_test_text/a", prepared)
    assert not any(tmp_path.iterdir()), "an unprepared read must not create anything"


def test_reads_without_builder_code_or_tensorflow(prepared):
    """The copied-folder case: a fresh process that never defined the builder."""
    code = ("import sys; from gptjax.data.tfds_source import tfds_documents; "
            "assert 'tensorflow' not in sys.modules; "
            f"print(sorted(tfds_documents('gptjax_test_text/b', {prepared!r}, 'title')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "['t0b', 't1b', 't2b', 't3b']"


@pytest.mark.parametrize("name", ["lm1b", "tiny_shakespeare"])
def test_mock_data_end_to_end(name, monkeypatch):
    # The mocked reader's batch method is installed without `self`, so batch reads fail under
    # the mock only; answer them one record at a time.
    from tensorflow_datasets.core.data_sources import base
    monkeypatch.setattr(base.BaseDataSource, "__getitems__", lambda self, keys: [self[k] for k in keys])
    with tfds.testing.mock_data(num_examples=7, policy=tfds.testing.MockPolicy.USE_CODE):
        docs = tfds_documents(f"{name}:train", None)
        expected = [r["text"] for r in tfds.data_source(name, split="train", download=False)]
        assert tfds_record_count(name, None) == 7
    expected = [t.decode() if isinstance(t, bytes) else t for t in expected]
    assert docs == [t for t in expected if t.strip()] and all(type(d) is str for d in docs)


def test_pretraining_from_a_prepared_tfds_dataset(prepared, tmp_path):
    from gptjax.config import load_config
    from gptjax.train import pretrain

    # The prepared set is tiny, so mix in synthetic text; the tokenizer is trained on both.
    config = load_config("configs/tiny.py", [
        "data.source=tfds:gptjax_test_text/b,synthetic", "data.weights=1,3", f"data.tfds_data_dir={prepared}",
        "data.tfds_text_field=body", "data.num_documents=300", "data.document_mask=true",
        "train.steps=4", "train.batch_size=4", "train.seq_len=16", "train.log_every=2", "model.n_layer=1"])
    from gptjax.data import corpus
    workdir = tmp_path / "run"
    workdir.mkdir()
    tokenizer = corpus.workdir_tokenizer(config.data, str(workdir), config.model.vocab_size)
    metas = corpus.prepare(config.data, str(workdir), tokenizer)  # streamed from the TFDS records
    tfds_train = next(m for m in metas if m["source"].startswith("tfds:") and m["split"] == "train")
    assert tfds_train["documents"] + sum(m["documents"] for m in metas
                                         if m["source"].startswith("tfds:") and m["split"] == "eval") == 3
    summary = pretrain(config, str(workdir), progress=False)
    assert [r["step"] for r in summary["history"]] == [1, 2, 4]
    from gptjax.data.tokenizer import Tokenizer
    tokenizer = Tokenizer.load(str(tmp_path / "run" / "tokenizer.model"))
    # Accented letters exist only in the TFDS half of the mixture; the tokenizer learned them as pieces.
    assert tokenizer.unk_id not in tokenizer.encode("héllo wörld")
    assert len(tokenizer.encode("wörld")) < len("wörld".encode())


def test_mock_data_drives_pretraining(tmp_path, monkeypatch):
    from tensorflow_datasets.core.data_sources import base

    from gptjax.config import load_config
    from gptjax.data.tokenizer import train_tokenizer
    from gptjax.data import synthetic
    from gptjax.train import pretrain

    monkeypatch.setattr(base.BaseDataSource, "__getitems__", lambda self, keys: [self[k] for k in keys])
    # Mock records are random strings; a tokenizer with byte fallback encodes any of them.
    tokenizer = train_tokenizer(iter(synthetic.documents(200)), 400, str(tmp_path / "tok"))
    config = load_config("configs/tiny.py", [
        "data.source=tfds:tiny_shakespeare", f"data.tokenizer={tokenizer.path}", "train.steps=3",
        "train.batch_size=2", "train.seq_len=16", "train.log_every=1", "model.n_layer=1"])
    with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
        summary = pretrain(config, str(tmp_path / "run"), progress=False)
    assert [r["step"] for r in summary["history"]] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in summary["history"])
