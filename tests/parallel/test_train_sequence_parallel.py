"""The hybrid config trains with sequence parallelism through launch.train (2 simulated devices), and its
losses equal the single-device run's."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def with_devices(devices: int) -> dict:
    """This environment with `devices` simulated CPU devices; the other XLA flags (the conftest's cheap-compile
    setting) stay, and both runs compared below compile with them."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    return dict(os.environ, XLA_FLAGS=" ".join([*flags, f"--xla_force_host_platform_device_count={devices}"]))


def run_train(workdir, devices, sequence):
    env = with_devices(devices)
    cmd = [sys.executable, "-m", "launch.train", "--config=configs/hybrid.py:tiny,pattern=ALM",
           f"--workdir={workdir}", f"--config.mesh.sequence={sequence}", "--config.mesh.data=1",
           "--config.train.steps=3", "--config.train.warmup_steps=1", "--config.train.progress_bar=False",
           "--config.train.eval_batches=2", "--config.data.max_bytes=100000", "--config.data.seq_len=32",
           "--config.data.batch_size=2", "--config.model.d_model=32", "--config.model.d_ff=64"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = next(line for line in reversed(proc.stdout.splitlines()) if line.startswith("final:"))
    return {k: float(v) for k, v in re.findall(r"(\w+)=([-+\d.eE]+)(?:,|$)", final)}


def test_sequence_parallel_training_matches_one_device(tmp_path):
    one = run_train(tmp_path / "one", devices=1, sequence=1)
    two = run_train(tmp_path / "sp", devices=2, sequence=2)
    for key in ("loss", "val_loss", "grad_norm"):
        assert abs(one[key] - two[key]) <= 1e-3 * max(1.0, abs(one[key])), (key, one[key], two[key])


def test_indivisible_sequence_is_a_config_error(tmp_path):
    env = with_devices(2)
    proc = subprocess.run([sys.executable, "-m", "launch.train", "--config=configs/hybrid.py:tiny",
                           f"--workdir={tmp_path}", "--config.mesh.sequence=2", "--config.data.seq_len=33"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "data.seq_len" in proc.stderr and "mesh.sequence" in proc.stderr
