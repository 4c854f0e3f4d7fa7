"""The input pipeline of training: batches by step, built by grain workers, prefetched to device.

The batch of a step is a pure function of the step (packing.RowBatches), so the loader's whole
state is the next step: restoring it starts the grain dataset at that index, O(1), with no
replay of the batches before it.
"""

from __future__ import annotations

import queue
import threading

import jax
import numpy as np

from gptjax.sharding import rows_to_mesh


class _Steps:
    """A grain random-access source whose record `i` is the batch of step `start + i`."""

    def __init__(self, batches, start: int, stop: int):
        self.batches, self.start, self.stop = batches, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> dict:
        return self.batches.batch(self.start + int(i))


def _default_sharding():
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))


class Loader:
    """Iterates global jax.Array batches for steps [start, stop); `state()` says where it is."""

    def __init__(self, batches, stop: int, *, start: int = 0, num_workers: int = 0, prefetch: int = 2,
                 sharding=None):
        import grain  # heavy, and only the training path needs it

        self.batches, self.stop, self._next = batches, stop, start
        self.sharding = sharding or _default_sharding()
        # Worker threads, not processes: building a batch is numpy slicing that releases the GIL,
        # and threads need no pickling of the token store or process start-up.
        options = grain.ReadOptions(num_threads=max(num_workers, 1), prefetch_buffer_size=max(2 * num_workers, 1))
        dataset = grain.MapDataset.source(_Steps(batches, start, stop)).to_iter_dataset(options)
        self._host = iter(dataset)
        self._queue: queue.Queue = queue.Queue(maxsize=max(prefetch, 1))
        self._thread = threading.Thread(target=self._fill, daemon=True)
        self._thread.start()

    def _to_device(self, batch: dict) -> dict:
        return rows_to_mesh(batch, self.sharding, process_local=True)

    def _fill(self) -> None:
        try:
            for batch in self._host:
                self._queue.put(self._to_device(batch))
        except Exception as e:  # surfaced in the training thread, not lost in this one
            self._queue.put(e)
        self._queue.put(StopIteration())

    def state(self) -> dict:
        """What a checkpoint saves: the next step to load."""
        return {"step": self._next}

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._queue.put(item)  # later calls see the same end
            raise item
        self._next += 1
        return item
