"""Every notebook executes top to bottom with small settings (JAXSPEC_NOTEBOOK_SMALL=1), and is stored
without outputs. The notebooks assert their own results (exact decoding, LASP-2 equal to one device, ...)."""

import glob
import os

import nbformat
import pytest
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "notebooks", "*.ipynb")))
EXPECTED = ["01_quickstart.ipynb", "02_tree_verification.ipynb", "03_matformer_elastic.ipynb",
            "04_sequence_parallel.ipynb"]


def test_every_notebook_is_found():
    assert [os.path.basename(p) for p in NOTEBOOKS] == EXPECTED


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_executes(path, tmp_path, monkeypatch, subprocess_env):
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{path}: save it without outputs"
    # The kernel inherits this environment: small settings, scratch space, the repository on the path, and the
    # suite's cheap-compile flags without a device count (a notebook sets its own: 04 appends it to XLA_FLAGS).
    env = subprocess_env(JAXSPEC_NOTEBOOK_SMALL="1", JAXSPEC_NOTEBOOK_DIR=str(tmp_path))
    for key, value in env.items():
        if os.environ.get(key) != value:
            monkeypatch.setenv(key, value)
    client = NotebookClient(notebook, kernel_name="python3", timeout=600,
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the failing cell and its traceback, on any error
