import json
import pickle
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

transformers = pytest.importorskip("transformers")

from gptjax.data.hf_tokenizer import EOS_TOKEN, PAD_TOKEN, HFTokenizer, load_any  # noqa: E402
from gptjax.data.tokenizer import CONTROL_SYMBOLS, Tokenizer, check_vocab, train_tokenizer  # noqa: E402
from gptjax.errors import UserError  # noqa: E402

VOCAB = 600

SUBJECTS = ["The model", "A small network", "Our tokenizer", "Every batch", "The quick brown fox", "She",
            "The café owner", "A naïve reader", "The team", "Nobody"]
VERBS = ["learns", "reads", "counts", "jumps over", "trains on", "writes", "splits", "remembers", "ignores"]
OBJECTS = ["the lazy dog", "42 tokens", "3.14 apples", "the data set", "long documents", "résumé files",
           "10,000 lines", "a user's question", "the year 2024", "e-mail addresses (mostly)"]
ENDINGS = [".", "!", "?", "; then it stops.", ", doesn't it?", " -- really.", ": yes/no.", " [citation needed]."]

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


def corpus(n=400, seed=0):
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        line = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}{rng.choice(ENDINGS)}"
        if rng.random() < 0.3:
            price = f"{rng.randint(0, 999)}.{rng.randint(0, 99):02d}"
            day, month = rng.randint(1, 28), rng.randint(1, 12)
            line += f" It costs ${price} on {day}/{month}."
        lines.append(line)
    return lines


def train_gpt2_style(folder, lines):
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=[EOS_TOKEN], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.model.save(str(folder))  # vocab.json + merges.txt, as in a GPT-2 checkpoint


def train_openai_style(folder, lines):
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<unk>"], end_of_word_suffix="</w>", show_progress=False))
    tok.model.save(str(folder))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """kind -> folder: vocab.json + merges.txt + config.json ("-files"), and the same plus the
    tokenizer.json + tokenizer_config.json that transformers' save_pretrained writes ("-json")."""
    lines = corpus()
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for kind, train, config in (
            ("gpt2", train_gpt2_style, transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=VOCAB,
                                                                 bos_token_id=0, eos_token_id=0)),
            ("openai", train_openai_style, transformers.OpenAIGPTConfig(n_layer=1, n_head=2, n_embd=16,
                                                                          vocab_size=VOCAB))):
        files = root / f"{kind}-files"
        files.mkdir()
        train(files, lines)
        config.save_pretrained(files)
        with_json = root / f"{kind}-json"
        shutil.copytree(files, with_json)
        transformers.AutoTokenizer.from_pretrained(files).save_pretrained(with_json)
        bare = root / f"{kind}-bare"  # no config files: the kind comes from the vocabulary
        bare.mkdir()
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(files / name, bare / name)
        out.update({f"{kind}-files": files, f"{kind}-json": with_json, f"{kind}-bare": bare})
    assert (out["gpt2-json"] / "tokenizer.json").is_file() and not (out["gpt2-files"] / "tokenizer.json").exists()
    return out


_refs = {}


def reference(folder):
    if folder not in _refs:
        _refs[folder] = transformers.AutoTokenizer.from_pretrained(folder)
    return _refs[folder]


def ref_ids(ref, text, **kw):
    return ref(text, add_special_tokens=False, **kw)["input_ids"]


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


# ---------------------------------------------------------------------------------------------
# A released-model folder (weights + tokenizer files) through GPT.from_pretrained and convert.

def _model_folder(folders, tmp_path, kind):
    """A random tiny transformers model saved beside the kind's tokenizer files."""
    torch = pytest.importorskip("torch")
    folder = tmp_path / f"{kind}-model"
    shutil.copytree(folders[f"{kind}-json"], folder)
    vocab = HFTokenizer.load(str(folder)).base_vocab_size  # the model's rows: the tokenizer's own ids
    torch.manual_seed(0)
    scale = 0.3 if kind == "gpt2" else 0.1  # post-LN blocks saturate sooner
    if kind == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=vocab, bos_token_id=0, eos_token_id=0))
    else:
        model = transformers.OpenAIGPTLMHeadModel(transformers.OpenAIGPTConfig(
            n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=vocab, afn="gelu"))
    with torch.no_grad():  # far from the small default init, so greedy decoding does not repeat one token
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * scale + (1.0 if ".ln_" in name and name.endswith("weight") else 0.0))
    model.eval().save_pretrained(folder)
    return torch, model, folder, vocab


@pytest.mark.parametrize("kind", ["gpt2", "openai"])
def test_a_model_folder_brings_its_tokenizer_and_generates_as_transformers(folders, tmp_path, kind, capsys):
    from gptjax.api import GPT

    torch, model, folder, vocab = _model_folder(folders, tmp_path, kind)
    ours = GPT.from_pretrained(str(folder))
    ref = reference(folder)
    text = "The quick brown fox jumps over the lazy dog, doesn't it?"
    prompt = ref_ids(ref, text)
    assert isinstance(ours.tokenizer, HFTokenizer) and ours.tokenizer.encode(text) == prompt
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=8, do_sample=False, pad_token_id=0)
    expected = out[0, len(prompt):].tolist()
    got = ours.generate(prompt, max_new_tokens=8, temperature=0.0)
    assert got[:len(expected)] == expected  # transformers stops early only at its eos
    with torch.no_grad():  # and the scores behind the choices are the same, not just their argmax
        ref_logits = model(torch.tensor([prompt])).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours.logits([prompt])), ref_logits, atol=1e-4, rtol=1e-4)
    # Text in, text out: the continuation decoded by the folder's own tokenizer.
    continuation = ours.generate(text, max_new_tokens=8, temperature=0.0)
    assert continuation == ours.tokenizer.decode(prompt + got)[len(ours.tokenizer.decode(prompt)):] or \
        ours.tokenizer.eos_id in got
    # and `gptjax generate` on the folder prints the same continuation
    from gptjax import cli
    capsys.readouterr()
    assert cli.main(["generate", "--workdir", str(folder), "--prompt", text, "--max-new-tokens", "8",
                     "--temperature", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"prompt": text, "completion": continuation}


@pytest.mark.parametrize("kind", ["gpt2", "openai"])
def test_convert_carries_the_tokenizer_both_ways(folders, tmp_path, kind):
    from gptjax import cli
    from gptjax.api import GPT

    _, _, folder, vocab = _model_folder(folders, tmp_path, kind)
    workdir, export = tmp_path / "workdir", tmp_path / "export"
    assert cli.main(["convert", "--from-hf", str(folder), "--to", str(workdir)]) == 0
    assert (workdir / "tokenizer.json").is_file()
    text = "Every batch reads 42 tokens; MiXeD CaSe too."
    expected = ref_ids(reference(folder), text)
    assert GPT.from_pretrained(str(workdir)).tokenizer.encode(text) == expected
    assert cli.main(["convert", "--from", str(workdir), "--to-hf", str(export)]) == 0
    again = transformers.AutoTokenizer.from_pretrained(str(export))
    assert ref_ids(again, text) == expected
    control = [again.convert_tokens_to_ids(t) for t in CONTROL_SYMBOLS]
    assert control == [HFTokenizer.load(str(folder)).added_tokens[t] for t in CONTROL_SYMBOLS]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(export))
    assert loaded.config.vocab_size == vocab


# ---------------------------------------------------------------------------------------------
# The paper's recipe on a released model: added token rows, the head, fine-tune and eval.

@pytest.mark.parametrize("kind", ["gpt2", "openai"])
def test_added_tokens_grow_the_embedding_and_task_logits_equal_transformers(folders, tmp_path, kind):
    from flax import nnx

    from gptjax import checkpoint, finetune as ft
    from gptjax.api import GPT
    from gptjax.config import load_config
    from gptjax.tasks import get_task, synthetic_split, transforms

    torch, model, folder, vocab = _model_folder(folders, tmp_path, kind)
    pretrained = GPT.from_pretrained(str(folder))
    tok = pretrained.tokenizer
    config = ft.effective_config(load_config("configs/tiny.py", ["task=synthetic_paraphrase", "model.dtype=float32",
                                                                 "finetune.eval_batch_size=8"]), pretrained)
    grown = ft.grow_for_added_tokens(config, tok)
    assert grown == len(tok.added_tokens) == tok.vocab_size - vocab and config.model.vocab_size == tok.vocab_size
    task = get_task("synthetic_paraphrase")
    runner = ft.TaskRunner(config, task, 1, pad_id=tok.pad_id)
    runner.load_decoder(nnx.state(pretrained.module, nnx.Param), added_from=vocab)
    ours = checkpoint.flatten(runner.state.params)
    source = checkpoint.flatten(nnx.state(pretrained.module, nnx.Param))
    for name, value in source.items():  # every pretrained number is there, bitwise
        value, loaded = np.asarray(value), np.asarray(ours[f"decoder.{name}"])
        if name == "wte":
            np.testing.assert_array_equal(loaded[:vocab], value[:vocab])
            added = loaded[vocab:vocab + grown]
            assert added.std() == pytest.approx(config.model.init_std, rel=0.5) and np.abs(added).min() > 0
        else:
            np.testing.assert_array_equal(loaded, value)
    assert sorted(k for k in ours if not k.startswith("decoder.")) == ["head_bias", "head_kernel"]

    # The hand computation in transformers: the resized model with our added rows, its final hidden
    # state at each extract position, times W_y plus b, summed over the two orders of the pair.
    enc = transforms.encode(task, synthetic_split(task, "validation", size=8), tok, 64)
    model.resize_token_embeddings(tok.vocab_size)
    with torch.no_grad():
        model.get_input_embeddings().weight[vocab:] = torch.tensor(np.asarray(ours["decoder.wte"])[vocab:tok.vocab_size])
        tokens = torch.tensor(enc.tokens.reshape(-1, enc.tokens.shape[-1]), dtype=torch.long)
        hidden = model(tokens, output_hidden_states=True).hidden_states[-1].numpy()
    states = hidden[np.arange(len(tokens)), enc.extract.reshape(-1)].reshape(*enc.extract.shape, -1)
    w, b = np.asarray(ours["head_kernel"]), np.asarray(ours["head_bias"])
    expected = (states @ w + b).sum(1)
    np.testing.assert_allclose(runner.logits(enc), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["gpt2", "openai"])
def test_finetune_then_eval_from_a_model_folder_on_a_glue_tsv_folder(folders, tmp_path, kind, capsys):
    from glue_folder import glue_folder

    from gptjax import cli

    _, _, folder, vocab = _model_folder(folders, tmp_path, kind)
    glue = glue_folder(str(tmp_path / "glue"), 146)  # WNLI's official test size
    run = tmp_path / "run"
    common = ["--config", "configs/glue.py", "--config.task=wnli", f"--config.source=tsv:{glue}",
              "--workdir", str(run), "--config.finetune.eval_batch_size=8", "--config.model.dtype=float32"]
    capsys.readouterr()
    assert cli.main(["finetune", *common, f"--config.init_from={folder}", "--no-progress",
                     "--config.finetune.epochs=1", "--config.train.batch_size=8"]) == 0
    out = capsys.readouterr().out
    added = HFTokenizer.load(str(folder)).added_tokens
    assert f"and {len(added)} token-embedding rows (<start>, <delim>, <extract>" in out
    assert (run / "tokenizer.json").is_file() and not (run / "tokenizer.model").exists()
    assert cli.main(["eval", *common]) == 0
    metrics = json.loads((run / "eval" / "wnli" / "metrics.json").read_text())
    best = json.loads((run / "best.json").read_text())
    # eval reloads the run (its tokenizer.json, its grown embedding) and scores what training scored
    assert metrics["splits"]["validation"]["scores"] == best["scores"]["validation"]
    submission = (run / "eval" / "glue_submission" / "WNLI.tsv").read_text().splitlines()
    assert submission[0] == "index\tprediction" and len(submission) == 147

    # The fine-tuned decoder (best epoch, head left out) exports with its grown embedding and tokenizer.
    torch = pytest.importorskip("torch")
    from gptjax import checkpoint
    from gptjax.api import GPT
    from gptjax.config import load_config
    from gptjax.evaluate import FinetunedPredictor

    export = tmp_path / "export"
    assert cli.main(["convert", "--from", str(run), "--to-hf", str(export)]) == 0
    tok = HFTokenizer.load(str(folder))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(export)).eval()
    assert loaded.config.vocab_size == tok.vocab_size == vocab + len(added)
    best = FinetunedPredictor(str(run), load_config("configs/glue.py", ["task=wnli"])).predictor.params
    trained = np.asarray(checkpoint.flatten(best)["decoder.wte"])[:tok.vocab_size]
    np.testing.assert_array_equal(loaded.get_input_embeddings().weight.detach().numpy(), trained)
    again = transformers.AutoTokenizer.from_pretrained(str(export))
    text = "The quick brown fox jumps over the lazy dog"
    assert ref_ids(again, text) == ref_ids(reference(folder), text)
    assert [again.convert_tokens_to_ids(t) for t in CONTROL_SYMBOLS] == [added[t] for t in CONTROL_SYMBOLS]
    ids = [added["<start>"], *ref_ids(again, text), added["<extract>"]]
    with torch.no_grad():
        theirs = loaded(torch.tensor([ids])).logits.numpy()
    np.testing.assert_allclose(np.asarray(GPT.from_pretrained(str(run)).logits([ids])), theirs, atol=1e-4, rtol=1e-4)
    step = json.loads((run / "best.json").read_text())["step"]
    np.testing.assert_array_equal(np.asarray(GPT.from_pretrained(str(run / "checkpoints" / str(step))).module.wte[...])
                                  [:tok.vocab_size], trained)


@pytest.mark.parametrize("kind", ["gpt2", "openai"])
def test_zero_and_few_shot_scoring_from_a_model_folder(folders, tmp_path, kind, capsys):
    """Continuation log-probabilities equal transformers' on the same split of each prompt. GPT-2's
    contexts start with its eos; openai-gpt has no eos among its rows, so its contexts start with
    their own first token."""
    from gptjax import cli, zero_shot
    from gptjax.api import GPT
    from gptjax.tasks import get_task, synthetic_split

    torch, model, folder, vocab = _model_folder(folders, tmp_path, kind)
    ours, ref = GPT.from_pretrained(str(folder)), reference(folder)
    start = [ref.eos_token_id] if kind == "gpt2" else []
    assert zero_shot.document_start(ours) == start
    task = get_task("synthetic_sentiment")
    examples, train = synthetic_split(task, "validation", size=6), synthetic_split(task, "train", size=8)
    _, preds = zero_shot.evaluate(ours, task, examples, mode="few_shot", shots=2, train_examples=train, batch_size=4)
    contexts, continuations, expected = [], [], []
    for prompt, choices in zero_shot.build_prompts(task, examples, shots=2, train_examples=train):
        for choice in choices:
            head, whole = ref_ids(ref, prompt), ref_ids(ref, prompt + choice)
            n = next(i for i in range(len(whole)) if i >= len(head) or head[i] != whole[i] or i == len(whole) - 1)
            n = max(n, 0 if start else 1)
            context, continuation = start + whole[:n], whole[n:]
            # The model's 64 positions hold every token but the last, which is only predicted.
            context = context[max(0, len(context) + len(continuation) - 65):]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([(context + continuation)[:-1]])).logits[0].double(), -1)
            expected.append(sum(float(logp[len(context) - 1 + i, t]) for i, t in enumerate(continuation)))
            contexts.append(context)
            continuations.append(continuation)
    got, _ = zero_shot.continuation_logprobs(ours, contexts, continuations, batch_size=4)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert preds.tolist() == np.reshape(expected, (6, 2)).argmax(1).tolist()

    capsys.readouterr()  # and end to end through the CLI, from the folder alone
    assert cli.main(["eval", "--config", "configs/glue.py", "--config.mode=zero_shot", "--config.task=synthetic_choice",
                     f"--config.init_from={folder}", "--config.finetune.splits=validation",
                     "--workdir", str(tmp_path / "scores")]) == 0
    metrics = json.loads((tmp_path / "scores" / "eval" / "synthetic_choice" / "metrics.json").read_text())
    assert set(metrics["splits"]["validation"]["scores"]) == {"accuracy", "acc_norm"}


def test_a_tokenizer_larger_than_the_model_is_one_error(folders, tmp_path, capsys):
    """A vocabulary the model never had (not just the added tokens) stops fine-tuning up front."""
    from gptjax import cli

    folder = tmp_path / "small-model"
    shutil.copytree(folders["gpt2-json"], folder)
    base = HFTokenizer.load(str(folder)).base_vocab_size
    transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=1, n_head=2, n_embd=16, n_positions=64, vocab_size=base - 10)).save_pretrained(folder)
    capsys.readouterr()
    code = cli.main(["finetune", "--config", "configs/glue.py", "--config.task=synthetic_sentiment",
                     f"--config.init_from={folder}", "--workdir", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"model.vocab_size is {base - 10} but the tokenizer" in err[0], err


# ---------------------------------------------------------------------------------------------
# Pretraining with a Hugging Face vocabulary (data.tokenizer = a folder or a tokenizer.json).

@pytest.mark.parametrize("name", ["gpt2-files", "openai-json/tokenizer.json"])
def test_pretraining_with_a_hugging_face_vocabulary(folders, tmp_path, name):
    """Documents are packed with the tokenizer's own ids and an eos after each; the workdir keeps
    the tokenizer, a resumed run leaves it as it is, and the model exports with it."""
    torch = pytest.importorskip("torch")
    from gptjax import cli
    from gptjax.api import GPT
    from gptjax.data import token_files

    kind, _, file = name.partition("/")
    path = folders[kind] / file if file else folders[kind]
    ref = reference(folders[kind])
    tok = HFTokenizer.load(str(path))
    docs = corpus(150, seed=1)
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    workdir = tmp_path / "run"
    settings = ["--config", "configs/tiny.py", "--workdir", str(workdir), f"--config.data.source=jsonl:{source}",
                f"--config.data.tokenizer={path}", "--config.data.eval_fraction=0", "--config.model.vocab_size=640",
                "--config.model.n_layer=1", "--config.model.dtype=float32", "--config.train.batch_size=4",
                "--config.train.seq_len=32", "--config.train.log_every=5", "--config.train.warmup_steps=2"]
    assert cli.main(["prepare", *settings]) == 0
    (prepared,) = [d for d in (workdir / "data").iterdir() if d.name.endswith("-train")]
    meta = json.loads((prepared / "meta.json").read_text())
    rows = token_files.TokenRows(token_files.read_prepared(str(prepared), meta), 32, tok.pad_id)
    stream = rows[np.arange(len(rows))].reshape(-1)
    expected = [t for d in docs for t in (*ref_ids(ref, d), tok.eos_id)]
    assert stream[:len(expected)].tolist() == expected and set(stream[len(expected):]) <= {tok.pad_id}

    assert cli.main(["pretrain", *settings, "--no-progress", "--config.train.steps=20"]) == 0
    losses = [r["loss"] for r in map(json.loads, open(workdir / "metrics.jsonl")) if "loss" in r]
    assert losses[-1] < losses[0]
    kept = workdir / "tokenizer.json"
    assert kept.is_file() and not (workdir / "tokenizer.model").exists()
    written = kept.stat().st_mtime_ns
    assert cli.main(["pretrain", *settings, "--no-progress", "--config.train.steps=22"]) == 0  # resumes
    assert kept.stat().st_mtime_ns == written

    text = "The café owner counts 42 tokens, doesn't she?"
    model = GPT.from_pretrained(str(workdir))
    assert model.tokenizer.encode(text) == ref_ids(ref, text)
    assert GPT.from_pretrained(str(workdir / "checkpoints" / "22")).tokenizer.encode(text) == ref_ids(ref, text)
    assert isinstance(model.generate(text, max_new_tokens=4, temperature=0.0), str)
    export = tmp_path / "export"
    assert cli.main(["convert", "--from", str(workdir), "--to-hf", str(export)]) == 0
    assert ref_ids(transformers.AutoTokenizer.from_pretrained(str(export)), text) == ref_ids(ref, text)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(export)).eval()
    ids = [tok.start_id, *ref_ids(ref, text), tok.eos_id]
    with torch.no_grad():
        theirs = loaded(torch.tensor([ids])).logits.numpy()[..., :640]
    np.testing.assert_allclose(np.asarray(model.logits([ids])), theirs, atol=1e-4, rtol=1e-4)


def test_pretraining_with_a_hugging_face_vocabulary_refuses_what_cannot_work(folders, sentencepiece_model,
                                                                              tmp_path, capsys):
    from gptjax import cli

    def one_line(workdir, *extra):
        capsys.readouterr()
        code = cli.main(["pretrain", "--config", "configs/tiny.py", "--workdir", str(workdir), "--no-progress",
                         "--config.train.steps=1", "--config.model.n_layer=1", *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, err
        return err[0]

    folder = folders["gpt2-json"]
    size = HFTokenizer.load(str(folder)).vocab_size
    # configs/tiny.py has model.vocab_size=512: too small for the tokenizer and its added tokens
    assert f"model.vocab_size is 512 but the tokenizer {folder} has {size} tokens" in \
        one_line(tmp_path / "a", f"--config.data.tokenizer={folder}")
    held = tmp_path / "b"
    held.mkdir()
    shutil.copy(sentencepiece_model, held / "tokenizer.model")
    assert "holds the SentencePiece tokenizer of an earlier run" in one_line(
        held, f"--config.data.tokenizer={folder}", "--config.model.vocab_size=640")
    assert "does not exist; give a SentencePiece .model, a Hugging Face tokenizer folder" in \
        one_line(tmp_path / "c", f"--config.data.tokenizer={tmp_path / 'nothing'}")


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
