"""The hybrid config trains with sequence parallelism through launch.train (2 simulated devices), and its
losses equal the single-device run's."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_train(env, workdir, sequence):
    cmd = [sys.executable, "-m", "launch.train", "--config=configs/hybrid.py:tiny,pattern=ALM",
           f"--workdir={workdir}", f"--config.mesh.sequence={sequence}", "--config.mesh.data=1",
           "--config.train.steps=3", "--config.train.warmup_steps=1", "--config.train.progress_bar=False",
           "--config.train.eval_batches=2", "--config.data.max_bytes=100000", "--config.data.seq_len=32",
           "--config.data.batch_size=2", "--config.model.d_model=32", "--config.model.d_ff=64"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = next(line for line in reversed(proc.stdout.splitlines()) if line.startswith("final:"))
    return {k: float(v) for k, v in re.findall(r"(\w+)=([-+\d.eE]+)(?:,|$)", final)}


def test_sequence_parallel_training_matches_one_device(tmp_path, subprocess_env):
    # Both runs take the suite's cheap-compile XLA flags (subprocess_env keeps them).
    one = run_train(subprocess_env(1), tmp_path / "one", sequence=1)
    two = run_train(subprocess_env(2), tmp_path / "sp", sequence=2)
    for key in ("loss", "val_loss", "grad_norm"):
        assert abs(one[key] - two[key]) <= 1e-3 * max(1.0, abs(one[key])), (key, one[key], two[key])


def test_indivisible_sequence_is_a_config_error(tmp_path, subprocess_env):
    env = subprocess_env(2)
    proc = subprocess.run([sys.executable, "-m", "launch.train", "--config=configs/hybrid.py:tiny",
                           f"--workdir={tmp_path}", "--config.mesh.sequence=2", "--config.data.seq_len=33"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "data.seq_len" in proc.stderr and "mesh.sequence" in proc.stderr
