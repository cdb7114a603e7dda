"""Two real processes on localhost joined by `jaxspec.parallel.distributed` (gloo collectives on CPU).

Each process simulates 2 CPU devices, so the global mesh has 4 devices, 2 of them in the other process.
The processes run tests/parallel/multidevice/multiprocess_worker.py; every one has a deadline and is killed
in a `finally` block, so a stuck collective fails the test instead of hanging it.
"""

import json
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

HERE = pathlib.Path(__file__).parent
REPO = HERE.parent.parent
WORKER = HERE / "multidevice" / "multiprocess_worker.py"
DEADLINE_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Workers:
    """Worker subprocesses whose output goes to files (no pipe can fill up); all killed on exit."""

    def __init__(self, directory: pathlib.Path, subprocess_env):
        self.directory, self.subprocess_env, self.procs, self.logs = directory, subprocess_env, [], []

    def env(self, devices: int, process_id: int | None = None, port: int | None = None) -> dict:
        env = {k: v for k, v in self.subprocess_env(devices).items()
               if not k.startswith("JAXSPEC_") and not k.lower().endswith("_proxy")}  # no proxy for 127.0.0.1
        if process_id is not None:
            env.update(JAXSPEC_COORDINATOR=f"127.0.0.1:{port}", JAXSPEC_NUM_PROCESSES="2",
                       JAXSPEC_PROCESS_ID=str(process_id))
        return env

    def start(self, name: str, env: dict, *args) -> subprocess.Popen:
        log = self.directory / f"{name}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, "-u", str(WORKER), *map(str, args)], cwd=REPO, env=env,
                                    stdout=out, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        self.logs.append(log)
        return proc

    def start_pair(self, *args) -> tuple[subprocess.Popen, subprocess.Popen]:
        port = _free_port()
        return tuple(self.start(f"{args[0]}{pid}", self.env(2, pid, port), *args) for pid in (0, 1))

    def output(self, proc) -> str:
        return self.logs[self.procs.index(proc)].read_text()

    def result(self, proc) -> dict:
        proc.wait(timeout=DEADLINE_S)
        text = self.output(proc)
        assert proc.returncode == 0, text[-6000:]
        lines = [line for line in text.splitlines() if line.startswith("RESULT ")]
        assert len(lines) == 1, text[-6000:]
        return json.loads(lines[0][len("RESULT "):])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    sys.path.insert(0, str(REPO / "tests" / "training"))
    try:
        from test_trainer import write_corpus
    finally:
        sys.path.remove(str(REPO / "tests" / "training"))
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.mark.slow
def test_two_processes_all_reduce_and_train_like_one(tmp_path, corpus, subprocess_env):
    with Workers(tmp_path, subprocess_env) as workers:
        reference = workers.start("train_single", workers.env(4), "train", corpus)
        pair = workers.start_pair("allreduce")
        rows = (np.arange(24, dtype=np.float32).reshape(8, 3) - 7.0) / 4.0  # what the worker splits by rows
        for pid, proc in enumerate(pair):
            got = workers.result(proc)
            assert got["process"] == pid
            np.testing.assert_allclose(got["sum"], rows.sum(0), rtol=1e-6)
            np.testing.assert_allclose(got["gram"], rows.T @ rows, rtol=1e-6)

        trained = [workers.result(proc) for proc in workers.start_pair("train", corpus)]
        single = workers.result(reference)
        assert single["devices"] == 4 and len(single["losses"]) == 2
        for pid, got in enumerate(trained):
            assert got["process"] == pid and got["devices"] == 4
            np.testing.assert_allclose(got["losses"], single["losses"], rtol=1e-5)
            np.testing.assert_allclose(got["grad_norms"], single["grad_norms"], rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("killed", [1, 0], ids=["peer_killed", "coordinator_killed"])
def test_a_killed_process_stops_the_other_instead_of_hanging(tmp_path, killed, subprocess_env):
    heartbeat_s = 10  # how long a silent process counts as alive; short, but with margin for a loaded machine
    with Workers(tmp_path, subprocess_env) as workers:
        pair = workers.start_pair("idle", heartbeat_s)
        deadline = time.monotonic() + DEADLINE_S
        while not all("READY" in workers.output(p) for p in pair):
            assert all(p.poll() is None for p in pair), [workers.output(p)[-3000:] for p in pair]
            assert time.monotonic() < deadline, "the two processes did not initialise"
            time.sleep(0.2)
        pair[killed].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        survivor = pair[1 - killed]
        survivor.wait(timeout=6 * heartbeat_s)
        assert survivor.returncode != 0
        assert time.monotonic() - killed_at < 6 * heartbeat_s
        assert "distributed service detected fatal errors" in workers.output(survivor)
