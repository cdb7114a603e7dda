"""The parallel package builds on the array ops, never on the models: models import parallel, not the reverse."""

import subprocess
import sys


def test_parallel_imports_no_model_module():
    script = ("import sys, jaxspec.parallel.lasp2, jaxspec.parallel.sharding, jaxspec.parallel.mesh, "
              "jaxspec.parallel.context, jaxspec.parallel.collectives, jaxspec.parallel.distributed; "
              "print(sorted(m for m in sys.modules if m.startswith('jaxspec.models')))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
