"""The released GPT's recipe on tiny local folders: weights with their own tokenizers through
GPT.from_pretrained and convert, fine-tuning with the added token rows, eval, zero/few-shot scoring,
and pretraining with a Hugging Face vocabulary. Numbers are checked against transformers."""

import json
import shutil

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")

from hf_folders import corpus, make_folders, model_folder, ref_ids, reference  # noqa: E402

from gptjax.data.hf_tokenizer import HFTokenizer  # noqa: E402
from gptjax.data.tokenizer import CONTROL_SYMBOLS, train_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return make_folders(tmp_path_factory.mktemp("hf"), transformers)


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("spm") / "sp"
    train_tokenizer(iter(corpus(300, seed=1)), 400, prefix)
    return prefix.parent / "sp.model"


# ---------------------------------------------------------------------------------------------
# A released-model folder (weights + tokenizer files) through GPT.from_pretrained and convert.

@pytest.mark.parametrize("kind", ["gpt2", "openai"])
def test_a_model_folder_brings_its_tokenizer_and_generates_as_transformers(folders, tmp_path, kind, capsys):
    from gptjax.api import GPT

    torch, model, folder, vocab = model_folder(folders, tmp_path, kind)
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

    _, _, folder, vocab = model_folder(folders, tmp_path, kind)
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

    torch, model, folder, vocab = model_folder(folders, tmp_path, kind)
    pretrained = GPT.from_pretrained(str(folder))
    tok = pretrained.tokenizer
    grown = ft.added_rows(pretrained.model_config.vocab_size, tok)
    config = ft.effective_config(load_config("configs/tiny.py", ["task=synthetic_paraphrase", "model.dtype=float32",
                                                                 "finetune.eval_batch_size=8"]), pretrained, grown)
    assert grown == len(tok.added_tokens) == tok.vocab_size - vocab and config.model.vocab_size == tok.vocab_size
    task = get_task("synthetic_paraphrase")
    runner = ft.TaskRunner.from_config(config, task, 1, pad_id=tok.pad_id)
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

    _, _, folder, vocab = model_folder(folders, tmp_path, kind)
    glue = glue_folder(str(tmp_path / "glue"), 146)  # WNLI's official test size
    run = tmp_path / "run"
    common = ["--config", "configs/glue.py", "--config.task=wnli", f"--config.task_data=tsv:{glue}",
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
    from gptjax import checkpoint, sharding
    from gptjax.api import GPT
    from gptjax.config import load_config
    from gptjax.evaluate import load_finetuned

    export = tmp_path / "export"
    assert cli.main(["convert", "--from", str(run), "--to-hf", str(export)]) == 0
    tok = HFTokenizer.load(str(folder))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(export)).eval()
    assert loaded.config.vocab_size == tok.vocab_size == vocab + len(added)
    best = load_finetuned(str(run), sharding.make_mesh(load_config("configs/glue.py", ["task=wnli"]).mesh)).params
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

    torch, model, folder, vocab = model_folder(folders, tmp_path, kind)
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
    assert "holds the SentencePiece tokenizer its data and checkpoints were made with" in one_line(
        held, f"--config.data.tokenizer={folder}", "--config.model.vocab_size=640")
    assert "does not exist; give a SentencePiece .model, a Hugging Face tokenizer folder" in \
        one_line(tmp_path / "c", f"--config.data.tokenizer={tmp_path / 'nothing'}")
