"""Config files, overrides and validation: every mistake names the key to change."""

import glob
import json
import os

import pytest

from gptjax.config import apply_overrides, base_config, config_from_dict, load_config, padded_vocab_size, validate
from gptjax.errors import UserError

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.py")))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_shipped_config_loads_and_documents_its_command(path):
    config = load_config(path)
    validate(config)
    with open(path) as f:
        source = f.read()
    # Each config's docstring gives the command that runs it.
    assert f"--config configs/{os.path.basename(path)}" in source


def test_paper_configs_hold_the_paper_numbers():
    gpt1 = load_config("configs/gpt1.py")
    m, t = gpt1.model, gpt1.train
    assert (m.block, m.n_layer, m.d_model, m.n_head, m.d_ff, m.max_len) == ("post_ln", 12, 768, 12, 3072, 512)
    assert (m.dropout, m.attn_dropout, m.init_std, m.scale_residual_init) == (0.1, 0.1, 0.02, False)
    assert (t.lr, t.warmup_steps, t.schedule, t.min_lr_ratio) == (2.5e-4, 2000, "cosine", 0.0)
    assert (t.batch_size, t.seq_len, t.weight_decay, t.grad_clip) == (64, 512, 0.01, 1.0)
    assert (t.b1, t.b2, t.eps) == (0.9, 0.999, 1e-8)
    for name, (layers, width) in {"small": (12, 768), "medium": (24, 1024), "large": (36, 1280),
                                  "xl": (48, 1600)}.items():
        c = load_config(f"configs/gpt2_{name}.py")
        assert (c.model.block, c.model.n_layer, c.model.d_model, c.model.max_len) == ("pre_ln", layers, width, 1024)
        assert c.model.vocab_size == 50257 and c.model.vocab_pad_multiple == 128
        assert c.model.scale_residual_init and c.model.d_model // c.model.n_head == 64


def test_overrides_are_typed():
    config = load_config("configs/tiny.py", ["train.steps=7", "train.lr=1e-3", "model.dtype=bfloat16",
                                             "model.attention=xla", "train.seed=3", "train.log_every=2",
                                             "train.eval_every=5", "train.batch_size=4", "train.seq_len=64"])
    assert config.train.steps == 7 and isinstance(config.train.steps, int)
    assert config.train.lr == 1e-3 and config.model.dtype == "bfloat16"
    assert config.train.seq_len == 64 and config.train.batch_size == 4
    apply_overrides(config, ["train.lr=1"])  # an int literal is a valid float
    assert isinstance(config.train.lr, float) and config.train.lr == 1.0
    apply_overrides(config, ["model.scale_residual_init=false"])
    assert config.model.scale_residual_init is False


@pytest.mark.parametrize("override, message", [
    ("train.stepz=5", "unknown config key 'train.stepz'; did you mean 'train.steps'?"),
    ("nope.steps=5", "unknown config key 'nope.steps'"),
    ("train=5", "unknown config key 'train'"),
    ("train.steps=many", "config key 'train.steps' expects int, got 'many'"),
    ("train.steps=2.5", "config key 'train.steps' expects an integer, got 2.5"),
    ("train.lr=fast", "config key 'train.lr' expects float, got 'fast'"),
    ("model.scale_residual_init=maybe", "config key 'model.scale_residual_init' expects true or false"),
    ("train.steps", "must look like --config.section.key=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(UserError) as e:
        load_config("configs/tiny.py", [override])
    assert message in str(e.value)


@pytest.mark.parametrize("override, field", [
    ("model.n_head=3", "model.n_head"),
    ("train.seq_len=4096", "model.max_len"),
    ("model.attention=flash", "model.attention"),
    ("model.block=sandwich", "model.block"),
    ("model.dtype=int8", "model.dtype"),
    ("train.batch_size=0", "train.batch_size"),
    ("model.dropout=1.5", "model.dropout"),
])
def test_inconsistent_values_are_rejected_before_any_work(override, field):
    with pytest.raises(UserError, match=field.replace(".", r"\.")):
        load_config("configs/tiny.py", [override])


def test_missing_file_and_unknown_key_in_a_config_file(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(str(tmp_path / "absent.py"))
    bad = tmp_path / "bad.py"
    bad.write_text("from gptjax.config import base_config\n"
                   "def get_config():\n    c = base_config()\n    c.model.n_layers = 2\n    return c\n")
    with pytest.raises(UserError, match="n_layers"):
        load_config(str(bad))


def test_json_round_trip():
    config = load_config("configs/gpt1.py", ["train.steps=11"])
    again = config_from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()
    assert base_config().to_dict().keys() == again.to_dict().keys()


def test_padded_vocab_size():
    assert padded_vocab_size(97, 128) == 128
    assert padded_vocab_size(128, 128) == 128
    assert padded_vocab_size(129, 128) == 256
    assert padded_vocab_size(50257, 1) == 50257


# The key `task_data` was called `source` (beside data.source, the pretraining text).
RENAMED = ("config key 'source' is now 'task_data' (the fine-tuning / eval task data; pretraining text "
           "stays data.source): set task_data instead")


def test_the_old_task_data_key_is_refused_with_its_new_name(tmp_path):
    from gptjax.cli import split_overrides

    for argv in (["--config.source=tsv:x"], ["--config.source", "tsv:x"]):
        with pytest.raises(UserError) as e:
            load_config("configs/glue.py", split_overrides(argv))
        assert str(e.value) == RENAMED
    assert load_config("configs/glue.py", ["task_data=tsv:x"]).task_data == "tsv:x"
    assert load_config("configs/tiny.py", ["data.source=synthetic,synthetic"]).data.source == "synthetic,synthetic"
    for line in ('c.source = "tsv:x"', 'c["source"] = "tsv:x"', 'c.update(source="tsv:x")'):
        path = tmp_path / "old.py"
        path.write_text(f"from gptjax.config import base_config\ndef get_config():\n    c = base_config()\n"
                        f"    {line}\n    return c\n")
        with pytest.raises(UserError) as e:
            load_config(str(path))
        assert str(e.value) == f"{path}: {RENAMED}", line
    # Only the top level's `source` was renamed: in another section it is just an unknown key.
    path.write_text("from gptjax.config import base_config\ndef get_config():\n    c = base_config()\n"
                    "    c.train.source = 'x'\n    return c\n")
    with pytest.raises(UserError, match="sets unknown config key 'source'$"):
        load_config(str(path))
    with pytest.raises(UserError, match=r"^unknown config key 'train\.source'"):
        apply_overrides(base_config(), ["train.source=x"])


def _old_run_folder(tmp_path, task_data="tsv:/data/glue"):
    """A fine-tuning run's folder as written before the rename: config.json with a top-level "source"."""
    values = load_config("configs/glue.py", ["task=wnli", f"task_data={task_data}"]).to_dict()
    values["source"] = values.pop("task_data")
    (tmp_path / "config.json").write_text(json.dumps(values))
    return values


def test_a_run_saved_before_the_rename_reads_its_task_data(tmp_path):
    from gptjax import run_folder
    from gptjax.evaluate import data_settings

    old = _old_run_folder(tmp_path)
    saved = run_folder.saved_config(str(tmp_path))
    assert saved["task_data"] == "tsv:/data/glue" and "source" not in saved and saved["task"] == "wnli"
    path = str(tmp_path / "config.json")
    config = config_from_dict(json.loads(open(path).read()), source=path)  # from_pretrained's read
    assert config.task_data == "tsv:/data/glue" and config.data.source == old["data"]["source"]
    assert "source" not in config
    assert config_from_dict(saved, source=path).to_dict() == config.to_dict()
    # Eval of that run reads the task where the run did, unless the eval config names other task data.
    assert data_settings(config, load_config("configs/glue.py"))["task_data"] == "tsv:/data/glue"
    assert data_settings(config, load_config("configs/glue.py", ["task_data=tfds"]))["task_data"] == "tfds"
    # Both names at once were never written by any run: the file is named with the one clear error.
    with pytest.raises(UserError) as e:
        config_from_dict({**old, "task_data": "tfds"}, source=path)
    assert str(e.value) == f"{path}: {RENAMED}"


def test_resuming_a_run_saved_before_the_rename_reports_no_change(tmp_path):
    from gptjax.resume import config_changes, settings_of

    old = _old_run_folder(tmp_path)  # a checkpoint's meta "config" holds the same dict as config.json
    same = load_config("configs/glue.py", ["task=wnli", "task_data=tsv:/data/glue"])
    assert config_changes(old, settings_of(same)) == {}
    other = load_config("configs/glue.py", ["task=wnli", "task_data=tfds", "train.lr=1e-4"])
    assert config_changes(old, settings_of(other)) == {"task_data": ("tsv:/data/glue", "tfds"),
                                          "train.lr": (old["train"]["lr"], 1e-4)}
    assert "source" in old  # the saved dict itself is read, not changed
