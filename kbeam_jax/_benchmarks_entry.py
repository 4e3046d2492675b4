"""``kbeam-benchmarks``: ``python -m benchmarks`` from any folder.

The benchmark suites live in the source repository's ``benchmarks/`` (they are not part of
the installed package). An editable install (``pip install -e .`` in a clone) keeps
``kbeam_jax`` inside that clone, so the suites are found beside it and run with the current
folder as the working folder (``--out results`` lands there).
"""

from __future__ import annotations

import sys
from pathlib import Path


def repository_root() -> Path:
  """The clone this ``kbeam_jax`` was installed from in editable mode, or a SystemExit that
  says how to get one."""
  root = Path(__file__).resolve().parent.parent
  if not (root / "benchmarks" / "__main__.py").is_file():
    raise SystemExit(
      f"kbeam-benchmarks: no benchmarks/ beside the installed kbeam_jax ({root}). The "
      "benchmark suites ship with the source repository: clone it and install it editable "
      'there (pip install -e ".[bench]"), then run kbeam-benchmarks from any folder.'
    )
  return root


def main(argv: list[str] | None = None) -> int:
  root = repository_root()
  if str(root) not in sys.path:
    sys.path.insert(0, str(root))
  from benchmarks.__main__ import main as run

  return run(argv)
