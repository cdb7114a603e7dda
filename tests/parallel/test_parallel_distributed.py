"""When jax.distributed.initialize is called, decided from the flag and the environment (nothing started)."""

import pytest

from jaxspec.parallel import distributed
from jaxspec.parallel.distributed import initialize_kwargs

JAXSPEC_ENV = {"JAXSPEC_COORDINATOR": "10.0.0.1:1234", "JAXSPEC_NUM_PROCESSES": "4", "JAXSPEC_PROCESS_ID": "2"}


@pytest.mark.parametrize(
    "flag, environ, expected",
    [
        (None, {}, None),  # a plain single-process run
        (None, {"SLURM_NTASKS": "1", "OMPI_COMM_WORLD_SIZE": "1"}, None),  # one-task launches
        (None, {"TPU_WORKER_HOSTNAMES": "localhost"}, None),  # single-host TPU
        (None, JAXSPEC_ENV, {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2}),
        (None, {"JAXSPEC_COORDINATOR": "host:99"}, {"coordinator_address": "host:99"}),
        (None, {"SLURM_NTASKS": "16"}, {}),  # jax auto-detects the rest
        (None, {"OMPI_COMM_WORLD_SIZE": "2"}, {}),
        (None, {"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}, {}),
        (True, {}, {}),
        ("true", {}, {}),
        (False, JAXSPEC_ENV, None),  # an explicit flag wins over the environment
        ("0", {"SLURM_NTASKS": "16"}, None),
        (None, {"JAXSPEC_DISTRIBUTED": "1"}, {}),
        (None, {"JAXSPEC_DISTRIBUTED": "off", "SLURM_NTASKS": "16"}, None),
        ("auto", {"JAXSPEC_DISTRIBUTED": "auto", "SLURM_NTASKS": "16"}, {}),
        (True, {"JAXSPEC_PROCESS_ID": "0"}, {"process_id": 0}),
        (None, {"JAXSPEC_HEARTBEAT_TIMEOUT_S": "10"}, None),  # a timeout alone does not start a multi-process run
        (None, {**JAXSPEC_ENV, "JAXSPEC_HEARTBEAT_TIMEOUT_S": "10"},
         {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2,
          "heartbeat_timeout_seconds": 10, "shutdown_timeout_seconds": 10}),
    ],
)
def test_initialize_decision(flag, environ, expected):
    assert initialize_kwargs(flag, environ) == expected


@pytest.mark.parametrize(
    "flag, environ, message",
    [
        ("maybe", {}, r"distributed flag='maybe'"),
        (None, {"JAXSPEC_DISTRIBUTED": "2"}, r"JAXSPEC_DISTRIBUTED='2'"),
        (None, {"JAXSPEC_NUM_PROCESSES": "four"}, r"JAXSPEC_NUM_PROCESSES='four' is not an integer"),
        (None, {"JAXSPEC_NUM_PROCESSES": "2", "JAXSPEC_PROCESS_ID": "2"}, r"must be below JAXSPEC_NUM_PROCESSES=2"),
        (None, {"JAXSPEC_NUM_PROCESSES": "0"}, r"JAXSPEC_NUM_PROCESSES=0: must be at least 1"),
        (None, {"JAXSPEC_PROCESS_ID": "-1"}, r"JAXSPEC_PROCESS_ID=-1: must be at least 0"),
        (True, {"JAXSPEC_HEARTBEAT_TIMEOUT_S": "0"}, r"JAXSPEC_HEARTBEAT_TIMEOUT_S=0: must be at least 1 second"),
        (True, {"JAXSPEC_HEARTBEAT_TIMEOUT_S": "ten"}, r"JAXSPEC_HEARTBEAT_TIMEOUT_S='ten' is not an integer"),
    ],
)
def test_bad_values_are_rejected(flag, environ, message):
    with pytest.raises(ValueError, match=message):
        initialize_kwargs(flag, environ)


def test_maybe_initialize_calls_jax_only_when_asked(monkeypatch):
    calls = []
    monkeypatch.setattr(distributed.jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.jax.distributed, "initialize", lambda **kw: calls.append(kw))
    assert distributed.maybe_initialize(None, {}) is False
    assert calls == []
    assert distributed.maybe_initialize(None, JAXSPEC_ENV) is True
    assert calls == [{"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2}]


def test_maybe_initialize_is_a_no_op_once_initialized(monkeypatch):
    monkeypatch.setattr(distributed.jax.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.jax.distributed, "initialize", lambda **kw: pytest.fail("initialized twice"))
    assert distributed.maybe_initialize(True, {}) is True
