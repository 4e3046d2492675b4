"""The bilevel suites' methods by name and their solvers from a suite's config (denoising,
poisoning, bilevel_synthetic)."""

from __future__ import annotations

from typing import Any

import jax


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
