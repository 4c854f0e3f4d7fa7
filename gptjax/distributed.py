"""Multi-process runs through JAX's own runtime (`jax.distributed`), one process per host or GPU.

A process joins a job when it is told the coordinator, the process count and its own id, by
flags (`gptjax --coordinator HOST:PORT --num-processes N --process-id I ...`) or by the
GPTJAX_COORDINATOR / GPTJAX_NUM_PROCESSES / GPTJAX_PROCESS_ID variables that launch/local.sh
sets. Under SLURM with several tasks JAX finds all three by itself; on a TPU pod slice (or any
cluster JAX can detect) GPTJAX_DISTRIBUTED=auto, which launch/tpu_vm.sh sets, asks it to.
"""

from __future__ import annotations

import os
import sys

import jax

from gptjax.errors import UserError


def _auto_detected() -> bool:
    slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ
    tpu_pod = "TPU_WORKER_HOSTNAMES" in os.environ and "," in os.environ["TPU_WORKER_HOSTNAMES"]
    return slurm or tpu_pod or os.environ.get("GPTJAX_DISTRIBUTED") == "auto"


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Joins the job if one is described; a lone process does nothing. Call before any JAX work."""
    coordinator = coordinator or os.environ.get("GPTJAX_COORDINATOR")
    if num_processes is None and "GPTJAX_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["GPTJAX_NUM_PROCESSES"])
    if process_id is None and "GPTJAX_PROCESS_ID" in os.environ:
        process_id = int(os.environ["GPTJAX_PROCESS_ID"])
    explicit = (coordinator, num_processes, process_id)
    if all(v is None for v in explicit) and not _auto_detected():
        return
    if any(v is None for v in explicit) and not _auto_detected():
        raise UserError("a multi-process run needs --coordinator, --num-processes and --process-id together "
                        "(or GPTJAX_COORDINATOR, GPTJAX_NUM_PROCESSES, GPTJAX_PROCESS_ID)")
    # CPU processes exchange collectives over gloo; GPU and TPU use their own interconnect.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # JAX declares a process dead after this many seconds without heartbeats (its default: 100) and
    # then aborts the others itself. peer_watch hears of a dead process at once and of a vanished
    # host after ~25 s, so this is only the last resort, and longer than both.
    heartbeat = int(os.environ.get("GPTJAX_HEARTBEAT_TIMEOUT", "60"))
    jax.distributed.initialize(coordinator, num_processes, process_id, heartbeat_timeout_seconds=heartbeat)


def is_main() -> bool:
    """Process 0 writes the workdir's logs, metrics and config; every process trains."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process reaches the same named point."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def prefix() -> str:
    """"[i/N] " in a multi-process run, so interleaved output says which process wrote it."""
    if jax.process_count() == 1:
        return ""
    return f"[{jax.process_index()}/{jax.process_count()}] "


def log(message: str, stream=None) -> None:
    """Prints one line with the process prefix (stdout unless `stream` says otherwise)."""
    # One write with its newline: sys.stderr writes through, so print's two writes (the text,
    # then the newline) would let a C++ log line of the runtime's land between them.
    stream = stream or sys.stdout
    stream.write(f"{prefix()}{message}\n")
    stream.flush()


def log_main(message: str) -> None:
    """`log` on process 0 only: messages about the run as a whole, said once."""
    if is_main():
        log(message)


# What a collective or the coordination service says when another process of the job is gone:
# gloo (CPU) and NCCL connections reset, the coordination service's missed heartbeats and
# barriers that time out.
_PEER_SIGNS = ("Gloo", "gloo", "Connection reset", "Connection refused", "connection closed", "Socket closed",
               "UNAVAILABLE", "DEADLINE_EXCEEDED", "heartbeat", "Barrier timed out", "has died", "NCCL",
               "coordination service", "preempted or crashed")


def peer_failed(error: BaseException) -> bool:
    """Is `error` the sign that another process of this multi-process job failed?"""
    from jax._src import distributed as jax_distributed
    if jax_distributed.global_state.client is None:
        return False
    from gptjax.errors import WriteFailed
    text = f"{type(error).__name__}: {error}"
    runtime = "RuntimeError" in type(error).__name__ or "JaxRuntimeError" in text
    # A checkpoint save's collectives fail the same way; its message carries their reason.
    return (runtime or isinstance(error, WriteFailed)) and any(s in text for s in _PEER_SIGNS)


def _unanswering_processes(timeout_s: float = 3.0) -> list[int] | None:
    """The ids of the job's processes the coordination service no longer counts as alive, or None
    if it cannot tell within `timeout_s` (the coordinator itself may be the one that died)."""
    import threading
    from jax._src import distributed as jax_distributed
    state = jax_distributed.global_state
    found: list = []

    def ask():
        try:
            live = state.client.get_live_nodes(list(range(state.num_processes)))
            found.append(sorted(set(range(state.num_processes)) - set(live)))
        except Exception:  # noqa: BLE001 -- no answer is an answer too
            pass

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return found[0] if found else None


def peer_failure_text(error: BaseException) -> str:
    gone = _unanswering_processes()
    who = (f"process {', '.join(map(str, gone))}" if gone else "another process")
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
    return f"{who} of this {jax.process_count()}-process job failed or stopped answering ({reason})"

