"""`gptjax demo` end to end on a shrunken budget: pretrain, fine-tune three ways, evaluate, report.

The full demo (`make demo`, 300 pretraining steps, hundreds of examples per task) takes minutes;
its numbers are in README.md. Here every stage runs, with the same code, on a few steps."""

import json
import os

from gptjax import demo
from gptjax.tasks import get_task, synthetic_split


def test_demo_writes_the_three_columns(tmp_path, monkeypatch, capsys):
    # Two of the four tasks (one of two sequences per example, one of four) and a one-layer model keep
    # it to about 90 s on 2 cores, most of it compiling: each run and each evaluation compiles its own
    # init, step and predict programs, about 60 in all.
    tasks = {name: ["finetune.max_examples=32"] for name in ("synthetic_coherence", "synthetic_choice")}
    monkeypatch.setattr(demo, "TASKS", tasks)
    monkeypatch.setattr(demo, "FINETUNE", [*demo.FINETUNE, "finetune.epochs=1", "model.n_layer=1",
                                           "finetune.max_len=32"])
    workdir = str(tmp_path / "demo")
    overrides = ["train.steps=10", "data.num_documents=300", "train.eval_every=0", "model.n_layer=1"]
    demo.run_demo("configs/tiny.py", overrides, workdir)
    out = capsys.readouterr().out
    results = json.load(open(os.path.join(workdir, "results.json")))
    assert set(results) == {"with_pretraining", "from_scratch", "no_aux_lm"}
    for setting, scores in results.items():
        assert set(scores) == set(demo.TASKS)
        for name, value in scores.items():
            # the reported number is the task's first metric on its test split, as eval wrote it
            metrics = json.load(open(os.path.join(workdir, "finetune", setting, "eval", name, "metrics.json")))
            assert value == metrics["splits"]["test"]["scores"][get_task(name).metrics[0]]
            assert metrics["splits"]["test"]["examples"] == len(synthetic_split(name, "test"))
    table = open(os.path.join(workdir, "results.md")).read()
    assert "| with pretraining | from scratch | no aux lm |" in table and table in out
    # The from-scratch runs share nothing with the pretrained model but its tokenizer.
    scratch = json.load(open(os.path.join(workdir, "finetune", "from_scratch", "synthetic_choice", "config.json")))
    assert scratch["init_from"] == "" and scratch["finetune"]["lm_weight"] == 0.5
    no_lm = json.load(open(os.path.join(workdir, "finetune", "no_aux_lm", "synthetic_choice", "config.json")))
    assert no_lm["finetune"]["lm_weight"] == 0.0 and no_lm["init_from"] == workdir

    demo.run_demo("configs/tiny.py", overrides, workdir)  # again: shows the finished runs
    out = capsys.readouterr().out
    assert "already holds a trained run" in out and out.count("done before") == 6
    assert json.load(open(os.path.join(workdir, "results.json"))) == results
