"""Synthetic bilevel problems: the penalty paper's two, one with a continuum of lower
solutions and one with a badly scaled lower level.

``python -m benchmarks bilevel_synthetic [--quick] [--out results]``

``u, v`` in R^10, box ``[-5, 5]`` (both levels projected after every step), initial
points uniform in the box, 20 trials:

* ``sum``:        ``f = |u|² + |v|²``, ``g = |1 - u - v|²``; solution ``u = v = 0.5``;
* ``difference``: ``f = |v|² - |u - v|²``, ``g = |u - v|²``; solution ``u = v = 0``
  (both from Mehra & Hamm, ACML 2021);
* ``continuum``:  ``g = |Av - Bu|²`` with ``A`` a random 5 × 10 matrix, so ``∇²_vv g =
  2AᵀA`` is singular and every ``v`` with ``Av = Bu`` solves the lower problem;
  ``f = |u - a|² + |v - c|²``. The (optimistic) bilevel solution picks the ``v`` in that
  set nearest ``c``: ``min |u - a|² + |v - c|²`` subject to ``Av = Bu``, in closed form.
  Descent on ``g`` never moves ``v`` along the null space of ``A``, so the hypergradient
  methods optimize ``u`` with ``v``'s null-space part frozen where it started; the
  penalty method minimizes ``f + (γ/2)|∇_v g|²`` jointly and can select the solution;
* ``scaled``:     ``g = ½ Σ d_i (v_i - u_i)²`` with curvatures ``d_i`` from 1 to 100,
  ``f = |v - 1|² + |u|²``; solution ``u = v = 0.5``. The default inner step 0.1 is
  unstable above curvature 20 (the run diverges, and says so); the settings from the
  docs, an inner step below ``2 / λ_max`` (here ``1 / λ_max``) and Adam on ``v`` for the
  penalty method, are the ``scaled`` rows.

Methods: ``gd`` (the naive baseline, ``bilevel.Naive()``: ``∇_u f`` at ``v_T``), ``rmd``,
``fmd``, ``approxgrad``, ``cg``, ``neumann`` (hypergradient steps on ``u``, ``v``
warm-started from the previous ``v_T``), and the penalty method (``penalty``, and
``penalty_al`` with the augmented-Lagrangian multipliers), each with T in {1, 5, 10}
inner steps per outer step, all through ``bilevel.solver``. Every (problem, method, T)
runs all trials in one jitted, vmapped ``kbeam_jax.run``; it is compiled first, then
timed. Error vs iteration and vs wall time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import kbeam_jax
from benchmarks import _bilevel, _common

DIM, BOX, TRIALS = 10, 5.0, 20
OUTER_LR, INNER_LR = 0.05, 0.1
METHODS = ("gd", "rmd", "fmd", "approxgrad", "cg", "neumann", "penalty", "penalty_al")
TS = (1, 5, 10)
PENALTY_LR, MAX_GAMMA = OUTER_LR / 5, 20.0


class Problem(NamedTuple):
  """A synthetic problem: objectives, its solution and the settings it runs with."""

  f: Any
  g: Any
  u_star: np.ndarray
  v_star: np.ndarray
  curvature: float  # λ_max(∇²_vv g): the step sizes below follow from it
  inner_lr: float = INNER_LR  # the hypergradient methods' step on v
  penalty_lr: float = PENALTY_LR  # the penalty method's steps on u and v
  penalty_adam: bool = False  # Adam on u and v for the penalty method instead

  @property
  def solve_lr(self) -> float:
    """ApproxGrad's descent on ½|Hq - b|² is stable below 2/λ²: min(ρ, 1/λ²)."""
    return min(self.inner_lr, 1.0 / self.curvature**2)

  @property
  def neumann_lr(self) -> float:
    """The Neumann series converges below 2/λ: min(ρ, 1/λ)."""
    return min(self.inner_lr, 1.0 / self.curvature)


def continuum_matrices(seed: int = 0):
  kA, kB, ka, kc = jax.random.split(jax.random.key(seed), 4)
  A = jax.random.normal(kA, (5, DIM)) / jnp.sqrt(DIM)
  B = jax.random.normal(kB, (5, DIM)) / jnp.sqrt(DIM)
  a = jax.random.uniform(ka, (DIM,), minval=-1.0, maxval=1.0)
  c = jax.random.uniform(kc, (DIM,), minval=-1.0, maxval=1.0)
  return A, B, a, c


def problem(name: str) -> Problem:
  """The objectives, solution and settings of a synthetic problem."""
  if name == "sum":
    return Problem(
      lambda u, v: jnp.sum(u**2) + jnp.sum(v**2),
      lambda u, v: jnp.sum((1.0 - u - v) ** 2),
      np.full(DIM, 0.5),
      np.full(DIM, 0.5),
      curvature=2.0,
    )
  if name == "difference":
    return Problem(
      lambda u, v: jnp.sum(v**2) - jnp.sum((u - v) ** 2),
      lambda u, v: jnp.sum((u - v) ** 2),
      np.zeros(DIM),
      np.zeros(DIM),
      curvature=2.0,
    )
  if name == "continuum":
    A, B, a, c = continuum_matrices()
    # min |x - x0|² s.t. Mx = 0, x = (u, v), x0 = (a, c), M = [-B, A]: project x0 on null(M)
    M = np.concatenate([-np.asarray(B), np.asarray(A)], axis=1).astype(np.float64)
    x0 = np.concatenate([np.asarray(a), np.asarray(c)]).astype(np.float64)
    x = x0 - M.T @ np.linalg.solve(M @ M.T, M @ x0)
    curvature = float(np.linalg.eigvalsh(2 * np.asarray(A).T @ np.asarray(A)).max())
    return Problem(
      lambda u, v: jnp.sum((u - a) ** 2) + jnp.sum((v - c) ** 2),
      lambda u, v: jnp.sum((A @ v - B @ u) ** 2),
      x[:DIM],
      x[DIM:],
      curvature=curvature,
      # plain steps on L_γ are stable while ρ·γ·λ² < 2: ρ = 1/(γ_max λ²)
      penalty_lr=1.0 / (MAX_GAMMA * curvature**2),
    )
  if name in ("scaled", "scaled_default"):
    d = jnp.geomspace(1.0, 100.0, DIM)
    f = lambda u, v: jnp.sum((v - 1.0) ** 2) + jnp.sum(u**2)
    g = lambda u, v: 0.5 * jnp.sum(d * (v - u) ** 2)
    half = np.full(DIM, 0.5)
    if name == "scaled_default":
      return Problem(f, g, half, half, curvature=100.0)
    # the documented settings: ρ = 1/λ_max for descent, Adam for the penalty method
    return Problem(f, g, half, half, curvature=100.0, inner_lr=0.01, penalty_adam=True)
  raise KeyError(f"unknown problem {name!r}; known: {', '.join(PROBLEMS)}.")


PROBLEMS = ("sum", "difference", "continuum", "scaled_default", "scaled")


def project(x):
  return jnp.clip(x, -BOX, BOX)


def run_method(name: str, method: str, T: int, num_iters: int):
  """``(u0, v0) -> (errors (num_iters,), final upper value)`` for one trial."""
  p = problem(name)
  penalty = method in _bilevel.PENALTY_METHODS
  upper = optax.sgd(p.penalty_lr if penalty else OUTER_LR)
  if penalty and p.penalty_adam:
    upper = optax.adam(0.01)
  cfg = dict(
    inner_steps=T,
    inner_lr=p.inner_lr,
    solve_steps=T,
    solve_lr=p.solve_lr,
    neumann_lr=p.neumann_lr,
    penalty=dict(max_gamma=MAX_GAMMA),
    penalty_lr=0.05 if p.penalty_adam else p.penalty_lr,  # Adam's step on v, or plain
    penalty_lower="adam" if p.penalty_adam else "sgd",
  )
  solver = _bilevel.bilevel_solver(method, p.f, p.g, cfg, upper, project, project)

  def error(u, v):
    return jnp.sqrt(jnp.sum((u - p.u_star) ** 2) + jnp.sum((v - p.v_star) ** 2))

  def one(u0, v0):
    state = solver.init(jax.random.key(0), u0, v0)
    state, errors = kbeam_jax.run(solver.step, state, num_iters, trace=lambda s, _: error(s.u, s.v))
    return errors, p.f(state.u, state.v)

  return one


def run_suite(
  out_dir: Path, *, trials: int = TRIALS, num_iters: int = 2000, seed: int = 0, repeats: int = 3
) -> list[dict[str, Any]]:
  ku, kv = jax.random.split(jax.random.key(seed))
  u0 = jax.random.uniform(ku, (trials, DIM), minval=-BOX, maxval=BOX)
  v0 = jax.random.uniform(kv, (trials, DIM), minval=-BOX, maxval=BOX)
  records, curves = [], {}
  jobs = [(p, m, T) for p in PROBLEMS for m in METHODS for T in TS]
  for name, method, T in tqdm(jobs, desc="bilevel_synthetic", unit="run"):
    fn = jax.vmap(run_method(name, method, T, num_iters))
    (errors, values), compile_s, run_s = _common.compile_and_time(fn, u0, v0, repeats=repeats)
    errors = np.asarray(errors, np.float64)  # (trials, num_iters)
    p = problem(name)
    f_star = float(p.f(jnp.asarray(p.u_star), jnp.asarray(p.v_star)))
    final = errors[:, -1]
    gap = np.asarray(values, np.float64) - f_star
    records.append(
      dict(
        problem=name,
        method=method,
        T=T,
        error_mean=float(np.mean(final)),
        error_std=float(np.std(final)),
        finite=int(np.sum(np.isfinite(final))),
        upper_gap_mean=float(np.mean(gap)),
        seconds=run_s,
        compile_seconds=compile_s,
        trials=trials,
        iterations=num_iters,
        seconds_per_iteration=run_s / num_iters,
      )
    )
    curves[(name, method, T)] = errors.mean(axis=0)
  meta = dict(
    trials=trials,
    iterations=num_iters,
    outer_lr=OUTER_LR,
    inner_lr=INNER_LR,
    penalty_lr=PENALTY_LR,
    penalty_max_gamma=MAX_GAMMA,
    box=BOX,
    dim=DIM,
    environment=_common.environment(),
  )
  _common.write_json(out_dir / "bilevel_synthetic.json", records, meta)
  (out_dir / "bilevel_synthetic.md").write_text(markdown(records, meta))
  plot(records, curves, out_dir / "bilevel_synthetic.png")
  return records


NOTES = {
  "continuum": "∇²_vv g singular: the lower solutions form a 5-dimensional affine set. "
  "ApproxGrad's solve step 1/λ_max², the penalty method's steps 1/(γ_max λ_max²).",
  "scaled_default": "Curvatures 1..100 with the default inner step 0.1 (unstable above 20).",
  "scaled": "Curvatures 1..100 with the documented settings: inner step 1/λ_max = 0.01, "
  "ApproxGrad's solve step 1/λ_max² and Neumann's 1/λ_max; the penalty method with Adam "
  "on both levels (0.01 on u, 0.05 on v).",
}


def _cell(r) -> str:
  if r["finite"] < r["trials"]:
    return f"diverged in {r['trials'] - r['finite']}/{r['trials']} trials"
  return f"{_common.mean_std(r['error_mean'], r['error_std'])} ({r['seconds']:.3f} s)"


def markdown(records, meta) -> str:
  lines = [
    f"# Synthetic bilevel problems: error |(u, v) - (u*, v*)| after {meta['iterations']}"
    f" outer steps (mean ± std over {meta['trials']} trials), and run time",
    "",
    f"Outer step {meta['outer_lr']}, inner step {meta['inner_lr']}; penalty steps "
    f"{meta['penalty_lr']}, γ capped at {meta['penalty_max_gamma']}; both levels projected "
    f"onto [-{meta['box']}, {meta['box']}]. Seconds: all trials vmapped, after compiling "
    "(median of repeats). Last column: f(u, v) - f* at the end, mean over trials, T = 10 "
    "(below 0 where v is not yet a lower solution).",
    "",
  ]
  for name in PROBLEMS:
    rows = []
    for method in METHODS:
      row = [method]
      for T in TS:
        r = next(r for r in records if (r["problem"], r["method"], r["T"]) == (name, method, T))
        row.append(_cell(r))
      r10 = next(r for r in records if (r["problem"], r["method"], r["T"]) == (name, method, 10))
      row.append(f"{r10['upper_gap_mean']:.2e}")
      rows.append(row)
    lines += [f"## {name}", ""]
    if name in NOTES:
      lines += [NOTES[name], ""]
    header = ["method"] + [f"T = {T}" for T in TS] + ["f - f* (T = 10)"]
    lines += [_common.markdown_table(header, rows), ""]
  env = meta["environment"]
  lines += [f"Measured on {env['device']} ({env['backend']}), jax {env['jax']}.", ""]
  return "\n".join(lines)


def plot(records, curves, path: Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(len(PROBLEMS), len(TS), figsize=(4.5 * len(TS), 3.2 * len(PROBLEMS)))
  for i, name in enumerate(PROBLEMS):
    for j, T in enumerate(TS):
      ax = axes[i, j]
      for method in METHODS:
        r = next(r for r in records if (r["problem"], r["method"], r["T"]) == (name, method, T))
        curve = curves[(name, method, T)]
        t = np.arange(1, len(curve) + 1) * r["seconds_per_iteration"]
        ax.loglog(t, np.clip(np.nan_to_num(curve, nan=1e6), 1e-12, 1e6), label=method)
      ax.set(title=f"{name}, T = {T}", xlabel="wall time (s)", ylabel="error")
  axes[0, 0].legend(fontsize=7)
  fig.tight_layout()
  _common.save_figure(fig, path)


def main(args) -> None:
  """``python -m benchmarks bilevel_synthetic``."""
  run_suite(
    args.out,
    trials=args.trials or (5 if args.quick else 20),
    num_iters=300 if args.quick else 2000,
    seed=args.seed,
    repeats=1 if args.quick else 3,
  )
