"""The bilevel suites' methods by name, their solvers from a suite's config, and the chunked
training run that denoising and poisoning share."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np

from benchmarks import _common


def bilevel_method(
  name: str, *, solve_steps: int = 10, solve_lr: float | str = "auto",
  neumann_lr: float | str | None = None,
):  # fmt: skip
  """The library's hypergradient method for a method name of the bilevel suites (the one
  table): ``naive`` (also ``gd``), ``fmd``, ``rmd``, ``rmd_checkpoint``, ``approxgrad``,
  ``cg``, ``neumann``. The penalty method is a solver of its own (``bilevel_solver``)."""
  from kbeam_jax import bilevel

  table = {
    "naive": bilevel.Naive, "gd": bilevel.Naive, "fmd": bilevel.FMD, "rmd": bilevel.RMD,
    "rmd_checkpoint": lambda: bilevel.RMD(checkpoint=True),
    "approxgrad": lambda: bilevel.ApproxGrad(solve_steps, solve_lr),
    "cg": lambda: bilevel.CG(solve_steps),
    "neumann": lambda: bilevel.Neumann(solve_steps, neumann_lr or solve_lr),
  }  # fmt: skip
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

  common = dict(inner_steps=cfg["inner_steps"], project_u=project_u, project_v=project_v)
  if name in PENALTY_METHODS:
    adam = cfg.get("penalty_lower") == "adam"
    inner = dict(inner=optax.adam(cfg["penalty_lr"])) if adam else dict(inner_lr=cfg["penalty_lr"])
    options = dict(cfg.get("penalty") or {}, augmented=PENALTY_METHODS[name])
    return bilevel.penalty(f, g, upper, **common, **inner, **options)
  method = bilevel_method(
    name, solve_steps=cfg["solve_steps"], solve_lr=cfg.get("solve_lr") or "auto",
    neumann_lr=cfg.get("neumann_lr"),
  )  # fmt: skip
  has_inner = cfg.get("inner") is not None
  inner = dict(inner=cfg["inner"]) if has_inner else dict(inner_lr=cfg["inner_lr"])
  return bilevel.solver(f, g, upper, method, **common, **inner)


def warm_start(g, u, v, args, cfg: dict[str, Any]):
  """``v`` after ``cfg["warmup"]`` plain descent steps on ``g(u, ·)`` (the lower problem
  solved before the outer loop starts), compiled once."""
  from kbeam_jax import bilevel

  options = dict(method=bilevel.Naive(), inner_steps=cfg["warmup"], inner_lr=cfg["inner_lr"])
  return jax.jit(lambda v: bilevel.argmin(g, u, v, *args, **options))(v)


def train(
  solver, u0, v0, args, cfg: dict[str, Any], *, key: jax.Array, label: tuple, out_dir: Path,
  resume: bool, steps: int | None = None,
) -> tuple[Any, list[float], dict[str, Any]]:  # fmt: skip
  """``solver`` from ``(u0, v0)`` for ``steps`` (default ``cfg["outer_steps"]``) steps in
  ``cfg["outer_steps"] // cfg["chunk"]`` chunks, each one compiled ``kbeam_jax.run`` through
  ``_common.train_in_chunks`` (checkpoint ``label`` with ``resume``). Returns the final
  state, the upper objective after every step, and the record's timing fields: ``seconds``
  (median chunk after compiling × chunks), ``compile_seconds``, ``outer_steps``."""
  import kbeam_jax

  num_chunks = cfg["outer_steps"] // cfg["chunk"]
  chunk = (steps or cfg["outer_steps"]) // num_chunks
  run = jax.jit(
    lambda state: kbeam_jax.run(solver.step, state, chunk, *args, trace=lambda _, i: i.value)
  )
  state, history, timing = _common.train_in_chunks(
    run, solver.init(key, u0, v0), num_chunks, resume=resume, desc=" ".join(map(str, label)),
    checkpoint=out_dir / "checkpoints" / "_".join(map(str, label)),
  )  # fmt: skip
  seconds = timing["chunk_s"] * num_chunks
  fields = dict(
    seconds=seconds, compile_seconds=timing["compile_s"], outer_steps=num_chunks * chunk
  )
  return state, [float(x) for c in history for x in c], fields


def summary(values) -> str:
  """One value to 4 places, several as mean ± std."""
  values = np.asarray(values, np.float64)
  if values.size == 1:
    return f"{values[0]:.4f}"
  return _common.mean_std(float(values.mean()), float(values.std()))


def measured_on(meta: dict[str, Any]) -> str:
  env = meta["environment"]
  return f"Measured on {env['device']} ({env['backend']}), jax {env['jax']}.\n"
