"""Stopping a run cleanly: SIGTERM (a preemption notice, a scheduler's requeue) or Ctrl-C ask the
loop to save after the current step and exit."""

from __future__ import annotations

import os
import signal
import threading

import jax


class StopSignal:
    """SIGTERM or Ctrl-C (SIGINT) asks the run to stop after the current step, save and exit; a
    second Ctrl-C aborts at once. One process: signal handlers. Several: JAX's preemption sync
    point, which has every process stop after the same step; Ctrl-C joins it by sending this
    process the SIGTERM that JAX's notifier listens for."""

    def __init__(self):
        self.received, self.interrupted = False, False
        self._previous = {}
        self._shared = jax.process_count() > 1
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        if not self._shared:
            self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._terminate)
        self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._interrupt)

    def _terminate(self, signum, frame) -> None:
        self.received = True

    def _interrupt(self, signum, frame) -> None:
        if self.interrupted:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, without saving
        self.interrupted = True
        if self._shared:
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            self.received = True

    def __call__(self, step: int) -> bool:
        if self._shared:
            from jax.experimental import multihost_utils
            return multihost_utils.reached_preemption_sync_point(step)
        return self.received

    def close(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
