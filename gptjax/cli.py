"""`gptjax <command>`: the one entry point.

Config overrides are `--config.section.key=value` (or `--config.section.key value`). Mistakes a
user can fix end in one `error:` line and exit code 2; `--debug` shows the traceback instead.
`gptjax compile` exits 3 when a step's plan does not fit the target's memory and 1 when the
target's compiler refuses the step.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import threading
import traceback

from gptjax.errors import (DOES_NOT_FIT_EXIT_CODE, PEER_FAILED_EXIT_CODE, REQUEUE_EXIT_CODE, WRITE_FAILED_EXIT_CODE,
                           CompileFailed, DoesNotFit, Preempted, UserError, WriteFailed)

REPO_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def split_overrides(extra: list[str]) -> list[str]:
    """Pulls `--config.a.b=v` / `--config.a.b v` out of the arguments argparse did not know."""
    overrides, i = [], 0
    while i < len(extra):
        arg = extra[i]
        if not arg.startswith("--config."):
            raise UserError(f"unrecognised argument '{arg}' (config overrides look like --config.train.steps=100)")
        body = arg[len("--config."):]
        if "=" not in body:
            if i + 1 >= len(extra):
                raise UserError(f"override '{arg}' has no value; write {arg}=VALUE")
            body, i = f"{body}={extra[i + 1]}", i + 1
        overrides.append(body)
        i += 1
    return overrides


def _load(args, extra):
    from gptjax.config import load_config
    return load_config(args.config, split_overrides(extra))


def cmd_pretrain(args, extra):
    from gptjax.train import pretrain
    config = _load(args, extra)
    summary = pretrain(config, args.workdir, progress=not args.no_progress)
    if summary.get("finished_before"):
        return
    last_eval = summary["eval"][-1]["eval_loss"] if summary["eval"] else None
    from gptjax import distributed
    distributed.log(f"done: loss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f}"
                    + (f", eval loss {last_eval:.4f}" if last_eval is not None else "")
                    + f"; checkpoint {summary['checkpoint']}")


def cmd_finetune(args, extra):
    from gptjax import distributed
    from gptjax.finetune import finetune, score_text
    summary = finetune(_load(args, extra), args.workdir, progress=not args.no_progress)
    if distributed.is_main():
        distributed.log(f"best: epoch {summary['epoch']} (step {summary['step']}): {score_text(summary['scores'])}; "
                        f"`gptjax eval --config {args.config} --workdir {args.workdir}` scores its validation "
                        f"and test splits")


def cmd_eval(args, extra):
    from gptjax.evaluate import evaluate
    evaluate(_load(args, extra), args.workdir)


def cmd_prepare(args, extra):
    import time

    from gptjax.data import corpus
    config = _load(args, extra)
    try:
        os.makedirs(args.workdir, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot use --workdir {args.workdir}: {e.strerror}") from None
    from gptjax.workdir_lock import JobLock
    start = time.perf_counter()
    with JobLock(args.workdir, "gptjax prepare"):
        tokenizer = corpus.workdir_tokenizer(config.data, args.workdir, config.model.vocab_size)
        for meta in corpus.prepare(config.data, args.workdir, tokenizer):
            print(f"{meta['source']} [{meta['split']}]: {meta['documents']:,} documents, {meta['tokens']:,} "
                  f"tokens, {len(meta['shard_tokens'])} shard(s)")
    print(f"prepared in {time.perf_counter() - start:.1f} s under {os.path.join(args.workdir, 'data')}; "
          f"`gptjax pretrain` with the same --config and --workdir reads it")


def cmd_tokenizer(args, extra):
    from gptjax.data.tokenizer import train_tokenizer
    if extra:
        raise UserError(f"unrecognised arguments: {' '.join(extra)}")
    tokenizer = train_tokenizer(args.input, args.vocab_size, args.output)
    print(f"wrote {args.output}.model ({tokenizer.vocab_size} pieces; pad={tokenizer.pad_id} "
          f"eos={tokenizer.eos_id} start={tokenizer.start_id} delim={tokenizer.delim_id} "
          f"extract={tokenizer.extract_id})")


def cmd_generate(args, extra):
    from gptjax.api import GPT
    if extra:
        raise UserError(f"unrecognised arguments: {' '.join(extra)}")
    model = GPT.from_pretrained(args.workdir)
    prompts = args.prompt
    if model.tokenizer is None:
        raise UserError(f"{args.workdir} has no tokenizer to turn the prompt into tokens (tokenizer.model, or a "
                        f"Hugging Face tokenizer.json or vocab.json + merges.txt)")
    texts = model.generate(prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    for prompt, text in zip(prompts, texts):
        print(json.dumps({"prompt": prompt, "completion": text}) if args.json else f"{prompt}{text}")


def cmd_convert(args, extra):
    from gptjax import hf
    from gptjax.api import GPT
    if extra:
        raise UserError(f"unrecognised arguments: {' '.join(extra)}")
    if args.from_hf and args.to and not args.to_hf:
        if args.step is not None:
            raise UserError("--step applies to --from WORKDIR only; a Hugging Face folder has no steps")
        if hf.read_hf_config(args.from_hf) is None:
            raise UserError(f"{args.from_hf} is not a Hugging Face model folder (no config.json with a model_type)")
        model = GPT.from_pretrained(args.from_hf)
        model.save(args.to)
        print(f"wrote {args.to} ({model.config.name}, {model.num_params():,} parameters, "
              f"block={model.config.model.block}); `gptjax.GPT.from_pretrained('{args.to}')` loads it")
    elif args.from_workdir and args.to_hf and not args.to:
        model = GPT.from_pretrained(args.from_workdir, args.step)
        hf.save_hf(model.model_config, model.module, args.to_hf, model.tokenizer)
        kind = "GPT2LMHeadModel" if model.config.model.block == "pre_ln" else "OpenAIGPTLMHeadModel"
        print(f"wrote {args.to_hf} as {kind}; transformers.AutoModelForCausalLM.from_pretrained loads it")
    else:
        raise UserError("convert takes --from-hf DIR --to WORKDIR, or --from WORKDIR --to-hf DIR")


def cmd_harness(args, extra):
    if extra:
        raise UserError(f"unrecognised arguments: {' '.join(extra)}")
    try:
        from gptjax import harness
    except ImportError as e:
        raise UserError(f"gptjax harness needs lm-evaluation-harness ({e.name or e} is missing): "
                        f"pip install 'gptjax[eval]'") from None
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    harness.run(args.model, tasks, args.output, include_path=args.include_path, num_fewshot=args.num_fewshot,
                limit=args.limit, batch_size=args.batch_size)
    print(f"wrote {args.output}")


def cmd_compile(args, extra):
    from gptjax import compiled, targets
    config = _load(args, extra)
    kinds = compiled.KINDS if args.kind == "both" else (args.kind,)
    target = targets.open_target(args.target)
    too_large = []
    for kind in kinds:
        record = compiled.analyse(config, target, kind, args.hlo)
        print(json.dumps(record) if args.json else compiled.format_record(record), flush=True)
        if not record["fits"]:
            too_large.append(compiled.advice(record))
    if too_large:
        raise DoesNotFit("; ".join(too_large))


def cmd_demo(args, extra):
    from gptjax.demo import run_demo
    config_path = args.config or os.path.join(REPO_CONFIGS, "tiny.py")
    run_demo(config_path, split_overrides(extra), args.workdir)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptjax", description=__doc__.split("\n")[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks for every error")
    parser.add_argument("--coordinator", help="multi-process runs: HOST:PORT of process 0")
    parser.add_argument("--num-processes", type=int, help="multi-process runs: how many processes")
    parser.add_argument("--process-id", type=int, help="multi-process runs: this process's id, 0..N-1")
    sub = parser.add_subparsers(dest="command", required=True)
    # --debug is accepted after the command too; SUPPRESS keeps the top-level value otherwise.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")

    p = sub.add_parser("pretrain", parents=[common], help="pretrain a decoder on a corpus")
    p.add_argument("--config", required=True, help="a configs/*.py file")
    p.add_argument("--workdir", required=True, help="where config.json, metrics.jsonl and checkpoints go")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (metrics.jsonl is still written)")
    p.set_defaults(fn=cmd_pretrain)

    p = sub.add_parser("finetune", parents=[common], help="fine-tune on a task (GPT-1 input transforms, task head)")
    p.add_argument("--config", required=True, help="configs/glue.py, with --config.task=NAME")
    p.add_argument("--workdir", required=True, help="where the fine-tuning run goes (the same command resumes)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (metrics.jsonl is still written)")
    p.set_defaults(fn=cmd_finetune)

    p = sub.add_parser("eval", parents=[common], help="evaluate fine-tuned runs (or a pretrained LM zero/few-shot)")
    p.add_argument("--config", required=True, help="configs/glue.py, with --config.task=NAME|LIST|all")
    p.add_argument("--workdir", required=True, help="a fine-tuning run, or a folder of runs named by task")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("prepare", parents=[common], help="tokenize a config's corpus once into WORKDIR/data")
    p.add_argument("--config", required=True, help="a configs/*.py file")
    p.add_argument("--workdir", required=True, help="the workdir pretraining will use")
    p.set_defaults(fn=cmd_prepare)

    p = sub.add_parser("tokenizer", parents=[common], help="train a SentencePiece BPE tokenizer on text files")
    p.add_argument("--input", required=True, help="text files: a path or a glob such as 'corpus/*.txt'")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--output", required=True, help="output prefix: writes PREFIX.model and PREFIX.vocab")
    p.set_defaults(fn=cmd_tokenizer)

    p = sub.add_parser("generate", parents=[common], help="sample continuations from a trained workdir")
    p.add_argument("--workdir", required=True)
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch of prompts")
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="one JSON object per prompt")
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("convert", parents=[common],
                       help="Hugging Face GPT-2 / openai-gpt folder <-> gptjax workdir")
    p.add_argument("--from-hf", metavar="DIR", help="a folder with config.json and model.safetensors / pytorch_model.bin")
    p.add_argument("--to", metavar="WORKDIR", help="a new gptjax workdir (config.json + params checkpoint)")
    p.add_argument("--from", dest="from_workdir", metavar="WORKDIR", help="a gptjax workdir to export")
    p.add_argument("--to-hf", metavar="DIR", help="writes config.json + model.safetensors (pre-LN as GPT-2, post-LN as openai-gpt)")
    p.add_argument("--step", type=int, help="with --from: the checkpoint step (default: newest)")
    p.set_defaults(fn=cmd_convert)

    p = sub.add_parser("harness", parents=[common], help="lm-evaluation-harness tasks on a model, in process")
    p.add_argument("--model", required=True, help="a gptjax workdir or checkpoint, or a Hugging Face folder")
    p.add_argument("--tasks", required=True, help="comma-separated harness task names")
    p.add_argument("--include-path", help="a folder of extra task YAMLs")
    p.add_argument("--num-fewshot", type=int, help="demonstrations per prompt (default: each task's own)")
    p.add_argument("--limit", type=int, help="score only the first N documents of each task")
    p.add_argument("--batch-size", type=int, default=32, help="rows per forward pass")
    p.add_argument("--output", required=True, help="the harness's results JSON")
    p.set_defaults(fn=cmd_harness)

    p = sub.add_parser("compile", parents=[common], help="compile the train steps for a GPU/TPU/CPU target without "
                                                         "the hardware: memory plan, fits or not, collectives, kernels")
    p.add_argument("--config", required=True, help="a configs/*.py file")
    p.add_argument("--target", required=True, help="h100, h100:8, h200:8, a TPU slice (v5e:2x2, v5p:2x2x1) or cpu:N")
    p.add_argument("--kind", choices=("pretrain", "finetune", "both"), default="pretrain",
                   help="which train step (default: pretrain; finetune compiles a two-class task's step)")
    p.add_argument("--json", action="store_true", help="one JSON object per kind of step")
    p.add_argument("--hlo", metavar="DIR", help="write the optimized HLO of each step to DIR/<kind>.hlo.txt")
    p.set_defaults(fn=cmd_compile)

    p = sub.add_parser("demo", parents=[common], help="synthetic corpus -> tokenizer -> pretrain -> samples, on CPU in minutes")
    p.add_argument("--workdir", default="runs/demo")
    p.add_argument("--config", default=None, help="default: configs/tiny.py")
    p.set_defaults(fn=cmd_demo)
    return parser


def _resume_point(args) -> str:
    """Where the same command would resume, for the last line of a run that stopped early."""
    workdir = getattr(args, "workdir", None)
    if args.command not in ("pretrain", "finetune") or not workdir:
        return ""
    from gptjax import checkpoint
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    steps = checkpoint.complete_steps(directory)
    if not steps:
        return "; no checkpoint was written, so the same command starts afresh"
    return f"; the checkpoints up to step {steps[-1]} are complete: the same command resumes from {directory}/{steps[-1]}"


def _quiet_libraries(debug: bool) -> None:
    """Orbax and absl log every retry and fallback with a traceback; gptjax reports each in one
    line of its own, so their logs are shown with --debug only."""
    import logging
    for name in ("absl", "asyncio"):
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.CRITICAL)
    if debug:
        return
    # A failed asynchronous write leaves TensorStore callbacks aimed at Orbax's closed event loop;
    # each would print a traceback of its own.
    default_hook = sys.unraisablehook

    def hook(unraisable):
        if not (isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value)):
            default_hook(unraisable)

    sys.unraisablehook = hook


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    from gptjax import peer_watch
    _quiet_libraries(args.debug)
    try:
        code = _run(args, extra)
    except BaseException:
        if not peer_watch.watching():
            raise
        traceback.print_exc()
        code = 1
    if not peer_watch.watching():
        return code
    # The other processes hear how this one ends; after a failure JAX's own shutdown would wait
    # for them at a barrier, so this process leaves at once.
    peer_watch.leave(code)
    if code not in peer_watch.CLEAN_EXITS:
        sys.stdout.flush()
        sys.stderr.flush()
        peer_watch.exit_now(code)
    return code


def _run(args, extra) -> int:
    from gptjax import distributed, peer_watch, xla_flags
    try:
        if args.command == "compile":  # it compiles for devices it does not open (targets.py)
            from gptjax import targets
            targets.prepare_host(args.target)
        xla_flags.apply()  # $GPTJAX_XLA_FLAGS, before anything starts a backend
        if args.command != "compile":
            distributed.initialize(args.coordinator, args.num_processes, args.process_id)
            peer_watch.start(lambda text: _peer_exit(text, args))
        args.fn(args, extra)
    except DoesNotFit as e:
        distributed.log(f"error: {e}", sys.stderr)
        return DOES_NOT_FIT_EXIT_CODE
    except CompileFailed as e:
        if args.debug:
            raise
        distributed.log(f"error: {e}", sys.stderr)
        return 1
    except UserError as e:
        if args.debug:
            raise
        distributed.log(f"error: {e}", sys.stderr)
        return 2
    except WriteFailed as e:
        if args.debug:
            raise
        if distributed.peer_failed(e):  # a save whose collective lost the other process: not the disk
            _peer_exit(distributed.peer_failure_text(e), args)
        distributed.log(f"error: {e}", sys.stderr)
        return WRITE_FAILED_EXIT_CODE
    except Preempted as e:
        distributed.log(str(e), sys.stderr)
        return 130 if e.interrupted else REQUEUE_EXIT_CODE
    except KeyboardInterrupt:
        distributed.log("interrupted" + _resume_point(args), sys.stderr)
        return 130
    except OSError as e:
        if args.debug or e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = e.filename or (f"into {args.workdir}" if getattr(args, "workdir", None) else "the output")
        distributed.log(f"error: no space left on the device writing {where}"
                        f"{_resume_point(args)}; free space and run the same command again", sys.stderr)
        return WRITE_FAILED_EXIT_CODE
    except Exception as e:  # noqa: BLE001
        if args.debug or not distributed.peer_failed(e):
            raise
        _peer_exit(distributed.peer_failure_text(e), args)
    return 0


_peer_exit_lock = threading.Lock()


def _peer_exit(text: str, args) -> None:
    """The job cannot go on without the failed process, and JAX's own shutdown would wait for it
    (then abort with a C++ trace): one line, then exit at once. Called from the main thread (a
    collective that failed) or from the peer watch, whichever hears first; one line either way."""
    from gptjax import distributed, peer_watch
    if not _peer_exit_lock.acquire(timeout=10):
        return
    peer_watch.stop_all(text)
    distributed.log(f"error: {text}{_resume_point(args)} once every process can run (relaunch the whole job)",
                    sys.stderr)
    sys.stderr.flush()
    sys.stdout.flush()
    peer_watch.exit_now(PEER_FAILED_EXIT_CODE)


if __name__ == "__main__":
    sys.exit(main())
