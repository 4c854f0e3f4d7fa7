"""How a run ends early: a mistake the user can fix, or a preemption.

The CLI turns a UserError into a single `error: ...` line and exit code 2 (no traceback unless
`--debug`), and Preempted into exit code 75, which launch/slurm.sbatch answers with a requeue;
every other exception is a bug in gptjax and keeps its traceback. `gptjax compile` ends in one
line too: exit 3 for a plan that does not fit (DoesNotFit), 1 for a step the target's compiler
refuses (CompileFailed).
"""


class UserError(Exception):
    """A problem with the user's input (config, files, flags) whose message says what to change."""


REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "stopped early, state saved, run the same command again"


class Preempted(Exception):
    """Training stopped on SIGTERM (or a preemption notice) after saving a checkpoint at `step`."""

    def __init__(self, step: int, path: str):
        super().__init__(f"stopped by a termination signal after step {step}; saved {path}; "
                         f"run the same command again to resume")
        self.step, self.path = step, path


DOES_NOT_FIT_EXIT_CODE = 3


class DoesNotFit(Exception):
    """A step whose plan needs more memory than the target's device gives; the message says what to change."""


class CompileFailed(Exception):
    """The target's compiler refused a step; the message is its first line."""
