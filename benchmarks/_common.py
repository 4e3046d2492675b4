"""Timing and report helpers shared by the benchmark suites."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax


def compile_and_time(
  fn: Callable[..., Any], *args: Any, repeats: int = 3
) -> tuple[Any, float, float]:
  """Compiles ``jax.jit(fn)`` for ``args``, then times ``repeats`` runs.

  Returns:
    ``(output, compile_seconds, median_run_seconds)``; compilation is not in the median.
  """
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_seconds = time.perf_counter() - start
  times, out = [], None
  for _ in range(max(1, repeats)):
    start = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return out, compile_seconds, statistics.median(times)


def environment() -> dict[str, str]:
  """The machine and versions a figure was measured on."""
  device = jax.devices()[0]
  return {
    "jax": jax.__version__,
    "backend": jax.default_backend(),
    "device": getattr(device, "device_kind", str(device)),
    "python": platform.python_version(),
    "machine": platform.machine(),
  }


def write_json(path: Path, records: Sequence[dict[str, Any]], meta: dict[str, Any]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps({"meta": meta, "records": list(records)}, indent=2) + "\n")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def mean_std(mean: float, std: float) -> str:
  return f"{mean:.3f} ± {std:.3f}"
