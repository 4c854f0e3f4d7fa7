"""`bench loop`, `bench data` and `bench checkpoint`: what training costs besides the step itself.

`loop` measures what the pretraining loop adds to the bare step (input pipeline, logging,
evaluation, saves), `data` the input pipeline's token rate, `checkpoint` how long a save holds up
the loop. Each returns (name, value) rows.
"""

from __future__ import annotations

import os
import time

import jax

from gptjax.bench import train_step
from gptjax.errors import UserError


def bench_loop(config, workdir: str, steps: int) -> list[tuple[str, float]]:
    """What the pretraining loop costs on top of the bare step, at the config's intervals: the
    input pipeline and logging (inside the loop's step time), evaluation and the blocking part
    of saves (paused out of it, so timed apart and amortised over train.eval_every and
    train.checkpoint_every)."""
    from gptjax import checkpoint
    from gptjax.data import corpus
    from gptjax.train import Trainer, batch_settings, pretrain

    if os.path.exists(os.path.join(workdir, "checkpoints")):
        raise UserError(f"{workdir} already holds a run; pass a new --workdir")
    t = config.train
    config.train.steps = steps
    summary = pretrain(config, workdir, progress=False)
    timed = summary["history"][1:]  # the first record includes compilation
    if not timed:
        raise UserError(f"--steps {steps} leaves no logged interval after the first step; raise it above "
                        f"train.log_every={t.log_every}")
    counts = [timed[0]["step"] - 1] + [b["step"] - a["step"] for a, b in zip(timed, timed[1:])]
    loop_ms = sum(r["step_ms"] * n for r, n in zip(timed, counts)) / sum(counts)

    # Evaluation and a save, each timed on its second call: the loop's first one compiles the
    # evaluation or sets the checkpointer up, which a long run pays once.
    trainer = Trainer.from_config(config)
    tokenizer = corpus.workdir_tokenizer(config.data, workdir, config.model.vocab_size)
    _, eval_batches = corpus.pretraining_batches(config.data, tokenizer, workdir, **batch_settings(config.train))
    eval_s = []
    for _ in range(2):
        start = time.perf_counter()
        trainer.eval_loss(eval_batches)
        eval_s.append(time.perf_counter() - start)
    saver = checkpoint.Checkpointer(os.path.join(workdir, "bench-saves"))
    save_s = []
    for step in (1, 2):
        start = time.perf_counter()
        saver.save(step, trainer.state.params, trainer.state.opt_state, {"step": step}, None)
        save_s.append(time.perf_counter() - start)
        saver.wait()
    saver.close()
    del trainer
    bare_ms = train_step.bench_train(config, steps=max(sum(counts) // 2, 5), warmup=3)["step_ms"]
    eval_ms = 1000 * eval_s[1] / t.eval_every if t.eval_every else 0.0
    save_ms = 1000 * save_s[1] / t.checkpoint_every if t.checkpoint_every else 0.0
    total = loop_ms - bare_ms + eval_ms + save_ms
    return [("bare step ms (random batch, no loop)", bare_ms),
            (f"loop step ms (loader, logging every {t.log_every})", loop_ms),
            (f"evaluation s, every {t.eval_every or '-'} steps (first call {eval_s[0]:.2f} s)", eval_s[1]),
            (f"save s the loop waits, every {t.checkpoint_every or '-'} steps", save_s[1]),
            ("loop overhead ms per step, amortised", total),
            ("loop overhead % of the bare step", 100 * total / bare_ms)]


def bench_data(config, workdir: str, steps: int, hf_tokenizer: str = "") -> list[tuple[str, float]]:
    """Loader tokens/s from prepared token files, the on-the-fly tokenization rate of each
    tokenizer backend on the same documents (each counting its own tokens), and the rate at which
    the same documents stream from JSONL, Parquet and a datasets save_to_disk folder."""
    from gptjax.data import corpus
    from gptjax.data.loader import Loader
    from gptjax.data.sources import parse_sources
    from gptjax.train import batch_settings

    tokenizer = corpus.workdir_tokenizer(config.data, workdir, config.model.vocab_size)
    documents = corpus.corpus_documents(config.data)
    texts = [text for spec in parse_sources(config.data.source) for text in documents[spec][0]]
    rates = [("on-the-fly tokenization", _encode_rate(tokenizer.encode_batch, texts))]
    if hf_tokenizer:
        from gptjax.data.hf_tokenizer import HFTokenizer
        rates.append(("Hugging Face tokenizers (HFTokenizer)", _encode_rate(HFTokenizer.load(hf_tokenizer).encode_batch,
                                                                            texts)))
        try:
            import transformers
        except ImportError:
            pass
        else:
            fast = transformers.AutoTokenizer.from_pretrained(hf_tokenizer)
            rates.append(("transformers fast tokenizer",
                          _encode_rate(lambda batch: fast(batch, add_special_tokens=False)["input_ids"], texts)))
    corpus.prepare(config.data, workdir, tokenizer)
    batches, _ = corpus.pretraining_batches(config.data, tokenizer, workdir, **batch_settings(config.train))
    loader = Loader(batches, steps + 1, num_workers=config.data.num_workers)
    jax.block_until_ready(next(loader))
    start = time.perf_counter()
    for _ in range(steps):
        batch = next(loader)
    jax.block_until_ready(batch)
    prepared = steps * config.train.batch_size * config.train.seq_len / (time.perf_counter() - start)
    return [("loader from prepared files", prepared), *rates,
            *_format_rates(config.data, os.path.join(workdir, "formats"), tokenizer, texts)]


def _write_formats(folder: str, texts: list[str], field: str) -> list[tuple[str, str]]:
    """The same documents as one JSONL file, four Parquet files and a save_to_disk folder:
    (label, data.source) of each."""
    import json
    import shutil

    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(os.path.join(folder, "parquet"))
    with open(os.path.join(folder, "docs.jsonl"), "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({field: text}, ensure_ascii=False) + "\n")
    cut = -(-len(texts) // 4)
    for number in range(4):
        pq.write_table(pa.table({field: texts[number * cut:(number + 1) * cut]}),
                       os.path.join(folder, "parquet", f"part-{number}.parquet"), row_group_size=8192)
    datasets.disable_progress_bars()
    datasets.Dataset.from_dict({field: texts}).save_to_disk(os.path.join(folder, "hf"))
    return [("JSONL", f"jsonl:{folder}/docs.jsonl"), ("Parquet", f"parquet:{folder}/parquet/*.parquet"),
            ("datasets folder", f"hf:{folder}/hf")]


def _format_rates(data_cfg, folder: str, tokenizer, texts: list[str]) -> list[tuple[str, float]]:
    """Per format: reading alone, and reading with tokenization in chunks as `gptjax prepare` does,
    as documents/s (in the row's name) and tokens/s (the corpus's tokens over the time taken)."""
    import itertools

    from gptjax.data.sources import iter_source_documents, text_field

    rows = []
    for label, spec in _write_formats(folder, texts, text_field(data_cfg)):
        start = time.perf_counter()
        tokens = 0
        stream = iter_source_documents(spec, data_cfg)
        while chunk := list(itertools.islice(stream, 4096)):
            tokens += sum(len(ids) + 1 for ids in tokenizer.encode_batch(chunk))
        tokenized_s = time.perf_counter() - start
        # Reading alone takes milliseconds on a small corpus; the best of three passes is the one
        # least disturbed by whatever else the machine runs.
        read_s = min(_seconds(lambda: sum(1 for _ in iter_source_documents(spec, data_cfg))) for _ in range(3))
        rows += [(f"{label} read ({len(texts) / read_s:,.0f} documents/s)", tokens / read_s),
                 (f"{label} read + tokenize ({len(texts) / tokenized_s:,.0f} documents/s)", tokens / tokenized_s)]
    return rows


def _seconds(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def _encode_rate(encode_batch, texts: list[str]) -> float:
    """Tokens per second of one batch encoding of `texts` (plus one end-of-document per text)."""
    start = time.perf_counter()
    tokens = sum(len(ids) + 1 for ids in encode_batch(texts))
    return tokens / (time.perf_counter() - start)


def bench_checkpoint(config, workdir: str, steps: int) -> list[tuple[str, float]]:
    """How long a save holds up the training loop, asynchronous vs synchronous, and whether the
    steps while an asynchronous save is written in the background are slower."""
    from gptjax import checkpoint
    from gptjax.train import Trainer

    trainer = Trainer.from_config(config)
    batch = train_step.random_batch(config, 0)
    jax.block_until_ready(trainer.step(batch))

    def step_ms(count: int) -> float:
        start = time.perf_counter()
        for _ in range(count):
            metrics = trainer.step(batch)
        jax.block_until_ready(metrics)
        return 1000 * (time.perf_counter() - start) / count

    step_ms(steps)  # the first steps after compilation run slow on some backends
    plain = step_ms(steps)
    rows = [("state size GiB", sum(x.nbytes for x in jax.tree.leaves(trainer.state)) / 2**30),
            ("step ms, no save", plain)]
    sync = checkpoint.Checkpointer(os.path.join(workdir, "sync"), async_save=False)
    start = time.perf_counter()
    sync.save(1, trainer.state.params, trainer.state.opt_state, {"step": 1}, None)
    rows.append(("synchronous save s (loop blocked)", time.perf_counter() - start))
    sync.close()
    saver = checkpoint.Checkpointer(os.path.join(workdir, "async"))
    start = time.perf_counter()
    saver.save(1, trainer.state.params, trainer.state.opt_state, {"step": 1}, None)
    rows.append(("async save s (loop blocked)", time.perf_counter() - start))
    rows.append(("step ms, first after async save", step_ms(1)))
    rows.append((f"step ms, next {steps} during/after it", step_ms(steps)))
    saver.wait()
    rows.append(("async save s (until on disk)", time.perf_counter() - start))
    saver.close()
    return rows
