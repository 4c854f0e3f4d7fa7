"""How a run ends early, and the exit code each way has.

    2    UserError: a mistake the user can fix (config, files, flags), or a damaged file
    3    DoesNotFit: `gptjax compile` found a plan larger than the target's memory
    1    CompileFailed: the target's compiler refused a step
    74   WriteFailed: the workdir's storage failed (a checkpoint or file could not be written,
         a full disk); the line says which checkpoint the next run resumes from
    75   Preempted by SIGTERM or a preemption notice, after saving: run the same command again
         (launch/slurm.sbatch requeues)
    76   another process of a multi-process job failed, so this one stopped too
    130  Ctrl-C (saved first, unless pressed twice)

Each is one line on stderr (a traceback with `--debug`); any other exception is a bug in gptjax
and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input (config, files, flags) whose message says what to change."""


REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "stopped early, state saved, run the same command again"


class Preempted(Exception):
    """Training stopped on SIGTERM, a preemption notice or Ctrl-C after saving a checkpoint at
    `step`: exit 75 (requeue), or 130 for Ctrl-C."""

    def __init__(self, step: int, path: str, interrupted: bool = False):
        cause = "interrupted (Ctrl-C)" if interrupted else "stopped by a termination signal"
        super().__init__(f"{cause} after step {step}; saved {path}; run the same command again to resume "
                         f"from step {step}")
        self.step, self.path, self.interrupted = step, path, interrupted


WRITE_FAILED_EXIT_CODE = 74  # EX_IOERR: the workdir's storage failed; not requeued (it needs a person)


class WriteFailed(Exception):
    """A write to the workdir failed (a full disk, a lost mount); the message says what is intact."""


PEER_FAILED_EXIT_CODE = 76  # another process of a multi-process job failed; this one stopped with it


DOES_NOT_FIT_EXIT_CODE = 3


class DoesNotFit(Exception):
    """A step whose plan needs more memory than the target's device gives; the message says what to change."""


class CompileFailed(Exception):
    """The target's compiler refused a step; the message is its first line."""
