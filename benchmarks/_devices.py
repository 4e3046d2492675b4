"""Time of one K-beam step per device count (the suites' ``--devices``), and its report."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from benchmarks._common import environment, markdown_table, write_json


def device_scaling(
  counts: Sequence[int],
  num_beams: int,
  make_solver: Callable[[Any], Any],
  state: Any,
  sample_batch: Callable[[jax.Array], tuple[Any, ...]],
  *,
  steps: int = 20,
  repeats: int = 3,
  seed: int = 0,
) -> list[dict[str, Any]]:
  """Time of one K-beam step on each device count, and its numbers against one device.

  For n devices the mesh is ``beams = gcd(K, n)``, ``data = n / beams`` (the batch split
  on ``data``); ``make_solver(mesh)`` builds the solver (``kbeam_jax.parallel.kbeam``),
  ``state`` is placed with ``parallel.shard`` and ``sample_batch(key)`` draws one step's
  arguments inside the compiled loop. Each count compiles ``steps`` steps in one
  ``lax.scan`` first, then times ``repeats`` runs (median).

  Returns:
    One dict per count: ``devices``, ``mesh``, ``ms_per_step``, ``compile_s`` and
    ``max_abs_diff_u`` (against the first count, which should be 1).
  """
  import math

  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from kbeam_jax import parallel

  rows, reference = [], None
  key = jax.random.key(seed)
  for n in counts:
    beams = math.gcd(num_beams, n)
    mesh = parallel.make_mesh(beams=beams, data=n // beams)
    solver = make_solver(mesh)
    on_data = NamedSharding(mesh, P("data"))

    def body(s, k, solver=solver, on_data=on_data):
      batch = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, on_data), sample_batch(k))
      return solver.step(s, *batch)[0], None

    loop = lambda s, k, body=body: jax.lax.scan(body, s, jax.random.split(k, steps))[0]
    placed = parallel.shard(state, mesh)
    start = time.perf_counter()
    compiled = jax.jit(loop).lower(placed, key).compile()
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(max(1, repeats)):
      start = time.perf_counter()
      out = jax.block_until_ready(compiled(placed, key))
      times.append(time.perf_counter() - start)
    u = jax.tree.map(np.asarray, out.u)
    reference = u if reference is None else reference
    diff = max(
      float(np.max(np.abs(a - b)))
      for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(reference), strict=True)
    )
    rows.append(
      dict(
        devices=n,
        mesh={"beams": beams, "data": n // beams},
        ms_per_step=1e3 * statistics.median(times) / steps,
        compile_s=compile_s,
        max_abs_diff_u=diff,
      )
    )
  return rows


def device_report(suite: str, rows: list[dict[str, Any]], out_dir: Path, what: str) -> str:
  """Writes ``{suite}_devices.json`` and ``.md``: step time per device count."""
  meta = {"what": what, "environment": environment(), "device_kinds": device_kinds()}
  write_json(out_dir / f"{suite}_devices.json", rows, meta)
  base = rows[0]["ms_per_step"]
  table = markdown_table(
    ["devices", "mesh (beams × data)", "ms / step", "vs first", "compile (s)", "max |Δu|"],
    [
      [
        r["devices"],
        f"{r['mesh']['beams']} × {r['mesh']['data']}",
        f"{r['ms_per_step']:.2f}",
        f"{base / r['ms_per_step']:.2f}x",
        f"{r['compile_s']:.1f}",
        f"{r['max_abs_diff_u']:.1e}",
      ]
      for r in rows
    ],
  )
  note = (
    "Virtual CPU devices (XLA's host platform split into N devices) share the same cores: "
    "these figures show that the sharded step gives the numbers of one device, not how it "
    "scales; measure scaling on real devices."
    if jax.default_backend() == "cpu"
    else "Real devices."
  )
  text = f"# {what}: K-beam step time per device count\n\n{table}\n\n{note}\n"
  (out_dir / f"{suite}_devices.md").write_text(text)
  return text


def device_kinds() -> list[str]:
  return sorted({getattr(d, "device_kind", str(d)) for d in jax.devices()})
