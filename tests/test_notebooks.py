"""Executes the notebooks at a small size (``KBEAM_JAX_QUICK=1``) so they cannot rot."""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, monkeypatch):
  monkeypatch.setenv("KBEAM_JAX_QUICK", "1")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  # the kernel imports this checkout's kbeam_jax, not whichever copy pip installed
  python_path = [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(python_path))
  if os.environ.get("KBEAM_JAX_DATA"):  # relative to the repository (CI); kernels run elsewhere
    monkeypatch.setenv("KBEAM_JAX_DATA", os.path.abspath(os.environ["KBEAM_JAX_DATA"]))
  nb = nbformat.read(path, as_version=4)
  assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), (
    f"{path.name} is stored with outputs; clear them before committing."
  )
  NotebookClient(
    nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
  ).execute()


def test_there_are_notebooks():
  assert NOTEBOOKS, "no notebooks found"
  assert os.path.exists(NOTEBOOKS[0])
