"""TensorBoard scalars: event files written with tensorboardX, read back with TensorBoard's reader.

    with SummaryWriter("runs/x/tb") as tb:
        tb.scalars(step, {"train/loss": 2.31, "train/lr": 3e-4})
    read_scalars("runs/x/tb")  # [(step, "train/loss", 2.31...), (step, "train/lr", 0.0003...)]

Writing needs tensorboardX only (neither TensorFlow nor the tensorboard package); read_scalars
needs tensorboard, which the [test] extra installs.
"""

from __future__ import annotations

import itertools
import os
import time

_writers = itertools.count()


class SummaryWriter:
    """Appends scalar summaries to a new events.out.tfevents.<time>.<host>.<pid>.<n> file in `logdir`.

    Only one process of a multi-process run should write (TensorBoard would show each file as
    a duplicate of the same run otherwise).
    """

    def __init__(self, logdir: str):
        # Imported here rather than at the top: importing tensorboardX also imports PyTorch where
        # it is installed, seconds that only the process that writes metrics should spend.
        # EventsWriter rather than tensorboardX.SummaryWriter: the latter hands events to a
        # background thread whose queue its flush() does not wait for, so a run killed between
        # two flushes could lose its last numbers; this one writes and flushes in the caller.
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.proto.summary_pb2 import Summary
        from tensorboardX.summary import scalar

        self._event, self._summary, self._scalar = Event, Summary, scalar
        os.makedirs(logdir, exist_ok=True)
        # The file name has one-second resolution and tensorboardX opens it with "wb": the pid and a
        # counter keep a second writer started within the same second from truncating the first.
        self._writer = EventsWriter(os.path.join(logdir, "events"), f".{os.getpid()}.{next(_writers)}")
        self._writer.flush()
        self._closed = False

    def scalars(self, step: int, values: dict) -> None:
        """One event holding every {tag: number} of `values` at `step`; None values are skipped."""
        summary = self._summary(value=[self._scalar(str(tag), float(v)).value[0]
                                       for tag, v in values.items() if v is not None])
        if summary.value:
            self._writer.write_event(self._event(wall_time=time.time(), step=int(step), summary=summary))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._writer.close()

    def __enter__(self) -> SummaryWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_scalars(path: str) -> list[tuple[int, str, float]]:
    """(step, tag, value) of every scalar in an event file, or in the event files of a folder,
    grouped by tag and each tag's in the order written."""
    from tensorboard.backend.event_processing import event_accumulator

    # size_guidance 0 keeps every event rather than TensorBoard's default sample of 10,000 per tag.
    board = event_accumulator.EventAccumulator(path, size_guidance={event_accumulator.SCALARS: 0})
    board.Reload()
    return [(e.step, tag, e.value) for tag in board.Tags()["scalars"] for e in board.Scalars(tag)]
