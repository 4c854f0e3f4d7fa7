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
    jax.distributed.initialize(coordinator, num_processes, process_id)


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
    print(prefix() + message, file=stream or sys.stdout, flush=True)


def log_main(message: str) -> None:
    """`log` on process 0 only: messages about the run as a whole, said once."""
    if is_main():
        log(message)
