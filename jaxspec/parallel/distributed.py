"""Multi-process start-up: call `jax.distributed.initialize()` only when the run is multi-process.

The decision (`initialize_kwargs`) is a pure function of the flag and the environment so it can be tested
without starting anything; `maybe_initialize` acts on it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax

from jaxspec.errors import InputError

COORDINATOR_ENV = "JAXSPEC_COORDINATOR"
NUM_PROCESSES_ENV = "JAXSPEC_NUM_PROCESSES"
PROCESS_ID_ENV = "JAXSPEC_PROCESS_ID"
DISTRIBUTED_ENV = "JAXSPEC_DISTRIBUTED"
# Seconds a silent peer counts as alive, and that a stopping process waits for the others (jax's defaults: 100
# and 300); a run on preemptible machines may want a killed peer noticed sooner.
HEARTBEAT_TIMEOUT_ENV = "JAXSPEC_HEARTBEAT_TIMEOUT_S"

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _parse_switch(value, source: str) -> bool | None:
    """True / False / None (undecided) from a bool, None, or a string such as "1", "false", "auto"."""
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    if text in ("", "auto"):
        return None
    raise InputError(f"{source}={value!r}: allowed are true/false/1/0/yes/no/on/off/auto.")


def _parse_count(environ: Mapping[str, str], name: str) -> int | None:
    if name not in environ:
        return None
    try:
        return int(environ[name])
    except ValueError:
        raise InputError(f"environment variable {name}={environ[name]!r} is not an integer.") from None


def _cluster_detected(environ: Mapping[str, str]) -> bool:
    """Whether a launcher that jax's cluster auto-detection understands started several processes."""
    tasks = environ.get("SLURM_STEP_NUM_TASKS") or environ.get("SLURM_NTASKS")
    if tasks and tasks.isdigit() and int(tasks) > 1:
        return True
    world = environ.get("OMPI_COMM_WORLD_SIZE")
    if world and world.isdigit() and int(world) > 1:
        return True
    hosts = environ.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h.strip()]) > 1


def initialize_kwargs(flag_value=None, environ: Mapping[str, str] | None = None) -> dict | None:
    """Keyword arguments for `jax.distributed.initialize`, or None when this is a single-process run.

    Order of precedence: an explicit flag value (True/False); else JAXSPEC_DISTRIBUTED; else any of
    JAXSPEC_COORDINATOR / JAXSPEC_NUM_PROCESSES / JAXSPEC_PROCESS_ID being set; else a multi-process
    cluster (SLURM, Open MPI, multi-host TPU) that jax detects by itself. Addresses and counts given in the
    JAXSPEC_* variables are passed on; what is missing is left to jax's auto-detection.
    JAXSPEC_HEARTBEAT_TIMEOUT_S (seconds) sets both how long a silent peer counts as alive and how long a
    stopping process waits for the others; it does not by itself ask for a multi-process run.
    """
    environ = os.environ if environ is None else environ
    wanted = _parse_switch(flag_value, "distributed flag")
    if wanted is None:
        wanted = _parse_switch(environ.get(DISTRIBUTED_ENV), DISTRIBUTED_ENV)
    explicit = {
        "coordinator_address": environ.get(COORDINATOR_ENV) or None,
        "num_processes": _parse_count(environ, NUM_PROCESSES_ENV),
        "process_id": _parse_count(environ, PROCESS_ID_ENV),
    }
    explicit = {k: v for k, v in explicit.items() if v is not None}
    if wanted is None:
        wanted = bool(explicit) or _cluster_detected(environ)
    if not wanted:
        return None
    num, pid = explicit.get("num_processes"), explicit.get("process_id")
    if num is not None and num < 1:
        raise InputError(f"{NUM_PROCESSES_ENV}={num}: must be at least 1.")
    if pid is not None and pid < 0:
        raise InputError(f"{PROCESS_ID_ENV}={pid}: must be at least 0.")
    if pid is not None and num is not None and pid >= num:
        raise InputError(f"{PROCESS_ID_ENV}={pid}: must be below {NUM_PROCESSES_ENV}={num}.")
    heartbeat = _parse_count(environ, HEARTBEAT_TIMEOUT_ENV)
    if heartbeat is not None:
        if heartbeat < 1:
            raise InputError(f"{HEARTBEAT_TIMEOUT_ENV}={heartbeat}: must be at least 1 second.")
        explicit.update(heartbeat_timeout_seconds=heartbeat, shutdown_timeout_seconds=heartbeat)
    return explicit


def maybe_initialize(flag_value=None, environ: Mapping[str, str] | None = None) -> bool:
    """Initialise jax's multi-process runtime if the flag or environment asks; returns whether it is on."""
    if jax.distributed.is_initialized():
        return True
    kwargs = initialize_kwargs(flag_value, environ)
    if kwargs is None:
        return False
    jax.distributed.initialize(**kwargs)
    return True
