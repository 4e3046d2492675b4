"""Time of one K-beam step per device count (the suites' ``--devices``), and its report."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from benchmarks import _common
from kbeam_jax import parallel


def device_scaling(
  counts: Sequence[int], num_beams: int, make_solver: Callable[[Any], Any], state: Any,
  sample_batch: Callable[[jax.Array], tuple[Any, ...]], *, steps: int = 20, repeats: int = 3,
  seed: int = 0,
) -> list[dict[str, Any]]:  # fmt: skip
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
  rows, reference = [], None
  for n in counts:
    beams = math.gcd(num_beams, n)
    mesh = parallel.make_mesh(beams=beams, data=n // beams)
    solver, on_data = make_solver(mesh), NamedSharding(mesh, P("data"))

    def body(s, k, solver=solver, on_data=on_data):
      batch = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, on_data), sample_batch(k))
      return solver.step(s, *batch)[0], None

    loop = lambda s, k, body=body: jax.lax.scan(body, s, jax.random.split(k, steps))[0]
    out, compile_s, run_s = _common.compile_and_time(
      loop, parallel.shard(state, mesh), jax.random.key(seed), repeats=repeats
    )
    u = [np.asarray(leaf) for leaf in jax.tree.leaves(out.u)]
    reference = u if reference is None else reference
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(u, reference, strict=True))
    mesh_shape = {"beams": beams, "data": n // beams}
    rows.append(dict(devices=n, mesh=mesh_shape, ms_per_step=1e3 * run_s / steps,
                     compile_s=compile_s, max_abs_diff_u=diff))  # fmt: skip
  return rows


def study(suite: str, what: str, out_dir: Path, counts: Sequence[int], *args: Any, **kw: Any):
  """``device_scaling(counts, *args, **kw)`` (one device first) written as the suite's
  ``{suite}_devices.json`` and ``.md``; returns the Markdown."""
  rows = device_scaling((1,) + tuple(c for c in counts if c != 1), *args, **kw)
  base = rows[0]["ms_per_step"]
  table = _common.table(rows, {
    "devices": lambda r: r["devices"],
    "mesh (beams × data)": lambda r: f"{r['mesh']['beams']} × {r['mesh']['data']}",
    "ms / step": lambda r: f"{r['ms_per_step']:.2f}",
    "vs first": lambda r: f"{base / r['ms_per_step']:.2f}x",
    "compile (s)": lambda r: f"{r['compile_s']:.1f}",
    "max |Δu|": lambda r: f"{r['max_abs_diff_u']:.1e}",
  })  # fmt: skip
  note = (
    "Virtual CPU devices (XLA's host platform split into N devices) share the same cores: "
    "these figures show that the sharded step gives the numbers of one device, not how it "
    "scales; measure scaling on real devices."
    if jax.default_backend() == "cpu"
    else "Real devices."
  )
  text = f"# {what}: K-beam step time per device count\n\n{table}\n\n{note}\n"
  kinds = sorted({getattr(d, "device_kind", str(d)) for d in jax.devices()})
  meta = {"what": what, "environment": _common.environment(), "device_kinds": kinds}
  return _common.publish(out_dir, f"{suite}_devices", rows, meta, text)
