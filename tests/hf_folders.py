"""Small GPT-2- and openai-gpt-style tokenizer folders trained on text written here, the
transformers tokenizer that reads each (the reference for ids), and random tiny model folders."""

import random
import shutil

import pytest
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from gptjax.data.hf_tokenizer import EOS_TOKEN, HFTokenizer

VOCAB = 600

SUBJECTS = ["The model", "A small network", "Our tokenizer", "Every batch", "The quick brown fox", "She",
            "The café owner", "A naïve reader", "The team", "Nobody"]
VERBS = ["learns", "reads", "counts", "jumps over", "trains on", "writes", "splits", "remembers", "ignores"]
OBJECTS = ["the lazy dog", "42 tokens", "3.14 apples", "the data set", "long documents", "résumé files",
           "10,000 lines", "a user's question", "the year 2024", "e-mail addresses (mostly)"]
ENDINGS = [".", "!", "?", "; then it stops.", ", doesn't it?", " -- really.", ": yes/no.", " [citation needed]."]

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

def make_folders(root, transformers):
    """kind -> folder: vocab.json + merges.txt + config.json ("-files"), and the same plus the
    tokenizer.json + tokenizer_config.json that transformers' save_pretrained writes ("-json")."""
    lines = corpus()
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
    import transformers

    if folder not in _refs:
        _refs[folder] = transformers.AutoTokenizer.from_pretrained(folder)
    return _refs[folder]


def ref_ids(ref, text, **kw):
    return ref(text, add_special_tokens=False, **kw)["input_ids"]


def model_folder(folders, tmp_path, kind):
    """A random tiny transformers model saved beside the kind's tokenizer files."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
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
