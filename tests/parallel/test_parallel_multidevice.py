"""Runs the 8-device checks in tests/parallel/multidevice/ in a fresh interpreter.

XLA reads the simulated device count once, when the jax backend starts; in a whole-suite pytest run other tests
start it first with one device, so the multi-device checks run as a pytest subprocess with the flag set. By hand:
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m pytest tests/parallel/multidevice \
        -o python_files='check_*.py'
"""

import pathlib
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).parent
REPO = HERE.parent.parent
CHECK_FILES = sorted(p.name for p in (HERE / "multidevice").glob("check_*.py"))


def test_check_files_exist():
    assert {"check_lasp2.py", "check_sharding.py"} <= set(CHECK_FILES)


@pytest.mark.parametrize("check_file", CHECK_FILES)
def test_multidevice_checks(check_file, subprocess_env):
    cmd = [sys.executable, "-m", "pytest", str(HERE / "multidevice" / check_file), "-q", "-x",
           "-p", "no:cacheprovider", "-o", "python_files=check_*.py"]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(8), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{check_file} failed:\n{proc.stdout[-8000:]}\n{proc.stderr[-4000:]}"
