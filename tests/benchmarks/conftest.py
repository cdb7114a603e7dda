"""What the benchmark smoke tests share: a benchmark script loaded as a module (benchmarks/ is not a package)."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks")


def load_benchmark(name: str):
    """benchmarks/NAME.py as the module `benchmarks_NAME`, loaded once per process (absl flags are global)."""
    module_name = f"benchmarks_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, os.path.join(BENCHMARKS, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


@pytest.fixture(scope="session")
def benchmark_script():
    return load_benchmark
