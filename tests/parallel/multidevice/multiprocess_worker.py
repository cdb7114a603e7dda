"""One process of a two-process CPU run, started by tests/parallel/test_multiprocess.py.

    python multiprocess_worker.py MODE [ARG]

The process joins the run through the JAXSPEC_COORDINATOR / JAXSPEC_NUM_PROCESSES / JAXSPEC_PROCESS_ID
variables (jaxspec.parallel.distributed), with gloo as the CPU collectives, and prints one line
"RESULT <json>" with what it computed. Modes:
    allreduce  a row sum and a Gram matrix of an (8, 3) array whose rows are split over the two processes
    train      two data-parallel train steps of a tiny LM (ARG: the corpus file); prints the losses
               and gradient norms.
               Without the JAXSPEC_* variables it runs as one process with 4 simulated devices.
    idle       initialise (heartbeat timeout ARG seconds), print "READY", then wait to be killed or to fail
This file is not named check_*.py, so the 8-device check runner does not collect it.
"""

import json
import os
import sys
import time

import jax
import numpy as np

jax.config.update("jax_cpu_collectives_implementation", "gloo")

from jaxspec.parallel import distributed  # noqa: E402
from jaxspec.parallel.mesh import make_mesh  # noqa: E402

ROWS, COLS = 8, 3


def global_rows() -> np.ndarray:
    """The whole (ROWS, COLS) array; each process only ever holds its own half of it."""
    return (np.arange(ROWS * COLS, dtype=np.float32).reshape(ROWS, COLS) - 7.0) / 4.0


def report(**values):
    print("RESULT " + json.dumps(values), flush=True)


def allreduce():
    assert distributed.maybe_initialize()
    assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
    mesh = make_mesh({"data": -1})
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    pid, half = jax.process_index(), ROWS // 2
    local = global_rows()[pid * half:(pid + 1) * half]
    x = jax.make_array_from_process_local_data(sharding, local, (ROWS, COLS))
    assert not x.is_fully_addressable
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    total, gram = jax.jit(lambda a: (a.sum(0), a.T @ a), out_shardings=(replicated, replicated))(x)
    report(process=pid, sum=np.asarray(total).tolist(), gram=np.asarray(gram).tolist())


def train(corpus: str):
    multi = distributed.maybe_initialize()
    assert jax.process_count() == (2 if multi else 1) and jax.device_count() == 4
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "training"))
    from test_trainer import tiny_config

    from jaxspec.training.data import make_datasets
    from jaxspec.training.trainer import build_trainer, prepare_config

    config = tiny_config(corpus)
    config.model.n_layers = 1
    config.train.warmup_steps = 0  # the first update is not a zero-learning-rate step
    config = prepare_config(config)
    train_batches, _, tokenizer = make_datasets(config.data)
    trainer = build_trainer(config, make_mesh(config.mesh), tokenizer)
    state = trainer.init_state(0)
    losses, grad_norms = [], []
    for _ in range(2):  # the second loss is taken after an update made from all-reduced gradients
        state, metrics = trainer.train_step(state, trainer.put_batch(next(train_batches)), trainer.frozen)
        losses.append(float(metrics["loss"]))
        grad_norms.append(float(metrics["grad_norm"]))
    report(process=jax.process_index(), devices=jax.device_count(), losses=losses, grad_norms=grad_norms)


def idle(heartbeat_seconds: int):
    os.environ[distributed.HEARTBEAT_TIMEOUT_ENV] = str(heartbeat_seconds)
    assert distributed.maybe_initialize()
    assert jax.device_count() == 4
    print("READY", flush=True)
    time.sleep(600)


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "allreduce":
        allreduce()
    elif mode == "train":
        train(sys.argv[2])
    elif mode == "idle":
        idle(int(sys.argv[2]))
    else:
        raise SystemExit(f"unknown mode {mode!r}: allowed are allreduce, train, idle")
