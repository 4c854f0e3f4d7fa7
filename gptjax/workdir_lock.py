"""One writer per workdir: `pretrain`, `finetune`, `prepare` and `convert --to` hold an exclusive
lock on WORKDIR/gptjax.lock for as long as they write there.

The lock is flock(2) on an open file, so the kernel drops it when the holder dies, kill -9
included: there is never a stale lock to clear by hand. Linux takes flock on NFS as a POSIX
byte-range lock on the server, so two jobs on two nodes of a cluster exclude each other too;
Lustre does so when mounted with `-o flock`. A filesystem that cannot lock at all is reported
(and GPTJAX_WORKDIR_LOCK=off runs without the guard, at the user's risk). The file holds the
holder's host, pid, command and start time, for the second writer's message. Readers (`eval`,
`generate`, `convert --from`, the Python API) never take it.

In a multi-process run process 0 takes the lock for the job, and every process learns whether it
got it before any of them writes.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time

from gptjax.errors import UserError

LOCK_NAME = "gptjax.lock"
_CANNOT_LOCK = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}


def _holder_text(path: str) -> str:
    try:
        with open(path) as f:
            holder = json.loads(f.read() or "{}")
        return (f"`{holder['command']}`, pid {holder['pid']} on {holder['host']}, running since "
                f"{holder['started']}")
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (its details are not readable)"


class WorkdirLock:
    """`with WorkdirLock(workdir, "gptjax pretrain"):` -- refuses with one line if another run holds it."""

    def __init__(self, workdir: str, command: str):
        self.workdir, self.command = workdir, command
        self.path = os.path.join(workdir, LOCK_NAME)
        self._fd: int | None = None

    def acquire(self) -> None:
        if os.environ.get("GPTJAX_WORKDIR_LOCK", "on").lower() in ("off", "0", "false", "no"):
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"cannot create the lock {self.path}: {e.strerror}; --workdir must be a folder "
                            f"this user can write") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"{self.workdir} is in use by {_holder_text(self.path)}; one run writes a workdir "
                            f"at a time: wait for that run to end (or stop it), or pass another --workdir") from None
        except OSError as e:
            os.close(fd)
            if e.errno in _CANNOT_LOCK:
                raise UserError(f"the filesystem of {self.workdir} does not support file locks ({e.strerror}), so "
                                f"two runs in one workdir cannot be kept apart there; mount it with locking "
                                f"(Lustre: -o flock; NFS: a running lock daemon) or set GPTJAX_WORKDIR_LOCK=off "
                                f"and make sure only one job uses the workdir") from None
            raise
        holder = {"command": self.command, "pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "argv": sys.argv}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        except OSError:
            pass  # the lock holds without its description (a full disk, say); the message says so
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # the holder description stays; it is rewritten by the next holder
            self._fd = None

    def __enter__(self) -> "WorkdirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class JobLock:
    """The workdir lock of a multi-process job: process 0 takes it, every process hears the outcome,
    so that none of them writes a workdir another run holds."""

    def __init__(self, workdir: str, command: str):
        self._lock = WorkdirLock(workdir, command)

    def __enter__(self) -> "JobLock":
        import jax
        if jax.process_count() == 1:
            self._lock.acquire()
            return self
        from jax.experimental import multihost_utils
        import numpy as np
        error = None
        if jax.process_index() == 0:
            try:
                self._lock.acquire()
            except UserError as e:
                error = e
        failed = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
        if error is not None:
            raise error
        if int(failed):
            raise UserError(f"{self._lock.workdir} is in use by another run (process 0 names it); pass another "
                            f"--workdir or wait for that run to end")
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()
