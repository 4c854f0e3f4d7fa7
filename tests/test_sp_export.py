import json
import random

import pytest
import tokenizers

from gptjax.data.hf_tokenizer import HFTokenizer
from gptjax.data.sp_export import save_pretrained, to_hf_tokenizer
from gptjax.data.tokenizer import CONTROL_SYMBOLS, Tokenizer, train_tokenizer
from gptjax.errors import UserError

VOCAB = 700

SUBJECTS = ["The model", "A small network", "Our tokenizer", "Every batch", "The quick brown fox", "She",
            "The café owner", "A naïve reader", "Nobody", "the team"]
VERBS = ["learns", "reads", "counts", "jumps over", "trains on", "writes", "splits", "remembers", "ignores"]
OBJECTS = ["the lazy dog", "42 tokens", "3.14 apples", "the data set", "long documents", "résumé files",
           "10,000 lines", "a user's question", "the year 2024", "e-mail addresses (mostly)"]
ENDINGS = [".", "!", "?", "; then it stops.", ", doesn't it?", " -- really.", ": yes/no.", " [citation needed].",
           "...", " ---- ", " ==== 0000"]
SEPARATORS = [" "] * 6 + ["  ", "   ", "\t", " \t "]

# Characters the corpus lacks (CJK, emoji, most accents, symbols) go through byte fallback.
TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "Punctuation ~`@#$%^&*()_+-=[]{}|\\;:'\",.<>/? and 'quotes' \"here\"",
    "Digits 0123456789, 3.14159 and 1,000,000; phone 555-0199 and 00000000",
    "runs   of    spaces and\ttabs\t\there \t \t mixed",
    "newlines\nand\n\nblank lines\r\nwindows\n",
    "   leading and trailing spaces   ",
    "\t\tleading tabs",
    "Accents: café naïve résumé Ångström Crème brûlée ø ß",
    "CJK: 日本語のテキスト 中文 한국어",
    "Emoji: 😀 👍🏽 🧑‍🚀 ❤️ €",
    "",
    " ",
    "  ",
    "\n",
    "MiXeD CaSe WORDS and wordsss.........------",
    "a\u2581b \u2581leading block",
    "\u2581",
    "control text <start> <delim> <extract> </s> <unk> <pad> <0x41>",
    "<start>",
    "NUL\x00 and other\x07 control\x1f characters",
]


def corpus(n=400, seed=0):
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        sep = rng.choice(SEPARATORS)
        words = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}".split(" ")
        line = sep.join(words) + rng.choice(ENDINGS)
        if rng.random() < 0.3:
            price = f"{rng.randint(0, 999)}.{rng.randint(0, 99):02d}"
            line += f" It costs ${price} on {rng.randint(1, 28)}/{rng.randint(1, 12)}."
        if rng.random() < 0.1:
            line = rng.choice(["  ", "\t"]) + line
        lines.append(line)
    return lines


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sp_export")
    tok = train_tokenizer(iter(corpus()), VOCAB, folder / "tok")
    return tok, to_hf_tokenizer(tok), folder


@pytest.fixture(scope="module")
def exported(trained):
    tok, _, folder = trained
    out = folder / "hf"
    save_pretrained(tok, out)
    return out


@pytest.fixture(scope="module")
def auto(exported):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(exported))


def random_texts(tok, n=3000, seed=1):
    """Strings built from pieces, the corpus alphabet and unseen characters, to reach many merge paths."""
    rng = random.Random(seed)
    pieces = [tok._sp.id_to_piece(i) for i in range(tok.vocab_size)
              if not (tok._sp.is_control(i) or tok._sp.is_unknown(i) or tok._sp.is_byte(i))]
    pieces = [p.replace("\u2581", rng.choice(" \u2581")) for p in pieces]
    alphabet = sorted({c for p in pieces for c in p}) + list(" \t\n\u2581é日😀") + ["  ", "\u200d", "<start>"]
    texts = []
    for i in range(n):
        source = pieces if i % 2 else alphabet
        texts.append("".join(rng.choice(source) for _ in range(rng.randint(0, 24))))
    return texts


@pytest.mark.parametrize("text", TEXTS)
def test_same_ids_and_text(trained, text):
    tok, hf, _ = trained
    ids = tok.encode(text)
    assert hf.encode(text, add_special_tokens=False).ids == ids
    assert hf.decode(ids) == tok.decode(ids)


def test_corpus_and_random_texts(trained):
    tok, hf, _ = trained
    texts = corpus(200, seed=7) + random_texts(tok)
    expected = tok.encode_batch(texts)
    got = [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]
    mismatches = [(t, e, g) for t, e, g in zip(texts, expected, got) if e != g]
    assert not mismatches, mismatches[:3]
    assert hf.decode_batch(expected) == tok.decode_batch(expected)


def test_unseen_characters_use_byte_pieces(trained):
    tok, hf, _ = trained
    ids = hf.encode("日😀", add_special_tokens=False).ids
    assert ids == tok.encode("日😀")
    assert [hf.id_to_token(i) for i in ids[1:]] == [f"<0x{b:02X}>" for b in "日😀".encode("utf-8")]
    assert tok.unk_id not in ids


def test_special_tokens(trained):
    tok, hf, _ = trained
    names = ["<pad>", "<unk>", "</s>", *CONTROL_SYMBOLS]
    assert [hf.token_to_id(n) for n in names] == list(range(6))
    added = hf.get_added_tokens_decoder()
    assert sorted(added) == list(range(6))
    assert all(added[i].content == n and added[i].special for i, n in enumerate(names))
    assert hf.get_vocab_size() == tok.vocab_size


def test_literal_control_text_is_not_a_control_id(trained):
    tok, hf, _ = trained
    for text in ("<start>", "a <delim> b<extract></s><unk><pad>"):
        ids = hf.encode(text, add_special_tokens=False).ids
        assert ids == tok.encode(text)
        assert not set(ids) & set(range(6))


def test_batch_matches_single(trained):
    _, hf, _ = trained
    batch = [e.ids for e in hf.encode_batch(TEXTS, add_special_tokens=False)]
    assert batch == [hf.encode(t, add_special_tokens=False).ids for t in TEXTS]


def test_decode_skips_special_tokens_like_sentencepiece(trained):
    tok, hf, _ = trained
    ids = [tok.start_id, *tok.encode("  two spaces"), tok.delim_id, *tok.encode("x"), tok.eos_id]
    assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids)


def test_saved_files(trained, exported):
    tok, _, _ = trained
    assert {p.name for p in exported.iterdir()} == {"tokenizer.json", "tokenizer_config.json",
                                                    "special_tokens_map.json"}
    config = json.loads((exported / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["split_special_tokens"] is True
    assert (config["pad_token"], config["unk_token"], config["eos_token"]) == ("<pad>", "<unk>", "</s>")
    # A bare tokenizer.json matches special tokens in text again (the switch is not saved), but
    # gives the same ids for text without them.
    bare = tokenizers.Tokenizer.from_file(str(exported / "tokenizer.json"))
    for text in TEXTS[:10]:
        assert bare.encode(text, add_special_tokens=False).ids == tok.encode(text)


def test_auto_tokenizer_same_ids_and_text(trained, auto):
    tok, _, _ = trained
    texts = TEXTS + random_texts(tok, n=500, seed=2)
    for text in texts:
        ids = auto(text, add_special_tokens=False)["input_ids"]
        assert ids == tok.encode(text), text
        assert auto.decode(ids) == tok.decode(ids), text
    batch = auto(texts, add_special_tokens=False)["input_ids"]
    assert batch == tok.encode_batch(texts)
    # There is no post-processor: SentencePiece adds no bos or eos either.
    assert auto(TEXTS[0])["input_ids"] == tok.encode(TEXTS[0])


def test_auto_tokenizer_special_tokens(auto):
    assert (auto.pad_token_id, auto.unk_token_id, auto.eos_token_id) == (0, 1, 2)
    assert auto.convert_tokens_to_ids(list(CONTROL_SYMBOLS)) == [3, 4, 5]
    assert sorted(auto.all_special_ids) == list(range(6))
    for text in ("<start>", "x <start> y </s>"):
        ids = auto(text, add_special_tokens=False)["input_ids"]
        assert not set(ids) & set(range(6))


def test_auto_tokenizer_decode_skips_special_tokens(trained, auto):
    tok, _, _ = trained
    ids = [tok.start_id, *tok.encode(" lead"), tok.extract_id, tok.eos_id, tok.pad_id]
    assert auto.decode(ids, skip_special_tokens=True) == tok.decode(ids)


def test_gptjax_hf_tokenizer_reads_export(trained, exported):
    tok, _, _ = trained
    hft = HFTokenizer.load(exported)
    assert (hft.pad_id, hft.unk_id, hft.eos_id, hft.start_id, hft.delim_id, hft.extract_id) == tuple(range(6))
    assert hft.vocab_size == hft.base_vocab_size == tok.vocab_size and hft.added_tokens == {}
    assert hft.encode_batch(TEXTS) == tok.encode_batch(TEXTS)
    ids = tok.encode(TEXTS[0]) + [tok.eos_id] + tok.encode(TEXTS[3])
    assert hft.decode(ids) == tok.decode(ids)


@pytest.mark.parametrize("setting, reason", [("remove_extra_whitespaces", "remove_extra_whitespaces is on"),
                                             ("unigram", "not BPE"), ("no_dummy_prefix", "add_dummy_prefix is off"),
                                             ("orphan_character", "not pieces themselves")])
def test_rejects_models_it_cannot_reproduce(trained, setting, reason):
    sentencepiece_model_pb2 = pytest.importorskip("sentencepiece.sentencepiece_model_pb2")
    tok, _, _ = trained
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tok.serialized_model_proto())
    if setting == "remove_extra_whitespaces":
        proto.normalizer_spec.remove_extra_whitespaces = True
    elif setting == "unigram":
        proto.trainer_spec.model_type = sentencepiece_model_pb2.TrainerSpec.UNIGRAM
    elif setting == "no_dummy_prefix":
        proto.normalizer_spec.add_dummy_prefix = False
    else:
        piece = proto.pieces.add()
        piece.piece, piece.score = "\u2581\u03a9x", -1e6  # no piece for the character itself
    with pytest.raises(UserError, match=f"cannot export.*{reason}"):
        to_hf_tokenizer(Tokenizer.from_proto(proto.SerializeToString()))


def test_to_hf_export_of_a_gptjax_model_ships_a_tokenizer_transformers_loads(trained, tmp_path):
    transformers = pytest.importorskip("transformers")
    from gptjax import hf
    from gptjax.api import GPT

    tok = trained[0]
    model = GPT.from_config("configs/tiny.py", **{"model.n_layer": 1, "model.vocab_size": tok.vocab_size,
                                                  "model.vocab_pad_multiple": 1})
    hf.save_hf(model.model_config, model.module, str(tmp_path), tok)
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in ("plain words", "  two  spaces\tand a tab\n", "café 東京 🙂", "<start> is text here"):
        assert auto(text, add_special_tokens=False)["input_ids"] == tok.encode(text), text
    assert [auto.convert_tokens_to_ids(t) for t in CONTROL_SYMBOLS] == [3, 4, 5]
    assert (tmp_path / "tokenizer.model").is_file()  # the SentencePiece model itself rides along
