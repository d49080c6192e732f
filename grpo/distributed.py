"""Multi-controller start-up: every process runs the same program; JAX joins them.

Process 0's address, the process count and this process's id come from flags, or from the
environment our launcher and Cloud TPU VMs set (then `jax.distributed.initialize()` finds them
itself). After joining we check that exactly the expected number of processes is there.
"""

from __future__ import annotations

import os
import sys
import threading

import jax
from absl import logging

# Set by launch/ for each process; Cloud TPU pods need none of them (auto-detected).
ENV_COORDINATOR = "GRPO_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "GRPO_NUM_PROCESSES"
ENV_PROCESS_ID = "GRPO_PROCESS_ID"
ENV_TIMEOUT = "GRPO_INIT_TIMEOUT_S"
# How long the survivors wait on a process that stopped answering (crashed, killed, host lost)
# before they abort too; JAX's default is 100 s.
ENV_HEARTBEAT = "GRPO_HEARTBEAT_TIMEOUT_S"
EXIT_JOIN_FAILED = 3  # exit status when the processes did not all join in time


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    timeout_s: int | None = None,
    heartbeat_s: int | None = None,
) -> None:
    """Joins the processes of a multi-process run; a no-op for a single process."""
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR)
    num_processes = num_processes or _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    timeout_s = timeout_s or _env_int(ENV_TIMEOUT) or 300
    heartbeat_s = heartbeat_s or _env_int(ENV_HEARTBEAT) or 100
    on_tpu_pod = bool(os.environ.get("TPU_WORKER_HOSTNAMES", "").count(","))
    if coordinator_address is None and not on_tpu_pod:
        if num_processes not in (None, 1):
            raise ValueError(
                f"num_processes={num_processes} needs a coordinator address "
                f"(--coordinator_address or ${ENV_COORDINATOR})"
            )
        return
    # CPU devices need gloo for cross-process collectives. Set it unconditionally: asking for the
    # backend here would initialise it, which `initialize` forbids; TPU/GPU ignore the setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    who = f"process {process_id} of {num_processes}" if num_processes else "this process"
    who += f" (coordinator {coordinator_address or 'auto-detected'})"
    logging.info("joining as %s; waiting up to %d s for every process", who, timeout_s)
    # A missing process makes JAX abort from C++ a few seconds after the timeout, with only an
    # RPC deadline error; this watchdog exits first with a message that says what to check.
    watchdog = threading.Timer(timeout_s + 1, _give_up, args=(who, timeout_s))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=timeout_s,
            heartbeat_timeout_seconds=heartbeat_s,
        )
    finally:
        watchdog.cancel()
    check_process_count(num_processes)
    logging.info("joined: process %d of %d", jax.process_index(), jax.process_count())


def check_process_count(expected: int | None) -> None:
    if expected is not None and jax.process_count() != expected:
        raise RuntimeError(
            f"expected {expected} processes but {jax.process_count()} joined; "
            "check every host started the same command"
        )


def _give_up(who: str, timeout_s: int) -> None:
    logging.error(
        "%s: the processes did not all join within %d s; check that the coordinator is "
        "reachable and that every host runs the same command with the same --num_processes and "
        "its own --process_id (or raise $%s)",
        who,
        timeout_s,
        ENV_TIMEOUT,
    )
    sys.stderr.flush()
    os._exit(EXIT_JOIN_FAILED)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None
