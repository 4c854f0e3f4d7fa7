import random

import numpy as np
import pytest

from gptjax.data import synthetic
from gptjax.data.tokenizer import DELIM_ID, EXTRACT_ID, PAD_ID, START_ID, train_tokenizer
from gptjax.errors import UserError
from gptjax.tasks import SYNTHETIC_TASKS, Example, synthetic_split
from gptjax.tasks.transforms import Encoded, _fit, encode, sequences_per_example

S, D, E = START_ID, DELIM_ID, EXTRACT_ID
SENT, ENT, PARA, REL, CHOICE = (SYNTHETIC_TASKS[f"synthetic_{n}"] for n in
                                ("sentiment", "entailment", "paraphrase", "relatedness", "choice"))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(iter(synthetic.documents(200)), 400, tmp_path_factory.mktemp("tok") / "tok")


class WordTok:
    """Each whitespace-separated word is its own id ("101 102" -> [101, 102]): known lengths."""

    pad_id, start_id, delim_id, extract_id = PAD_ID, START_ID, DELIM_ID, EXTRACT_ID

    def __init__(self):
        self.batch_calls = 0

    def encode_batch(self, texts):
        self.batch_calls += 1
        return [[int(w) for w in t.split()] for t in texts]

    def encode(self, text):
        raise AssertionError("encode() per text: the batch path must be used")


def words(start, n):
    return " ".join(str(start + i) for i in range(n))


def ids(start, n):
    return list(range(start, start + n))


def rows(enc, n, s=None):
    """The unpadded sequences of example n (all its S rows, or row s), checking the padding."""
    out = []
    for j in range(enc.tokens.shape[1]):
        row, x = enc.tokens[n, j], int(enc.extract[n, j])
        assert row[x] == E and row[0] == S and (row[x + 1:] == PAD_ID).all()
        out.append(row[:x + 1].tolist())
    return out if s is None else out[s]


def test_sequences_per_example():
    assert [sequences_per_example(t) for t in (SENT, ENT, PARA, REL, CHOICE)] == [1, 1, 2, 2, 4]


def test_classification_layout(tok):
    exs = synthetic_split(SENT, "validation", size=20)
    enc = encode(SENT, exs, tok, max_len=512)
    assert isinstance(enc, Encoded) and len(enc) == 20 and enc.truncated == 0
    assert enc.tokens.dtype == np.int32 and enc.extract.dtype == np.int32 and enc.tokens.shape[:2] == (20, 1)
    for n, ex in enumerate(exs):
        want = [S, *tok.encode(ex.texts[0]), E]
        assert rows(enc, n, 0) == want and enc.extract[n, 0] == len(want) - 1
    assert enc.labels.dtype == np.int32 and enc.labels.tolist() == [ex.label for ex in exs]
    assert enc.idx.dtype == np.int64 and enc.idx.tolist() == list(range(20))


def test_pair_layout(tok):
    exs = synthetic_split(ENT, "validation", size=20)
    enc = encode(ENT, exs, tok, max_len=512)
    assert enc.tokens.shape[:2] == (20, 1) and enc.truncated == 0
    for n, ex in enumerate(exs):
        a, b = map(tok.encode, ex.texts)
        assert rows(enc, n, 0) == [S, *a, D, *b, E]
    assert enc.labels.tolist() == [ex.label for ex in exs] and set(enc.labels.tolist()) == {0, 1, 2}


@pytest.mark.parametrize("task", [PARA, REL], ids=lambda t: t.name)
def test_symmetric_tasks_have_both_orders(tok, task):
    exs = synthetic_split(task, "validation", size=20)
    enc = encode(task, exs, tok, max_len=512)
    assert enc.tokens.shape[:2] == (20, 2) and enc.truncated == 0
    for n, ex in enumerate(exs):
        a, b = map(tok.encode, ex.texts)
        assert rows(enc, n) == [[S, *a, D, *b, E], [S, *b, D, *a, E]]
        assert enc.extract[n, 0] == enc.extract[n, 1] == len(a) + len(b) + 2
    if task is REL:
        assert enc.labels.dtype == np.float32 and enc.labels.tolist() == [ex.label for ex in exs]
    else:
        assert enc.labels.dtype == np.int32


def test_multiple_choice_has_one_row_per_answer(tok):
    exs = synthetic_split(CHOICE, "validation", size=20)
    enc = encode(CHOICE, exs, tok, max_len=512)
    assert enc.tokens.shape[:2] == (20, 4) and enc.truncated == 0
    for n, ex in enumerate(exs):
        context = tok.encode(ex.texts[0])
        assert rows(enc, n) == [[S, *context, D, *tok.encode(ans), E] for ans in ex.texts[1:]]
        # The labelled row holds the right answer ("she sings ."-style: agreeing verb).
        assert tok.decode(enc.tokens[n, ex.label]).endswith(ex.texts[1 + ex.label])
    assert enc.labels.tolist() == [ex.label for ex in exs]


def test_missing_labels_and_custom_idx():
    t = WordTok()
    exs = [Example(7, ("101",), None), Example(2**40, ("102",), 1)]
    enc = encode(SENT, exs, t, max_len=16)
    assert enc.labels.tolist() == [-1, 1] and enc.idx.tolist() == [7, 2**40]
    reg = encode(REL, [Example(3, ("101", "102"), None), Example(4, ("101", "102"), 2.5)], t, max_len=16)
    assert reg.labels.dtype == np.float32 and np.isnan(reg.labels[0]) and reg.labels[1] == 2.5
    assert t.batch_calls == 2  # one tokenizer call per encode(), never one per text


def test_padding_width_rounds_up_and_is_capped():
    t = WordTok()
    ex = [Example(0, (words(100, 5),), 0)]  # 7 tokens with start and extract
    assert encode(SENT, ex, t, max_len=512).tokens.shape == (1, 1, 16)
    assert encode(SENT, ex, t, max_len=512, pad_multiple=4).tokens.shape == (1, 1, 8)
    assert encode(SENT, ex, t, max_len=512, pad_multiple=1).tokens.shape == (1, 1, 7)
    assert encode(SENT, ex, t, max_len=12).tokens.shape == (1, 1, 12)  # 16 capped at max_len
    long = encode(SENT, [Example(0, (words(100, 40),), 0)], t, max_len=20)
    assert long.tokens.shape == (1, 1, 20) and rows(long, 0, 0) == [S, *ids(100, 18), E]
    assert encode(SENT, [], t, max_len=64).tokens.shape == (0, 1, 16)


def test_truncation_cuts_the_longest_field_first():
    t = WordTok()
    exs = [Example(0, (words(100, 8), words(200, 3)), 1),  # budget 7: only a is cut, to 4
           Example(1, (words(100, 6), words(200, 5)), 0),  # 6,5 -> 5,5 -> 4,5 -> 4,4 -> 3,4
           Example(2, (words(100, 4), words(200, 3)), 0)]  # fits exactly: 3 + 7 = 10
    enc = encode(PARA, exs, t, max_len=10)
    assert enc.truncated == 2 and enc.tokens.shape == (3, 2, 10)
    expect = [(ids(100, 4), ids(200, 3)), (ids(100, 3), ids(200, 4)), (ids(100, 4), ids(200, 3))]
    for n, (a, b) in enumerate(expect):
        assert rows(enc, n) == [[S, *a, D, *b, E], [S, *b, D, *a, E]]  # same cut in both orders
        assert enc.extract[n].tolist() == [9, 9]


def test_multiple_choice_truncates_each_candidate():
    t = WordTok()
    ex = Example(0, (words(100, 10), words(200, 2), words(300, 6), words(400, 1), words(500, 1)), 0)
    enc = encode(CHOICE, [ex], t, max_len=11)  # budget 8 per candidate
    assert enc.truncated == 1
    assert rows(enc, 0) == [[S, *ids(100, 6), D, *ids(200, 2), E],
                            [S, *ids(100, 4), D, *ids(300, 4), E],  # 10,6 -> 6,6 -> ... -> 4,4
                            [S, *ids(100, 7), D, 400, E],
                            [S, *ids(100, 7), D, 500, E]]


def reference_fit(lengths, budget):
    lengths = list(lengths)
    while sum(lengths) > budget:
        lengths[lengths.index(max(lengths))] -= 1
    return lengths


def test_fit_matches_token_by_token_cutting():
    rng = random.Random(0)
    for _ in range(2000):
        lengths = [rng.randint(0, 30) for _ in range(rng.randint(1, 3))]
        budget = rng.randint(len(lengths), 60)
        assert _fit(lengths, budget) == reference_fit(lengths, budget), (lengths, budget)


def test_truncation_of_real_texts(tok):
    exs = synthetic_split(REL, "validation", size=30)
    max_len = 64
    enc = encode(REL, exs, tok, max_len=max_len)
    assert enc.tokens.shape == (30, 2, max_len)
    cut = 0
    for n, ex in enumerate(exs):
        a, b = map(tok.encode, ex.texts)
        la, lb = reference_fit([len(a), len(b)], max_len - 3)
        cut += (la, lb) != (len(a), len(b))
        assert rows(enc, n) == [[S, *a[:la], D, *b[:lb], E], [S, *b[:lb], D, *a[:la], E]]
    assert cut > 0 and enc.truncated == cut


def test_context_too_small_for_special_tokens():
    t = WordTok()
    assert rows(encode(SENT, [Example(0, ("101 102",), 0)], t, max_len=3), 0, 0) == [S, 101, E]
    with pytest.raises(UserError, match="raise the context length"):
        encode(SENT, [Example(0, ("101",), 0)], t, max_len=2)
    assert rows(encode(ENT, [Example(0, ("101 102", "201"), 0)], t, max_len=5), 0, 0) == [S, 101, D, 201, E]
    for task, texts in ((ENT, ("101", "201")), (CHOICE, ("1", "2", "3", "4", "5"))):
        with pytest.raises(UserError, match="raise the context length"):
            encode(task, [Example(0, texts, 0)], t, max_len=4)


def test_wrong_number_of_texts():
    with pytest.raises(UserError, match=r"synthetic_entailment.*idx=41.*premise, hypothesis"):
        encode(ENT, [Example(40, ("1", "2"), 0), Example(41, ("1",), 0)], WordTok(), max_len=64)
    with pytest.raises(UserError, match=r"synthetic_choice.*idx=0.*context, answer_0"):
        encode(CHOICE, [Example(0, ("1", "2", "3"), 0)], WordTok(), max_len=64)
    with pytest.raises(UserError, match="pad_multiple"):
        encode(SENT, [Example(0, ("1",), 0)], WordTok(), max_len=64, pad_multiple=0)


def test_empty_field_is_kept_as_nothing_between_specials():
    enc = encode(PARA, [Example(0, ("", "201 202"), 1)], WordTok(), max_len=64)
    assert rows(enc, 0) == [[S, D, 201, 202, E], [S, 201, 202, D, E]]
