"""lm-evaluation-harness on gptjax models: local task YAMLs over local JSONL, nothing downloaded."""

import json
import sys

import numpy as np
import pytest

import gptjax

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.utils import get_rolling_token_windows  # noqa: E402

from gptjax import GPT, cli, zero_shot  # noqa: E402
from gptjax.data import synthetic  # noqa: E402
from gptjax.data.tokenizer import train_tokenizer  # noqa: E402
from gptjax.errors import UserError  # noqa: E402
from gptjax.harness import HarnessLM  # noqa: E402
from gptjax.tasks import get_task, synthetic_split  # noqa: E402

MAX_LEN = 64
SMALL = {"model.n_layer": 1, "model.d_model": 32, "model.n_head": 2, "model.d_ff": 64, "model.max_len": MAX_LEN,
         "model.vocab_size": 512, "model.dtype": "float32", "model.init_std": 0.3, "train.seq_len": MAX_LEN}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    gpt = GPT.from_config("configs/tiny.py", seed=5, **SMALL)
    gpt.tokenizer = train_tokenizer(iter(synthetic.documents(300)), 400, root / "tok")
    gpt.save(str(root / "model"))
    return str(root / "model")


@pytest.fixture(scope="module")
def lm(model_dir):
    return HarnessLM.from_path(model_dir, batch_size=4)


def request(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


@pytest.fixture(scope="module")
def choice_task(tmp_path_factory):
    """synthetic_choice's items as a local harness task: gptjax's own prompts and candidates."""
    from gptjax.bench.harness_speed import write_choice_task

    folder = tmp_path_factory.mktemp("tasks")
    return folder, write_choice_task(str(folder), 24)


def test_multiple_choice_scores_equal_gptjax_zero_shot(model_dir, tmp_path, monkeypatch, capsys):
    """Through `python -m gptjax.bench harness`, which writes the task, runs `gptjax harness`'s
    model on it and times both scorers."""
    from gptjax.bench import cli as bench

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    capsys.readouterr()
    assert bench.main(["harness", "--model", model_dir, "--workdir", str(tmp_path), "--items", "24",
                       "--batch-size", "4"]) == 0
    printed = capsys.readouterr().out
    assert "bench_choice" in printed and "acc_norm" in printed
    rates = [float(line.split(": ")[1].split()[0]) for line in printed.splitlines() if "items/s" in line]
    assert len(rates) == 2 and all(r > 0 for r in rates)
    results = json.loads((tmp_path / "results.json").read_text())["results"]["bench_choice"]
    examples = synthetic_split(get_task("synthetic_choice"), "validation", size=24)
    ours, _ = zero_shot.evaluate(GPT.from_pretrained(model_dir), "synthetic_choice", examples, batch_size=4)
    assert results["acc,none"] == pytest.approx(ours["accuracy"], abs=1e-12)
    assert results["acc_norm,none"] == pytest.approx(ours["acc_norm"], abs=1e-12)


def test_loglikelihood_is_the_zero_shot_scorer_and_a_batch_changes_nothing(lm, model_dir):
    long = ("anna lives near the town . " * 12, " she has a brown horse .")
    short = ("the cat", " sat")
    both = lm.loglikelihood([request("loglikelihood", *long), request("loglikelihood", *short)])
    alone = [lm.loglikelihood([request("loglikelihood", *pair)])[0] for pair in (long, short)]
    # Padded to the long row's length, the short row runs through other shapes: float32 rounding only.
    assert [g for _, g in both] == [g for _, g in alone]
    np.testing.assert_allclose([s for s, _ in both], [s for s, _ in alone], rtol=1e-6)
    gpt = GPT.from_pretrained(model_dir)
    for (context, continuation), (logp, _) in zip((long, short), both):
        ctx, cont = zero_shot.encode_pair(gpt.tokenizer, context, continuation)
        expected, _ = zero_shot.continuation_logprobs(gpt, [ctx], [cont])
        assert logp == pytest.approx(float(expected[0]), rel=1e-6)


def test_is_greedy_is_the_models_argmax_at_every_continuation_token(lm, model_dir):
    gpt = GPT.from_pretrained(model_dir)
    pairs = [("the cat", " sat"), ("anna lives near the", " town"), ("the students that the farmer", " feed")]
    # and the model's own first choice after contexts where that token is text that encodes back to it
    words = " ".join(synthetic.documents(20, seed=7)).split()
    for n in range(1, len(words)):
        context = " ".join(words[:n])
        ctx = [gpt.tokenizer.eos_id, *gpt.tokenizer.encode(context)]
        best = int(np.argmax(np.asarray(gpt.logits([ctx]))[0, -1]))
        text = gpt.tokenizer.decode(ctx[1:] + [best])[len(gpt.tokenizer.decode(ctx[1:])):]
        if text and zero_shot.encode_pair(gpt.tokenizer, context, text) == (ctx, [best]):
            pairs.append((context, text))
        if len(pairs) == 5:
            break
    flags = [g for _, g in lm.loglikelihood([request("loglikelihood", *p) for p in pairs])]
    expected = []
    for context, continuation in pairs:
        ctx, cont = zero_shot.encode_pair(gpt.tokenizer, context, continuation)
        row = ctx + cont
        argmax = np.asarray(gpt.logits([row[:-1]]))[0].argmax(-1)
        expected.append(all(argmax[len(ctx) - 1 + i] == t for i, t in enumerate(cont)))
    assert flags == expected and any(flags) and not all(flags)


def test_rolling_loglikelihood_sums_disjoint_windows_from_gpt_logits(lm, model_dir):
    gpt = GPT.from_pretrained(model_dir)
    text = " ".join(synthetic.documents(12, seed=3))
    ids = gpt.tokenizer.encode(text)
    assert len(ids) > 2 * MAX_LEN  # three windows or more
    expected = 0.0
    for inputs, predicted in get_rolling_token_windows(ids, gpt.tokenizer.eos_id, MAX_LEN, 1):
        logits = np.asarray(gpt.logits([inputs]), np.float64)[0]
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        positions = range(len(inputs) - len(predicted), len(inputs))
        expected += sum(logp[p, t] for p, t in zip(positions, predicted))
    got, short = lm.loglikelihood_rolling([request("loglikelihood_rolling", text),
                                           request("loglikelihood_rolling", "the cat")])
    assert got == pytest.approx(expected, rel=1e-5)
    assert short == pytest.approx(lm.loglikelihood([request("loglikelihood", "", "the cat")])[0][0], rel=1e-6)


def test_generate_until_is_greedy_generate_cut_at_the_stop_string(lm, model_dir):
    gpt = GPT.from_pretrained(model_dir)
    contexts = ["the cat", "anna lives near the town ."]
    got = lm.generate_until([request("generate_until", c, {"until": ["."], "max_gen_toks": 12}) for c in contexts])
    for context, text in zip(contexts, got):
        assert text == gpt.generate(context, max_new_tokens=12, temperature=0.0).split(".")[0]
    # more new tokens than the model's length: the context keeps its last tokens
    long = lm.generate_until([request("generate_until", "the cat " * 40, {"until": [], "max_gen_toks": 500})])
    assert isinstance(long[0], str)


def test_bad_harness_inputs_are_one_line(model_dir, choice_task, tmp_path, capsys, monkeypatch):
    folder, _ = choice_task

    def one_line(*args):
        capsys.readouterr()
        code = cli.main(["harness", *args, "--output", str(tmp_path / "r.json")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, err
        return err[0]

    assert "unknown harness task 'bench_choise'; did you mean bench_choice" in one_line(
        "--model", model_dir, "--tasks", "bench_choise", "--include-path", str(folder))
    assert "--model {} does not exist".format(tmp_path / "nothing") in one_line(
        "--model", str(tmp_path / "nothing"), "--tasks", "bench_choice", "--include-path", str(folder))
    (tmp_path / "empty").mkdir()  # a folder that holds no model: the loader's own one-line error
    with pytest.raises(UserError, match="is not a gptjax workdir") as e:
        HarnessLM.from_path(str(tmp_path / "empty"))
    assert "\n" not in str(e.value)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if lm-evaluation-harness were not installed
    monkeypatch.delitem(sys.modules, "gptjax.harness", raising=False)
    monkeypatch.delattr(gptjax, "harness", raising=False)
    assert "pip install 'gptjax[eval]'" in one_line("--model", model_dir, "--tasks", "bench_choice")
