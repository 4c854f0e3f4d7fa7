import pickle
import random

import numpy as np
import pytest
import sentencepiece as spm

from gptjax.data import tokenizer as tk
from gptjax.data.tokenizer import Tokenizer, check_vocab, train_tokenizer
from gptjax.errors import UserError

VOCAB = 400  # 256 byte pieces + 6 specials + the corpus characters leave room for ~90 merges

WORDS = ("the model learns small tokens from data while a large network trains on every batch "
         "quick brown fox jumps over lazy dog and then goes home again").split()


def corpus(n=300, seed=0):
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
        docs.append(" ".join(words).capitalize() + rng.choice([".", "!", "?", ", 'yes'; (ok): 42."]))
    return docs


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("tok") / "tok"
    return train_tokenizer(iter(corpus()), VOCAB, prefix), prefix


@pytest.mark.parametrize("text", [
    "The quick brown fox, jumps over the lazy dog!",
    "Spaces:  two,   three, trailing ",
    " leading space",
    "tabs\tand\nnew\nlines\r\n",
    "Unicode: héllo wörld — 日本語 😀 «quotes»",
    "Punctuation ~`@#$%^&*()_+-=[]{}|\\;:'\",.<>/?",
    "",
])
def test_round_trip(trained, text):
    tok, _ = trained
    assert tok.decode(tok.encode(text)) == text


def test_round_trip_documented_exception(trained):
    tok, _ = trained
    assert tok.decode(tok.encode("a\u2581b")) == "a b"


def test_files_and_outputs(trained):
    tok, prefix = trained
    assert tok.vocab_size == VOCAB
    assert tok.path == str(prefix) + ".model"
    vocab_lines = (prefix.parent / "tok.vocab").read_text(encoding="utf-8").splitlines()
    assert len(vocab_lines) == VOCAB and vocab_lines[3].startswith("<start>\t")


def test_special_ids(trained):
    tok, prefix = trained
    assert (tok.pad_id, tok.unk_id, tok.eos_id, tok.start_id, tok.delim_id, tok.extract_id) == tuple(range(6))
    sp = spm.SentencePieceProcessor(model_file=str(prefix) + ".model")
    assert [sp.id_to_piece(i) for i in range(6)] == ["<pad>", "<unk>", "</s>", "<start>", "<delim>", "<extract>"]
    body = tok.encode("the dog")
    assert not set(body) & set(range(6))
    # Control ids and pad vanish on decode, so wrapping a segment does not change its text.
    ids = [tk.START_ID] + body + [tk.DELIM_ID, tk.EXTRACT_ID, tk.EOS_ID, tk.PAD_ID, tk.PAD_ID]
    assert tok.decode(ids) == "the dog"
    assert tok.decode(np.array(ids, dtype=np.int32)) == "the dog"


def test_literal_control_text_is_not_a_control_id(trained):
    tok, _ = trained
    for text in ["<start>", "x <delim> y<extract>", "</s><pad><unk>"]:
        ids = tok.encode(text)
        assert not set(ids) & set(range(6)), text
        assert tok.decode(ids) == text


def test_out_of_range_ids_decode_as_unk(trained):
    tok, _ = trained
    assert "the" in tok.decode(tok.encode("the") + [VOCAB + 5])


def test_saved_model_loads_with_plain_sentencepiece(trained, tmp_path):
    tok, _ = trained
    out = tmp_path / "sub" / "copy.model"
    tok.save(out)
    sp = spm.SentencePieceProcessor(model_file=str(out))
    text = "The lazy dog, again!"
    assert sp.encode(text, out_type=int) == tok.encode(text)
    assert Tokenizer.load(out).serialized_model_proto() == tok.serialized_model_proto()


def test_batch_matches_single(trained):
    tok, _ = trained
    texts = corpus(20, seed=1) + ["", "  x  "]
    batch = tok.encode_batch(texts)
    assert batch == [tok.encode(t) for t in texts]
    assert tok.decode_batch(batch) == texts
    assert tok.decode_batch(np.array([batch[0][:3], batch[1][:3]])) == [tok.decode(b[:3]) for b in batch[:2]]


def test_pickle(trained):
    tok, _ = trained
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode("the fox") == tok.encode("the fox") and clone.path == tok.path


def test_deterministic_and_files_match_iterator(tmp_path):
    docs = corpus()
    a = train_tokenizer(iter(docs), VOCAB, tmp_path / "a", num_threads=2)
    b = train_tokenizer((d for d in docs), VOCAB, tmp_path / "b", num_threads=2)
    assert a.serialized_model_proto() == b.serialized_model_proto()
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
    # Subsampling the corpus is seeded, so it is reproducible too.
    s1, s2 = (train_tokenizer(iter(docs), 350, tmp_path / f"s{i}", max_sentences=150) for i in (1, 2))
    assert s1.serialized_model_proto() == s2.serialized_model_proto()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "0.txt").write_text("\n".join(docs[:150]) + "\n", encoding="utf-8")
    (tmp_path / "in" / "1.txt").write_text("\n".join(docs[150:]) + "\n", encoding="utf-8")
    c = train_tokenizer(str(tmp_path / "in" / "*.txt"), VOCAB, tmp_path / "c", num_threads=2)
    assert c.serialized_model_proto() == a.serialized_model_proto()


def test_long_lines_are_split_for_training():
    line = "word " * 3000
    chunks = list(tk._training_lines([line]))
    assert len(chunks) > 1 and all(len(c.encode()) <= tk.MAX_SENTENCE_BYTES for c in chunks)
    assert " ".join(chunks).split() == line.split()


def test_vocab_too_large(tmp_path):
    with pytest.raises(UserError, match="lower it"):
        train_tokenizer(iter(corpus(50)), 5000, tmp_path / "big")


def test_vocab_too_small(tmp_path):
    with pytest.raises(UserError, match="raise vocab_size"):
        train_tokenizer(iter(corpus(50)), 260, tmp_path / "small")


def test_bad_inputs(tmp_path):
    with pytest.raises(UserError, match="matches no files"):
        train_tokenizer(str(tmp_path / "missing" / "*.txt"), VOCAB, tmp_path / "x")
    with pytest.raises(UserError, match="matches no files"):
        train_tokenizer([tmp_path / "nope.txt"], VOCAB, tmp_path / "x")
    with pytest.raises(UserError, match="no text"):
        train_tokenizer(iter(["", "   "]), VOCAB, tmp_path / "x")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 50)
    with pytest.raises(UserError, match="not UTF-8"):
        train_tokenizer(str(tmp_path / "latin1.txt"), VOCAB, tmp_path / "x")


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        Tokenizer.load(tmp_path / "absent.model")
    junk = tmp_path / "junk.model"
    junk.write_text("not a model")
    with pytest.raises(UserError, match="not a valid SentencePiece model"):
        Tokenizer.load(junk)


def test_load_rejects_model_without_reserved_ids(tmp_path):
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus()), model_prefix=str(tmp_path / "plain"),
                                   vocab_size=100, minloglevel=2)
    with pytest.raises(UserError, match="reserved token ids"):
        Tokenizer.load(tmp_path / "plain.model")


def test_check_vocab(trained):
    tok, _ = trained
    check_vocab(VOCAB, tok)
    check_vocab(512, tok)
    with pytest.raises(UserError, match=r"model\.vocab_size is 256 .* 400"):
        check_vocab(256, tok)
