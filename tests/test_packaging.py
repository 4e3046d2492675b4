"""What ``pip install`` puts into site-packages, the license and changelog, and what
``import kbeam_jax`` makes reachable (and how fast)."""

import subprocess
import sys
import tomllib
from pathlib import Path

import kbeam_jax

ROOT = Path(__file__).parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_only_kbeam_jax_is_installed():
  """benchmarks/ would land in site-packages as a generic top-level package."""
  assert PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"] == ["kbeam_jax*"]
  assert "version" in PYPROJECT["project"]["dynamic"]
  assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "kbeam_jax.__version__"}


def test_license_and_changelog():
  assert PYPROJECT["project"]["license"] == {"text": "Apache-2.0"}
  text = (ROOT / "LICENSE").read_text()
  assert "Apache License" in text and "Version 2.0, January 2004" in text
  assert "END OF TERMS AND CONDITIONS" in text
  changelog = (ROOT / "CHANGELOG.md").read_text().splitlines()
  assert changelog[0] == "# Changelog" and "## Unreleased" in changelog


def run(*args: str) -> str:
  result = subprocess.run(
    [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def test_import_kbeam_jax_reaches_every_subpackage_on_first_use():
  out = run(
    "-c",
    "import sys, kbeam_jax\n"
    "print(sorted(m for m in ('flax.nnx', 'kbeam_jax.nn', 'kbeam_jax.data', 'kbeam_jax.tasks') "
    "if m in sys.modules))\n"
    "print(kbeam_jax.nn.stack_modules.__name__, kbeam_jax.data.load_mnist.__name__, "
    "kbeam_jax.tasks.surfaces.__name__)\n",
  )
  loaded, names = out.splitlines()
  assert loaded == "[]"  # nothing heavy before first use (flax.nnx: 0.5 s -> 1.7 s)
  assert names == "stack_modules load_mnist kbeam_jax.tasks.surfaces"
  assert {"nn", "data", "tasks"} <= set(dir(kbeam_jax)) and "nn" in kbeam_jax.__all__


def test_benchmarks_run_from_the_repository_root():
  out = run("-m", "benchmarks", "--help")
  assert "surfaces" in out and "fewshot" in out


def test_version_has_a_changelog_section_and_floors_are_declared():
  changelog = (ROOT / "CHANGELOG.md").read_text().splitlines()
  assert any(line.startswith(f"## {kbeam_jax.__version__} (") for line in changelog)
  floors = dict(d.split(">=") for d in PYPROJECT["project"]["dependencies"])
  assert set(floors) == {"jax", "jaxlib", "optax", "flax", "chex", "orbax-checkpoint"}
  assert floors["jax"] == floors["jaxlib"]  # jaxlib moves with jax
  assert any("Python :: 3.11" in c for c in PYPROJECT["project"]["classifiers"])
