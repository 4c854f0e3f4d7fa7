"""Hugging Face tokenizers (GPT-2 byte-level BPE, openai-gpt </w> BPE) through HFTokenizer: ids equal to
transformers' AutoTokenizer, the added control, eos and pad tokens, saving, and bad inputs."""

import json
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tokenizers

transformers = pytest.importorskip("transformers")

from hf_folders import corpus, make_folders, ref_ids, reference  # noqa: E402

from gptjax.data.hf_tokenizer import EOS_TOKEN, PAD_TOKEN, HFTokenizer, load_any  # noqa: E402
from gptjax.data.tokenizer import CONTROL_SYMBOLS, Tokenizer, check_vocab, train_tokenizer  # noqa: E402
from gptjax.errors import UserError  # noqa: E402

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "Punctuation ~`@#$%^&*()_+-=[]{}|\\;:'\",.<>/? and 'quotes' \"here\"",
    "Digits 0123456789, 3.14159 and 1,000,000; phone 555-0199.",
    "runs   of    spaces and\ttabs\t\there",
    "newlines\nand\n\nblank lines\r\nwindows",
    "   leading and trailing spaces   ",
    "Accents: café naïve résumé Ångström Crème brûlée",
    "CJK: 日本語のテキスト 中文 한국어",
    "Emoji: 😀 👍🏽 🧑‍🚀 ❤️",
    "",
    " ",
    "MiXeD CaSe WORDS and wordsss",
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return make_folders(tmp_path_factory.mktemp("hf"), transformers)


def base_vocab(folder):
    return len(json.loads((folder / "vocab.json").read_text(encoding="utf-8")))


FOLDERS = ["gpt2-files", "gpt2-json", "openai-files", "openai-json"]


@pytest.mark.parametrize("name", FOLDERS)
def test_ids_equal_transformers(folders, name):
    tok, ref = HFTokenizer.load(folders[name]), reference(folders[name])
    expected_class = "GPT2Tokenizer" if name.startswith("gpt2") else "OpenAIGPTTokenizer"
    assert type(ref).__name__ == expected_class
    ids = [tok.encode(t) for t in TEXTS]
    assert ids == [ref_ids(ref, t) for t in TEXTS]
    assert tok.encode_batch(TEXTS) == ids
    assert [tok.decode(i) for i in ids] == [ref.decode(i) for i in ids]
    assert tok.decode_batch(ids) == [ref.decode(i) for i in ids]
    assert tok.decode_batch([np.asarray(i, np.int32) for i in ids]) == tok.decode_batch(ids)
    if name.startswith("gpt2"):
        assert [tok.decode(i) for i in ids] == TEXTS  # byte-level BPE round-trips any text
    else:
        assert tok.decode(tok.encode("Café, naïve")) == "cafe , naive"  # lowercased, accents stripped
        assert tok.unk_id in tok.encode("日本") and "<unk>" in tok.decode(tok.encode("日本"))


@pytest.mark.parametrize("kind", ["gpt2", "openai"])
def test_kind_from_vocabulary_alone(folders, kind):
    tok = HFTokenizer.load(folders[f"{kind}-bare"])
    ref = reference(folders[f"{kind}-files"])
    assert [tok.encode(t) for t in TEXTS] == [ref_ids(ref, t) for t in TEXTS]


def test_openai_vocab_without_unk(folders, tmp_path):
    folder = tmp_path / "no-unk"
    shutil.copytree(folders["openai-files"], folder)
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    del vocab["<unk>"]
    vocab = {t: i for i, t in enumerate(sorted(vocab, key=vocab.get))}
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    tok, ref = HFTokenizer.load(folder), transformers.AutoTokenizer.from_pretrained(folder)
    assert tok.unk_id == ref.unk_token_id == len(vocab) and tok.base_vocab_size == len(vocab) + 1
    known = ["the quick brown fox jumps over the lazy dog.", "Digits 0123456789, 3.14"]
    assert [tok.encode(t) for t in known] == [ref_ids(ref, t) for t in known]
    # transformers fails on characters outside the vocabulary here; gptjax maps them to <unk>.
    assert tok.encode("日本") == [tok.unk_id, tok.unk_id]


@pytest.mark.parametrize("name", FOLDERS)
def test_control_eos_pad_ids(folders, name):
    tok = HFTokenizer.load(folders[name])
    base = base_vocab(folders[name])
    vocab = json.loads((folders[name] / "vocab.json").read_text(encoding="utf-8"))
    assert tok.base_vocab_size == base
    assert [tok.start_id, tok.delim_id, tok.extract_id] == [base, base + 1, base + 2]
    if name.startswith("gpt2"):
        assert tok.eos_id == tok.unk_id == vocab[EOS_TOKEN]
        assert tok.added_tokens == {"<start>": base, "<delim>": base + 1, "<extract>": base + 2, PAD_TOKEN: base + 3}
        assert tok.pad_id == base + 3 and tok.vocab_size == base + 4
    else:
        # openai-gpt has no end-of-document token: <|endoftext|> is added, then <pad>.
        assert tok.unk_id == vocab["<unk>"]
        assert tok.added_tokens == {"<start>": base, "<delim>": base + 1, "<extract>": base + 2,
                                    EOS_TOKEN: base + 3, PAD_TOKEN: base + 4}
        assert (tok.eos_id, tok.pad_id, tok.vocab_size) == (base + 3, base + 4, base + 5)
    assert len({tok.pad_id, tok.eos_id, tok.start_id, tok.delim_id, tok.extract_id}) == 5


@pytest.mark.parametrize("name", ["gpt2-files", "openai-json"])
def test_tokens_added_once(folders, name, tmp_path):
    first = HFTokenizer.load(folders[name])
    again = HFTokenizer.load(folders[name])
    first.save(tmp_path / "tokenizer.json")
    from_save = HFTokenizer.load(tmp_path / "tokenizer.json")
    first.save_pretrained(tmp_path / "pretrained")
    from_pretrained = HFTokenizer.load(tmp_path / "pretrained")
    twice = tmp_path / "twice"
    from_pretrained.save_pretrained(twice)
    for tok in (again, from_save, from_pretrained, HFTokenizer.load(twice)):
        assert tok.vocab_size == first.vocab_size and tok.base_vocab_size == first.base_vocab_size
        assert tok.added_tokens == first.added_tokens
        assert (tok.pad_id, tok.unk_id, tok.eos_id, tok.start_id, tok.delim_id, tok.extract_id) == (
            first.pad_id, first.unk_id, first.eos_id, first.start_id, first.delim_id, first.extract_id)
        assert tok.encode_batch(TEXTS) == first.encode_batch(TEXTS)


@pytest.mark.parametrize("name", ["gpt2-json", "openai-files"])
def test_literal_special_tokens_are_text(folders, name):
    tok, ref = HFTokenizer.load(folders[name]), reference(folders[name])
    text = f"a {' '.join(CONTROL_SYMBOLS)} b {EOS_TOKEN}<pad><unk>c"
    ids = tok.encode(text)
    protected = {tok.start_id, tok.delim_id, tok.extract_id, tok.eos_id, tok.pad_id}
    assert not protected & set(ids) and not protected & set(tok.encode_batch([text])[0])
    assert tok.encode("<start>") != [tok.start_id]
    # Same as transformers with special tokens split; without, GPT-2 reads a literal <|endoftext|> as eos.
    assert ids == ref_ids(ref, text, split_special_tokens=True)
    if name.startswith("gpt2"):
        assert tok.eos_id in ref_ids(ref, text)
        assert tok.decode(ids) == text


def test_decode_drops_pad_eos_control_and_shows_unknown_ids(folders):
    for name in ("gpt2-files", "openai-files"):
        tok = HFTokenizer.load(folders[name])
        words = tok.encode("Hello world")
        ids = [tok.start_id, *words, tok.delim_id, *words, tok.extract_id, tok.eos_id, tok.pad_id, tok.pad_id]
        assert tok.decode(ids) == tok.decode(words + words)
        assert tok.decode(np.asarray(ids, np.int64)) == tok.decode(ids)
        unk_text = tok.backend.id_to_token(tok.unk_id)
        assert tok.decode([tok.vocab_size + 7]) == tok.decode([-1]) == unk_text
    openai = HFTokenizer.load(folders["openai-files"])
    assert openai.decode([openai.unk_id]) == "<unk>"
    assert openai.decode([]) == openai.decode([openai.pad_id]) == ""


def test_check_vocab_accepts_hf_tokenizer(folders):
    tok = HFTokenizer.load(folders["gpt2-files"])
    check_vocab(tok.vocab_size, tok)
    with pytest.raises(UserError, match="model.vocab_size"):
        check_vocab(tok.vocab_size - 1, tok)


@pytest.mark.parametrize("name", ["gpt2-files", "openai-files"])
def test_saved_files_load_in_tokenizers_and_transformers(folders, name, tmp_path):
    tok = HFTokenizer.load(folders[name])
    ids = tok.encode_batch(TEXTS)
    controls = [tok.start_id, tok.delim_id, tok.extract_id]

    tok.save(tmp_path / "tokenizer.json")
    raw = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert [e.ids for e in raw.encode_batch(TEXTS, add_special_tokens=False)] == ids
    assert [raw.token_to_id(s) for s in CONTROL_SYMBOLS] == controls
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    assert [ref_ids(fast, t) for t in TEXTS] == ids
    assert fast.convert_tokens_to_ids(list(CONTROL_SYMBOLS)) == controls

    # Saved into the model's folder (config.json names gpt2/openai-gpt): tokenizer_config.json decides.
    out = tmp_path / "pretrained"
    out.mkdir()
    shutil.copy(folders[name] / "config.json", out / "config.json")
    tok.save_pretrained(out)
    auto = transformers.AutoTokenizer.from_pretrained(out)
    assert [ref_ids(auto, t) for t in TEXTS] == ids
    assert auto.convert_tokens_to_ids(list(CONTROL_SYMBOLS)) == controls
    assert (auto.eos_token_id, auto.pad_token_id, auto.unk_token_id) == (tok.eos_id, tok.pad_id, tok.unk_id)
    assert len(auto) == tok.vocab_size
    assert ref_ids(auto, "x <start> y") == tok.encode("x <start> y")
    assert auto.decode(ids[0]) == tok.decode(ids[0])


def test_pickle_round_trip(folders):
    for name in ("gpt2-json", "openai-files"):
        tok = HFTokenizer.load(folders[name])
        back = pickle.loads(pickle.dumps(tok))
        assert back.path == tok.path and repr(back) == repr(tok)
        assert back.encode_batch(TEXTS) == tok.encode_batch(TEXTS)
        assert back.encode("<start> <|endoftext|>") == tok.encode("<start> <|endoftext|>")
        assert back.added_tokens == tok.added_tokens and back.vocab_size == tok.vocab_size
        assert (back.pad_id, back.eos_id, back.unk_id, back.start_id) == (tok.pad_id, tok.eos_id, tok.unk_id,
                                                                          tok.start_id)
        ids = tok.encode(TEXTS[0]) + [tok.eos_id, tok.pad_id]
        assert back.decode(ids) == tok.decode(ids)


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("spm") / "sp"
    train_tokenizer(iter(corpus(300, seed=1)), 400, prefix)
    return prefix.parent / "sp.model"


def one_line_error(fn, *needles):
    with pytest.raises(UserError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, msg
    return msg


def test_bad_inputs(folders, sentencepiece_model, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(lambda: HFTokenizer.load(empty), "tokenizer.json", "vocab.json", "merges.txt", "save_pretrained")

    spm_folder = tmp_path / "spm_folder"
    spm_folder.mkdir()
    shutil.copy(sentencepiece_model, spm_folder / "tok.model")
    one_line_error(lambda: HFTokenizer.load(spm_folder), "tokenizer.json", "tok.model", "SentencePiece model")

    one_line_error(lambda: HFTokenizer.load(sentencepiece_model), "use it as a SentencePiece model")
    renamed = tmp_path / "weights.bin"
    shutil.copy(sentencepiece_model, renamed)
    one_line_error(lambda: HFTokenizer.load(renamed), "use it as a SentencePiece model")

    for i, content in enumerate(["not json at all", '{"model": {"type": "Nope"}}', "{", "[1, 2]"]):
        bad = tmp_path / f"bad{i}" / "tokenizer.json"
        bad.parent.mkdir()
        bad.write_text(content)
        for target in (bad, bad.parent):
            one_line_error(lambda: HFTokenizer.load(target), "not a tokenizer.json", "save_pretrained")
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    one_line_error(lambda: HFTokenizer.load(binary), "not a tokenizer.json")

    one_line_error(lambda: HFTokenizer.load(tmp_path / "missing"), "does not exist")

    other = tmp_path / "llama"
    shutil.copytree(folders["gpt2-bare"], other)
    (other / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    one_line_error(lambda: HFTokenizer.load(other), "LlamaTokenizer", "tokenizer.json")

    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "vocab.json").write_text(json.dumps({"a": 0, "b": 1, "ab": 2}))
    (unknown / "merges.txt").write_text("#version: 0.2\na b\n")
    one_line_error(lambda: HFTokenizer.load(unknown), "tokenizer_class", "GPT2Tokenizer")

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "vocab.json").write_text("{ nope")
    (broken / "merges.txt").write_text("a b\n")
    one_line_error(lambda: HFTokenizer.load(broken), "vocab.json", "merges.txt")


def test_load_any(folders, sentencepiece_model, tmp_path):
    assert isinstance(load_any(sentencepiece_model), Tokenizer)
    assert isinstance(load_any(folders["gpt2-files"]), HFTokenizer)
    assert isinstance(load_any(folders["openai-json"] / "tokenizer.json"), HFTokenizer)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    one_line_error(lambda: load_any(text), "'.model'", "tokenizer.json")
    one_line_error(lambda: load_any(tmp_path / "nothing.model"), "does not exist")


def test_module_imports_neither_transformers_nor_is_imported_by_tokenizer():
    code = ("import sys, gptjax.data.tokenizer; assert 'gptjax.data.hf_tokenizer' not in sys.modules; "
            "import gptjax.data.hf_tokenizer; assert 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bench_data_times_both_backends_on_the_same_documents(folders, tmp_path, capsys):
    from gptjax.bench import cli as bench

    assert bench.main(["data", "--config", "configs/tiny.py", "--workdir", str(tmp_path), "--steps", "2",
                       "--hf-tokenizer", str(folders["gpt2-json"]), "--config.data.num_documents=200",
                       "--config.train.batch_size=4", "--config.train.seq_len=64"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = {k.strip(): float(v.split()[0].replace(",", "")) for k, v in
            (line.rsplit(": ", 1) for line in out if ": " in line and "tokens/s" in line)}
    names = ["loader from prepared files", "on-the-fly tokenization", "Hugging Face tokenizers (HFTokenizer)",
             "transformers fast tokenizer"]
    assert set(names) <= set(rows) and all(rows[name] > 0 for name in names), out
