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
import numpy as np


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


def to_python(tree: Any) -> Any:
  """Arrays to (nested lists of) Python floats/ints, for JSON and checkpoint metadata."""
  return jax.tree.map(lambda x: np.asarray(x).tolist(), tree)


def train_in_chunks(
  chunk_fn: Callable[[Any], tuple[Any, Any]],
  state: Any,
  num_chunks: int,
  *,
  checkpoint: Path | None = None,
  resume: bool = False,
  stop_after: int | None = None,
  desc: str = "train",
  after_chunk: Callable[[Any], dict[str, Any]] | None = None,
  save_every_s: float = 10.0,
) -> tuple[Any, list[Any], dict[str, Any]]:
  """Runs ``state, metrics = chunk_fn(state)`` ``num_chunks`` times with a progress bar.

  ``chunk_fn`` is one compiled program (typically a ``lax.scan`` over a fixed number of
  iterations, all randomness drawn from keys in ``state``), so a run is deterministic and
  can be cut anywhere between chunks. With ``resume=True`` (the suites' ``--resume``) an
  existing checkpoint is loaded and the run continues from it, ending with the numbers of
  an uninterrupted run; after every chunk the state and the metrics so far are saved to
  ``checkpoint`` when ``save_every_s`` seconds have passed since the last save, and always
  when the call ends, also by an exception or Ctrl-C (an orbax save costs about 0.1 s on 2
  CPU cores: after each of the poisoning suite's 400 short chunks that would be about 45 s
  of its 160). Without ``resume`` nothing is read or written.

  Args:
    chunk_fn: ``state -> (state, metrics)``; jit it yourself (compiled once, reused).
    state: the initial state (also the template the checkpoint is read into).
    num_chunks: chunks in the whole run.
    checkpoint: directory for ``kbeam_jax.nn.save_checkpoint`` (orbax; one step kept).
    resume: continue from ``checkpoint`` when it exists, and keep it up to date.
    stop_after: stop after this many chunks of this call (simulates an interrupted run).
    desc: progress-bar label.
    after_chunk: ``state -> dict`` run after every chunk, outside the timing (an
      evaluation); its entries join that chunk's metrics (which must then be a dict).
    save_every_s: least time between two checkpoint saves (0: after every chunk). A run
      killed without warning loses at most this much work.

  Returns:
    ``(state, history, timing)``: the metrics of every chunk done so far (as Python
    lists), and ``{"compile_s", "run_s", "chunks_run"}`` for this call; ``compile_s``
    is the first chunk's time minus the median of the others when the call ran more
    than one chunk.
  """
  from tqdm.auto import tqdm

  from kbeam_jax import nn

  history: list[Any] = []
  if not resume:
    checkpoint = None  # checkpoints only when asked for
  if checkpoint is not None and nn.checkpoint_exists(checkpoint):
    state, meta = nn.load_checkpoint(checkpoint, like=state)
    history = list(meta["history"])
  times = []
  start_chunk = saved = len(history)
  last_save = time.perf_counter()
  try:
    for i in tqdm(range(start_chunk, num_chunks), desc=desc, initial=start_chunk, total=num_chunks):
      if stop_after is not None and i - start_chunk >= stop_after:
        break
      start = time.perf_counter()
      new_state, metrics = chunk_fn(state)
      new_state = jax.block_until_ready(new_state)
      times.append(time.perf_counter() - start)
      if after_chunk is not None:
        metrics = dict(metrics, **after_chunk(new_state))
      history.append(to_python(metrics))
      state = new_state  # state and history advance together
      if checkpoint is not None and time.perf_counter() - last_save >= save_every_s:
        nn.save_checkpoint(checkpoint, state, history=history)
        saved, last_save = len(history), time.perf_counter()
  finally:  # also on Ctrl-C or an error: keep what was computed since the last save
    if checkpoint is not None and len(history) > saved:
      nn.save_checkpoint(checkpoint, state, history=history)
  steady = statistics.median(times[1:]) if len(times) > 1 else (times[0] if times else 0.0)
  timing = {
    "compile_s": max(times[0] - steady, 0.0) if len(times) > 1 else None,
    "chunk_s": steady,
    "run_s": sum(times),
    "chunks_run": len(times),
  }
  return state, history, timing


def mnist_data(make_data: Callable[..., Any], seed: int, cfg: dict[str, Any], keys: Sequence[str]):
  """A task's split of the MNIST files (``KBEAM_JAX_DATA``): ``make_data(train images, train
  labels, test images, test labels, seed=seed, **options)``, the options ``cfg``'s ``keys``."""
  from kbeam_jax import data

  train, test = data.load_mnist("train"), data.load_mnist("test")
  options = {k: cfg[k] for k in keys}
  return make_data(train.images, train.labels, test.images, test.labels, seed=seed, **options)


def save_figure(fig: Any, path: Path) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120, bbox_inches="tight")
  import matplotlib.pyplot as plt

  plt.close(fig)


def chunk_length(total: int, target: int) -> int:
  """A chunk length near ``target`` that divides ``total`` steps exactly (one compiled chunk
  serves the whole run): ``total / n`` for the largest ``n <= round(total / target)`` that
  divides ``total``. ``chunk_length(8000, 2000) == 2000``, ``chunk_length(701, 500) == 701``.
  """
  n = max(1, round(total / target))
  while total % n:
    n -= 1
  return total // n


def kbeam_rules(epsilon: float) -> dict[str, Any]:
  """Every K-beam rule value under the name the reports print, the ε-rules at ``epsilon``."""
  from kbeam_jax import minimax

  eps_rules = {"random": minimax.Random, "min_norm": minimax.MinNorm, "kiwiel": minimax.Kiwiel}
  return {"best": minimax.Best(), **{name: rule(epsilon) for name, rule in eps_rules.items()}}


def bilevel_method(
  name: str,
  *,
  solve_steps: int = 10,
  solve_lr: float | str = "auto",
  neumann_lr: float | str | None = None,
):
  """The library's hypergradient method for a method name of the bilevel suites (the one
  table): ``naive`` (also ``gd``), ``fmd``, ``rmd``, ``rmd_checkpoint``, ``approxgrad``,
  ``cg``, ``neumann``. The penalty method is a solver of its own (``bilevel_solver``)."""
  from kbeam_jax import bilevel

  table = {
    "naive": lambda: bilevel.Naive(),
    "gd": lambda: bilevel.Naive(),
    "fmd": lambda: bilevel.FMD(),
    "rmd": lambda: bilevel.RMD(),
    "rmd_checkpoint": lambda: bilevel.RMD(checkpoint=True),
    "approxgrad": lambda: bilevel.ApproxGrad(solve_steps, solve_lr),
    "cg": lambda: bilevel.CG(solve_steps),
    "neumann": lambda: bilevel.Neumann(solve_steps, neumann_lr or solve_lr),
  }
  if name not in table:
    raise KeyError(f"unknown bilevel method {name!r}; known: {', '.join(table)}.")
  return table[name]()


PENALTY_METHODS = {"penalty": False, "penalty_al": True}  # name -> augmented


def bilevel_solver(name: str, f, g, cfg: dict[str, Any], upper, project_u=None, project_v=None):
  """The solver for the method called ``name`` with a suite's config: ``bilevel.solver``
  with T = ``inner_steps`` steps of size ``inner_lr``, or ``bilevel.penalty`` (its steps on
  ``v`` of size ``penalty_lr``, plain or Adam as ``penalty_lower`` says, its schedule in
  ``cfg["penalty"]``)."""
  import optax

  from kbeam_jax import bilevel

  if name in PENALTY_METHODS:
    if cfg.get("penalty_lower") == "adam":
      inner = dict(inner=optax.adam(cfg["penalty_lr"]))
    else:
      inner = dict(inner_lr=cfg["penalty_lr"])
    options = dict(cfg.get("penalty") or {}, augmented=PENALTY_METHODS[name])
    return bilevel.penalty(
      f,
      g,
      upper,
      inner_steps=cfg["inner_steps"],
      project_u=project_u,
      project_v=project_v,
      **inner,
      **options,
    )
  method = bilevel_method(
    name,
    solve_steps=cfg["solve_steps"],
    solve_lr=cfg.get("solve_lr") or "auto",
    neumann_lr=cfg.get("neumann_lr"),
  )
  inner = (
    dict(inner=cfg["inner"]) if cfg.get("inner") is not None else dict(inner_lr=cfg["inner_lr"])
  )
  return bilevel.solver(
    f,
    g,
    upper,
    method,
    inner_steps=cfg["inner_steps"],
    project_u=project_u,
    project_v=project_v,
    **inner,
  )


def warm_start(g, u, v, args, cfg: dict[str, Any]):
  """``v`` after ``cfg["warmup"]`` plain descent steps on ``g(u, ·)`` (the lower problem
  solved before the outer loop starts), compiled once."""
  from kbeam_jax import bilevel

  solve = jax.jit(
    lambda v: bilevel.argmin(
      g, u, v, *args, method=bilevel.Naive(), inner_steps=cfg["warmup"], inner_lr=cfg["inner_lr"]
    )
  )
  return solve(v)


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
