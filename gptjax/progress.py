"""The console progress bar of a run: steps, the last record's loss (and tokens/s), with the
run's other lines (evaluations) printed above it."""

from __future__ import annotations

from gptjax.loop import Hook, Run


class ProgressBar(Hook):
    def __init__(self, shown: bool = True):
        self.shown, self.bar = shown, None

    def begin(self, run: Run) -> None:
        from tqdm.auto import tqdm
        self.bar = tqdm(total=run.total, initial=run.start, disable=not self.shown, unit="step", dynamic_ncols=True)
        self._said, run.say = run.say, self.bar.write

    def after(self, done: int, run: Run) -> None:
        record = run.history[-1] if run.history else None
        if record is not None and record["step"] == done:
            tokens = {"tok_s": f"{record['tokens_per_sec']:,.0f}"} if "tokens_per_sec" in record else {}
            self.bar.set_postfix(loss=f"{record['loss']:.3f}", **tokens)
        self.bar.update(1)

    def end(self, run: Run, finished: bool) -> None:
        if self.bar is not None:
            self.bar.close()
            run.say = self._said
