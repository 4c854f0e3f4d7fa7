"""Zero/few-shot scoring: batched continuation log-probs against a direct per-example computation,
the scorer's memory against whole float32 logits, the choice rules (acc, acc_norm, thresholds),
few-shot prompt construction and the errors."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gptjax import GPT, zero_shot
from gptjax.data import synthetic
from gptjax.data.tokenizer import train_tokenizer
from gptjax.errors import UserError
from gptjax.tasks import Example, get_task, synthetic_split
from gptjax.tasks.scores import matthews

MAX_LEN = 40  # not a multiple of 16: the padded length must be capped at max_len
SMALL = {"model.n_layer": 1, "model.d_model": 32, "model.n_head": 2, "model.d_ff": 64, "model.max_len": MAX_LEN,
         "model.vocab_size": 97, "model.dtype": "float32", "model.init_std": 0.3, "train.seq_len": MAX_LEN}


@pytest.fixture(scope="module")
def model():
    return GPT.from_config("configs/tiny.py", seed=1, **SMALL)


def direct_logprob(model, context, continuation):
    """The unbatched reference: one row through GPT.logits, log-softmax in float64."""
    # The model's positions hold every token but the last, which is only predicted.
    row = (list(context) + list(continuation))[-(MAX_LEN + 1):]
    logits = np.asarray(model.logits(np.array([row[:-1]])), np.float64)[0]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    start = len(row) - len(continuation)
    return sum(logp[t - 1, row[t]] for t in range(start, len(row)))


def test_continuation_logprobs_match_a_direct_computation(model):
    rng = np.random.default_rng(0)
    # 7 pairs in batches of 3: the last batch is padded; lengths span several padded widths, and
    # the last two contexts are longer than the model, so they lose tokens on the left.
    sizes = [(1, 1), (5, 3), (12, 9), (20, 1), (3, 17), (60, 4), (45, 30)]
    contexts = [list(rng.integers(0, 97, c)) for c, _ in sizes]
    continuations = [list(rng.integers(0, 97, n)) for _, n in sizes]
    logp, counts = zero_shot.continuation_logprobs(model, contexts, continuations, batch_size=3)
    assert logp.dtype == np.float64 and counts.tolist() == [n for _, n in sizes]
    expected = [direct_logprob(model, c, k) for c, k in zip(contexts, continuations)]
    np.testing.assert_allclose(logp, expected, rtol=1e-5)
    # The bare Decoder works too, and the batch size does not change the numbers.
    again, _ = zero_shot.continuation_logprobs(model.module, contexts, continuations, batch_size=8)
    np.testing.assert_allclose(again, logp, rtol=1e-5)
    # Left truncation keeps the context nearest the continuation: only the last tokens matter.
    cut, _ = zero_shot.continuation_logprobs(model, [contexts[5][-(MAX_LEN + 1 - 4):]], [continuations[5]])
    np.testing.assert_allclose(cut, logp[5:6], rtol=1e-5)
    # Logits built 16 positions at a time, the last chunk of the 40 positions padded: the same sums.
    chunked = GPT.from_config("configs/tiny.py", seed=1, **SMALL, **{"model.loss_chunk_len": 16})
    again, _ = zero_shot.continuation_logprobs(chunked, contexts[5:], continuations[5:])
    np.testing.assert_allclose(again, expected[5:], rtol=1e-5)


def test_greedy_flags_say_whether_greedy_decoding_gives_the_continuation(model):
    rng = np.random.default_rng(4)
    contexts = [list(map(int, rng.integers(0, 97, n))) for n in (3, 8, 15)]
    greedy = [model.generate(c, max_new_tokens=k, temperature=0.0) for c, k in zip(contexts, (1, 4, 6))]
    changed = greedy[1][:2] + [(greedy[1][2] + 1) % 97] + greedy[1][3:]  # one token off the greedy path
    sums, _, flags = zero_shot.continuation_scores(model, contexts + contexts[1:2], greedy + [changed], batch_size=2)
    assert flags.tolist() == [True, True, True, False]
    expected = [direct_logprob(model, c, k) for c, k in zip(contexts + contexts[1:2], greedy + [changed])]
    np.testing.assert_allclose(sums, expected, rtol=1e-5)


_ON_FOUR_DEVICES = """
import json, sys
import jax, numpy as np
from gptjax import GPT, sharding, zero_shot
args = json.loads(sys.argv[1])
model = GPT.from_config("configs/tiny.py", seed=1, **args["small"])
inner, seen = zero_shot._token_scores, []
def spy(graphdef, state, tokens, targets, chunk_len):
    leaf = jax.tree.leaves(state)[0]
    seen.append({"shape": list(tokens.shape), "shard": list(tokens.sharding.shard_shape(tokens.shape)),
                 "devices": len(tokens.sharding.device_set),
                 "bytes": sorted(set(sharding.bytes_per_device(tokens).values())),
                 "param_replicated": leaf.sharding.is_fully_replicated, "param_devices": len(leaf.sharding.device_set)})
    return inner(graphdef, state, tokens, targets, chunk_len)
zero_shot._token_scores = spy
sums, _, greedy = zero_shot.continuation_scores(model, args["contexts"], args["continuations"], batch_size=3)
print(json.dumps({"seen": seen, "sums": sums.tolist(), "greedy": greedy.tolist()}))
"""


def test_scoring_splits_each_batch_over_the_local_devices(model):
    """On 4 devices a batch of 3 rows is padded to 4, one row (and its bytes alone) per device, the
    parameters replicated; the scores equal one device's."""
    import json
    import os
    import subprocess
    import sys

    rng = np.random.default_rng(2)
    contexts = [list(map(int, rng.integers(0, 97, n))) for n in (2, 9, 30, 5, 17)]
    continuations = [list(map(int, rng.integers(0, 97, n))) for n in (3, 1, 8, 12, 2)]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    args = json.dumps({"small": SMALL, "contexts": contexts, "continuations": continuations})
    run = subprocess.run([sys.executable, "-c", _ON_FOUR_DEVICES, args], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    # 5 rows in batches of 3, longest first: rows of 38, 19 and 17 tokens in the model's 40 positions,
    # then 10 and 5 in 16 (and two padding rows).
    assert [call["shape"] for call in out["seen"]] == [[4, 40], [4, 16]]
    for call in out["seen"]:
        rows, length = call["shape"]
        assert (call["shard"], call["devices"], call["bytes"]) == ([1, length], 4, [length * 4])
        assert (call["param_replicated"], call["param_devices"]) == (True, 4)
    sums, _, greedy = zero_shot.continuation_scores(model, contexts, continuations, batch_size=3)
    np.testing.assert_allclose(out["sums"], sums, rtol=1e-5)
    assert out["greedy"] == greedy.tolist()


def full_logits_logprobs(graphdef, state, tokens, targets):
    """The scorer as it was: the whole batch's logits in float32, then a log-sum-exp."""
    m = nnx.merge(graphdef, state)
    logits = m.lm_logits(m(tokens))[..., :m.config.vocab_size].astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def test_scoring_never_holds_the_batch_of_float32_logits():
    vocab, batch, length = 2048, 64, 64
    sizes = {"model.vocab_size": vocab, "model.max_len": length, "train.seq_len": length}
    gpt = GPT.from_config("configs/tiny.py", seed=3, **dict(SMALL, **sizes))
    graphdef, state = nnx.split(gpt.module)
    rng = np.random.default_rng(0)
    tokens, targets = (rng.integers(0, vocab, (batch, length)).astype(np.int32) for _ in range(2))
    chunk = zero_shot._chunk_len(gpt.module, batch)
    assert chunk < length
    scorer = zero_shot._token_scores.lower(graphdef, state, tokens, targets, chunk).compile()
    old = jax.jit(full_logits_logprobs, static_argnums=0).lower(graphdef, state, tokens, targets).compile()
    # Half of one float32 copy of the batch's logits (16 MiB): the whole-logits scorer needs all of it.
    budget = batch * length * vocab * 4 // 2
    assert scorer.memory_analysis().temp_size_in_bytes < budget <= old.memory_analysis().temp_size_in_bytes
    np.testing.assert_allclose(scorer(state, tokens, targets)[0], old(state, tokens, targets), rtol=1e-5)


def test_continuation_logprobs_errors(model):
    with pytest.raises(UserError, match="2 contexts but 1 continuations"):
        zero_shot.continuation_logprobs(model, [[1], [2]], [[3]])
    with pytest.raises(UserError, match="at least one token"):
        zero_shot.continuation_logprobs(model, [[]], [[3]])
    with pytest.raises(UserError, match="leaves no room for context"):
        zero_shot.continuation_logprobs(model, [[1]], [[3] * (MAX_LEN + 1)])
    whole, _ = zero_shot.continuation_logprobs(model, [[1]], [[3] * MAX_LEN])  # fills every position
    np.testing.assert_allclose(whole, [direct_logprob(model, [1], [3] * MAX_LEN)], rtol=1e-5)
    with pytest.raises(UserError, match=r"token ids must be in \[0, 97\)"):
        zero_shot.continuation_logprobs(model, [[1]], [[97]])
    empty, counts = zero_shot.continuation_logprobs(model, [], [])
    assert empty.shape == counts.shape == (0,)


class CharTokenizer:
    """One id per character, eos = 0: a stub scorer can read the text back from the ids."""
    eos_id = 0

    def encode(self, text):
        return [ord(c) for c in text]


def stub_model(monkeypatch, logprob_of, seen=None):
    """A model whose continuation log-prob is logprob_of(context text, continuation text)."""
    def fake(model, contexts, continuations, batch_size=32):
        texts = [("".join(map(chr, c[1:])), "".join(map(chr, k))) for c, k in zip(contexts, continuations)]
        if seen is not None:
            seen.extend(texts)
        return (np.array([logprob_of(*t) for t in texts], np.float64),
                np.array([len(k) for k in continuations], np.int64))
    monkeypatch.setattr(zero_shot, "continuation_logprobs", fake)
    return SimpleNamespace(tokenizer=CharTokenizer(), module=SimpleNamespace(config=SimpleNamespace(vocab_size=0x110000)))  # every char a row


def choice_example(idx, answers, label):
    return Example(idx, (f"story {idx} .", *answers), label)


def test_acc_sums_log_probs_and_acc_norm_divides_by_characters(monkeypatch):
    # " a" (2 chars) at -3 beats " a much longer one" (18 chars) at -9 by sum, loses per character.
    values = {" a": -3.0, " a much longer one": -9.0, " bb": -20.0, " ccc": -30.0}
    model = stub_model(monkeypatch, lambda ctx, cont: values[cont])
    answers = (" a much longer one"[1:], "a", "bb", "ccc")
    examples = [choice_example(0, answers, 0), choice_example(1, answers[::-1], 3)]
    scores, preds = zero_shot.evaluate(model, "synthetic_choice", examples)
    assert preds.tolist() == [1, 2]  # the prediction is the acc one
    assert scores == {"accuracy": 0.0, "acc_norm": 1.0}
    unlabelled = [Example(ex.idx, ex.texts, None) for ex in examples]
    scores, preds = zero_shot.evaluate(model, "synthetic_choice", unlabelled)
    assert scores == {} and preds.tolist() == [1, 2]


def test_sentiment_and_verbaliser_prompts(monkeypatch):
    seen = []
    model = stub_model(monkeypatch, lambda ctx, cont: -1.0 if cont == " positive" else -2.0, seen)
    scores, preds = zero_shot.evaluate(model, "sst2", [Example(0, ("great film",), 1), Example(1, ("dull",), 0)])
    assert seen[:2] == [("great film very", " negative"), ("great film very", " positive")]
    assert preds.tolist() == [1, 1] and scores == {"accuracy": 0.5}
    seen.clear()
    zero_shot.evaluate(model, "rte", [Example(0, ("it rains", "it is wet"), 0)])
    assert seen == [("sentence1: it rains sentence2: it is wet answer:", " entailment"),
                    ("sentence1: it rains sentence2: it is wet answer:", " not entailment")]


def test_few_shot_prompts_are_seeded_and_never_show_the_evaluated_example():
    task = get_task("synthetic_sentiment")
    train = synthetic_split(task, "train", size=12)
    examples = train[:6] + [Example(99, train[3].texts, train[3].label)]  # a duplicate of a train text
    a = zero_shot.build_prompts(task, examples, shots=4, train_examples=train, seed=5)
    assert a == zero_shot.build_prompts(task, examples, shots=4, train_examples=train, seed=5)
    assert a != zero_shot.build_prompts(task, examples, shots=4, train_examples=train, seed=6)
    verbal = {ex.texts[0] + " very " + task.label_names[ex.label] for ex in train}
    for ex, (prompt, choices) in zip(examples, a):
        *demos, last = prompt.split("\n")
        assert last == ex.texts[0] + " very" and choices == [" negative", " positive"]
        assert len(demos) == 4 and len(set(demos)) == 4 and set(demos) <= verbal
        assert not any(d.startswith(ex.texts[0] + " very") for d in demos)
    # Each example gets its own draw from the one generator.
    assert len({prompt.split("\n")[0] for prompt, _ in a}) > 1
    # With 12 train examples and one excluded, 11 shots is the most there is.
    zero_shot.build_prompts(task, train[:1], shots=11, train_examples=train)
    with pytest.raises(UserError, match="only 11 remain"):
        zero_shot.build_prompts(task, train[:1], shots=12, train_examples=train)


def brute_force_threshold(scores, positive):
    values = np.unique(scores)
    cuts = np.concatenate([[values[0] - 1], (values[:-1] + values[1:]) / 2, [values[-1] + 1]])

    def mcc(t):
        p = np.asarray(scores) > t
        y = np.asarray(positive, bool)
        return matthews(y.astype(int), p.astype(int))
    return max(cuts, key=mcc), max(map(mcc, cuts))


def test_fit_threshold_maximises_matthews():
    # Hand-made: above -2.5 the labels are 1 except one 0 at -1.0; the best cut is -2.5.
    scores = [-4.0, -3.0, -2.0, -1.5, -1.0, -0.5, -3.5]
    positive = [0, 0, 1, 1, 0, 1, 0]
    assert zero_shot.fit_threshold(scores, positive) == -2.5
    # Ties in the scores and random cases agree with an exhaustive search.
    rng = np.random.default_rng(0)
    for n in (5, 20, 50):
        scores = np.round(rng.normal(size=n), 1)
        positive = rng.random(n) < 1 / (1 + np.exp(-2 * scores))
        t = zero_shot.fit_threshold(scores, positive)
        best_t, best = brute_force_threshold(scores, positive)
        assert matthews(positive.astype(int), (scores > t).astype(int)) == pytest.approx(best)
        assert t == best_t  # the lowest threshold among equals


def test_acceptability_uses_the_train_threshold_or_the_median(monkeypatch):
    per_char = {"good one": -1.0, "fine": -2.0, "bad": -3.0, "worse": -4.0, "ok": -1.5, "meh": -3.5}
    model = stub_model(monkeypatch, lambda ctx, cont: per_char[cont] * len(cont))
    train = [Example(i, (s,), int(per_char[s] > -2.5)) for i, s in enumerate(["good one", "fine", "bad", "worse"])]
    examples = [Example(0, ("ok",), 1), Example(1, ("meh",), 1), Example(2, ("fine",), 0)]
    scores, preds = zero_shot.evaluate(model, "synthetic_acceptability", examples, train_examples=train)
    assert preds.tolist() == [1, 0, 1]  # threshold -2.5 from the train data
    assert scores["accuracy"] == pytest.approx(1 / 3) and scores["matthews"] == pytest.approx(-0.5)
    _, preds = zero_shot.evaluate(model, "cola", examples)  # the median, -2.0: strictly above it
    assert preds.tolist() == [1, 0, 0]


def test_a_model_without_an_eos_row_conditions_on_the_first_token(monkeypatch):
    """openai-gpt's eos is added past its embedding rows: contexts start with their own first token,
    and an acceptability sentence's first token only conditions the rest (one token: unscored)."""
    seen = []

    def fake(model, contexts, continuations, batch_size=32):
        seen.extend((list(c), list(k)) for c, k in zip(contexts, continuations))
        return np.array([-float(len(k)) ** 2 for k in continuations]), np.array([len(k) for k in continuations])

    monkeypatch.setattr(zero_shot, "continuation_logprobs", fake)
    tok = CharTokenizer()
    model = SimpleNamespace(tokenizer=tok, module=SimpleNamespace(config=SimpleNamespace(vocab_size=tok.eos_id)))  # eos is no row
    assert zero_shot.document_start(model) == []
    zero_shot.evaluate(model, "synthetic_sentiment", [Example(0, ("a fine film",), 1)])
    (prompt, choices), = zero_shot.build_prompts(get_task("synthetic_sentiment"), [Example(0, ("a fine film",), 1)])
    assert seen == [(tok.encode(prompt), tok.encode(c)) for c in choices]
    seen.clear()
    examples = [Example(0, ("ok",), 1), Example(1, ("x",), 0), Example(2, ("long one",), 0)]
    _, preds = zero_shot.evaluate(model, "cola", examples)
    assert seen == [([ord("o")], [ord("k")]), ([ord("l")], tok.encode("ong one"))]
    # mean log-probs -1 and -7, median -4; "x" has no scored token and counts as not acceptable
    assert preds.tolist() == [1, 0, 0]


def test_evaluate_errors(monkeypatch):
    model = stub_model(monkeypatch, lambda ctx, cont: 0.0)
    ex = [Example(0, ("text",), 1)]
    cases = [
        (dict(task="stsb", examples=[Example(0, ("a", "b"), 1.0)]), "cannot be scored zero-shot: a regression task"),
        (dict(mode="one_shot"), "unknown mode 'one_shot'"),
        (dict(shots=2), "zero_shot takes shots=0"),
        (dict(mode="few_shot"), "few_shot needs shots >= 1"),
        (dict(mode="few_shot", shots=1), "pass some"),
        (dict(mode="few_shot", shots=3, train_examples=ex * 2), "3 shots but only 2 train examples"),
        (dict(task="cola", mode="few_shot", shots=1, train_examples=ex), "no label words"),
        (dict(mode="few_shot", shots=1, train_examples=[Example(5, ("x",), None)]), "need labelled train"),
    ]
    for kw, message in cases:
        kw = {"task": "sst2", "examples": ex, **kw}
        with pytest.raises(UserError, match=message):
            zero_shot.evaluate(model, kw.pop("task"), kw.pop("examples"), **kw)
    with pytest.raises(UserError, match="needs the model's tokenizer"):
        zero_shot.evaluate(SimpleNamespace(tokenizer=None), "sst2", ex)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tokenizer = train_tokenizer(iter(synthetic.documents(200)), 400, tmp_path_factory.mktemp("tok") / "tok")
    small = dict(SMALL, **{"model.vocab_size": 512, "model.max_len": 64, "train.seq_len": 64})
    gpt = GPT.from_config("configs/tiny.py", seed=2, **small)
    gpt.tokenizer = tokenizer
    return gpt


def test_split_tokenises_the_whole_string(trained):
    tok = trained.tokenizer
    ctx, cont = zero_shot.encode_pair(tok, "the film was very", " positive")
    assert ctx[0] == tok.eos_id and tok.decode(ctx[1:] + cont) == "the film was very positive"
    assert tok.decode(cont).strip() == "positive"


@pytest.mark.parametrize("name,shots", [("synthetic_choice", 0), ("synthetic_sentiment", 2),
                                        ("synthetic_entailment", 0), ("synthetic_acceptability", 0)])
def test_evaluate_end_to_end_on_a_tiny_model(trained, name, shots):
    examples = synthetic_split(name, "validation", size=5)
    train = synthetic_split(name, "train", size=8)
    mode = "few_shot" if shots else "zero_shot"
    scores, preds = zero_shot.evaluate(trained, name, examples, mode=mode, shots=shots, train_examples=train,
                                       batch_size=8)
    task = get_task(name)
    assert preds.shape == (5,) and set(preds.tolist()) <= set(range(task.num_labels))
    assert set(scores) == ({"matthews", "accuracy"} if name == "synthetic_acceptability"
                           else {"accuracy", "acc_norm"} if name == "synthetic_choice" else {"accuracy"})
    assert all(np.isfinite(v) for v in scores.values())
    if name == "synthetic_sentiment":  # the predictions are the argmax of the two continuations
        prompts = zero_shot.build_prompts(task, examples, shots=shots, train_examples=train)
        pairs = [zero_shot.encode_pair(trained.tokenizer, p, c) for p, cs in prompts for c in cs]
        logp, _ = zero_shot.continuation_logprobs(trained, *zip(*pairs))
        assert preds.tolist() == logp.reshape(5, 2).argmax(1).tolist()
