"""Synthetic bilevel problems: the penalty paper's two, one with a continuum of lower
solutions and one with a badly scaled lower level; the final error of every method of
``bilevel.solver`` and the penalty method for T in {1, 5, 10}, and error vs wall time.

``python -m benchmarks bilevel_synthetic [--quick] [--trials N] [--seed 0] [--out results]``

Writes ``bilevel_synthetic.json``, ``.md`` and ``.png``; docs/pages/benchmarks/bilevel_synthetic.md
explains the problems.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import kbeam_jax
from benchmarks import _bilevel, _common

DIM, BOX = 10, 5.0
OUTER_LR, INNER_LR = 0.05, 0.1
METHODS = ("gd", "rmd", "fmd", "approxgrad", "cg", "neumann", "penalty", "penalty_al")
TS, QUICK_TS = (1, 5, 10), (1, 10)
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


def continuum() -> Problem:
  kA, kB, ka, kc = jax.random.split(jax.random.key(0), 4)
  A = jax.random.normal(kA, (5, DIM)) / jnp.sqrt(DIM)
  B = jax.random.normal(kB, (5, DIM)) / jnp.sqrt(DIM)
  a = jax.random.uniform(ka, (DIM,), minval=-1.0, maxval=1.0)
  c = jax.random.uniform(kc, (DIM,), minval=-1.0, maxval=1.0)
  # min |x - x0|² s.t. Mx = 0, x = (u, v), x0 = (a, c), M = [-B, A]: project x0 on null(M)
  M = np.concatenate([-np.asarray(B), np.asarray(A)], axis=1).astype(np.float64)
  x0 = np.concatenate([np.asarray(a), np.asarray(c)]).astype(np.float64)
  x = x0 - M.T @ np.linalg.solve(M @ M.T, M @ x0)
  curvature = float(np.linalg.eigvalsh(2 * np.asarray(A).T @ np.asarray(A)).max())
  f = lambda u, v: jnp.sum((u - a) ** 2) + jnp.sum((v - c) ** 2)
  g = lambda u, v: jnp.sum((A @ v - B @ u) ** 2)
  # plain steps on L_γ are stable while ρ·γ·λ² < 2: ρ = 1/(γ_max λ²)
  return Problem(f, g, x[:DIM], x[DIM:], curvature, penalty_lr=1.0 / (MAX_GAMMA * curvature**2))


def scaled(**settings) -> Problem:
  d = jnp.geomspace(1.0, 100.0, DIM)
  f = lambda u, v: jnp.sum((v - 1.0) ** 2) + jnp.sum(u**2)
  g = lambda u, v: 0.5 * jnp.sum(d * (v - u) ** 2)
  return Problem(f, g, np.full(DIM, 0.5), np.full(DIM, 0.5), curvature=100.0, **settings)


PROBLEMS = {
  "sum": lambda: Problem(
    lambda u, v: jnp.sum(u**2) + jnp.sum(v**2), lambda u, v: jnp.sum((1.0 - u - v) ** 2),
    np.full(DIM, 0.5), np.full(DIM, 0.5), curvature=2.0,
  ),
  "difference": lambda: Problem(
    lambda u, v: jnp.sum(v**2) - jnp.sum((u - v) ** 2), lambda u, v: jnp.sum((u - v) ** 2),
    np.zeros(DIM), np.zeros(DIM), curvature=2.0,
  ),
  "continuum": continuum,
  "scaled_default": scaled,
  # the documented settings: ρ = 1/λ_max for descent, Adam for the penalty method
  "scaled": lambda: scaled(inner_lr=0.01, penalty_adam=True),
}  # fmt: skip


def problem(name: str) -> Problem:
  """The objectives, solution and settings of a synthetic problem."""
  if name not in PROBLEMS:
    raise KeyError(f"unknown problem {name!r}; known: {', '.join(PROBLEMS)}.")
  return PROBLEMS[name]()


def project(x):
  return jnp.clip(x, -BOX, BOX)


def quadratic(fn) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(H, b, c)`` with ``fn(u, v) = ½ xᵀHx + bᵀx + c``, ``x = (u, v)``: exact for the
  quadratic objectives here (checked at a random point), so that one compiled program runs
  every problem."""
  at = lambda x: fn(x[:DIM], x[DIM:])
  taylor = jax.jit(lambda x0: (jax.hessian(at)(x0), jax.grad(at)(x0), at(x0)))
  q = taylor(jnp.zeros(2 * DIM))
  x = jax.random.uniform(jax.random.key(1), (2 * DIM,), minval=-BOX, maxval=BOX)
  exact, taylor_value = float(at(x)), float(value(q, x[:DIM], x[DIM:]))
  if abs(exact - taylor_value) > 1e-4 * max(1.0, abs(exact)):
    raise ValueError(
      f"quadratic: the objective is not a quadratic in (u, v) ({exact} at a random point, "
      f"its second-order Taylor expansion at 0 gives {taylor_value}); the suite passes "
      "every problem to its programs as (H, b, c)."
    )
  return q


def value(q: tuple[jax.Array, jax.Array, jax.Array], u: jax.Array, v: jax.Array) -> jax.Array:
  """``½ xᵀHx + bᵀx + c`` at ``x = (u, v)`` for ``q = (H, b, c)``."""
  H, b, c = q
  x = jnp.concatenate([u, v])
  return 0.5 * x @ H @ x + b @ x + c


def arguments(p: Problem) -> dict[str, Any]:
  """What a program takes of the problem ``p`` as arguments: objectives, solution, steps."""
  data = dict(f=quadratic(p.f), g=quadratic(p.g), u_star=p.u_star, v_star=p.v_star)
  return data | dict(inner_lr=p.inner_lr, penalty_lr=p.penalty_lr)


class Static(NamedTuple):
  """What a method's program compiles in of a problem: the problems with equal values
  share one program."""

  solve_lr: float | None = None  # ApproxGrad's and Neumann's step in their linear solve
  penalty_adam: bool = False  # the penalty method with Adam on both levels


def static(p: Problem, method: str) -> Static:
  """The compiled-in settings of ``method``'s program on the problem ``p``."""
  if method in _bilevel.PENALTY_METHODS:
    return Static(penalty_adam=p.penalty_adam)
  if method == "approxgrad":  # its descent is stable below 2/λ², the Neumann series below 2/λ
    return Static(solve_lr=min(p.inner_lr, 1.0 / p.curvature**2))
  if method == "neumann":
    return Static(solve_lr=min(p.inner_lr, 1.0 / p.curvature))
  return Static()


def program(method: str, T: int, num_iters: int, setting: Static):
  """``(arguments, u0, v0) -> (errors (num_iters,), diverging (num_iters,), final f)``:
  ``method`` with T inner steps for one trial on the problem the arguments describe. The
  suite records the flagged steps itself, so ``kbeam_jax.run`` leaves its warning out
  (``warn=False``: no host callback, and JAX's persistent cache can keep the program)."""
  penalty, adam = method in _bilevel.PENALTY_METHODS, setting.penalty_adam

  def one(data, u0, v0):
    f = lambda u, v: value(data["f"], u, v)
    g = lambda u, v: value(data["g"], u, v)
    upper = optax.adam(0.01) if adam else optax.sgd(data["penalty_lr"] if penalty else OUTER_LR)
    cfg = dict(
      inner_steps=T, inner_lr=data["inner_lr"], solve_steps=T, solve_lr=setting.solve_lr,
      penalty=dict(max_gamma=MAX_GAMMA), penalty_lr=0.05 if adam else data["penalty_lr"],
      penalty_lower="adam" if adam else "sgd",
    )  # fmt: skip
    solver = _bilevel.bilevel_solver(method, f, g, cfg, upper, project, project)
    error = lambda s: jnp.sqrt(
      jnp.sum((s.u - data["u_star"]) ** 2) + jnp.sum((s.v - data["v_star"]) ** 2)
    )
    trace = lambda s, info: (error(s), jnp.any(getattr(info, "diverging", False)))
    state = solver.init(jax.random.key(0), u0, v0)
    state, (errors, diverging) = kbeam_jax.run(
      solver.step, state, num_iters, trace=trace, warn=False
    )
    return errors, diverging, f(state.u, state.v)

  return one


def run_method(name: str, method: str, T: int, num_iters: int):
  """``(u0, v0) -> (errors (num_iters,), diverging, final upper value)`` for one trial."""
  p = problem(name)
  data = arguments(p)
  return lambda u0, v0: program(method, T, num_iters, static(p, method))(data, u0, v0)


def run_suite(trials: int, num_iters: int, seed: int, repeats: int, ts: tuple[int, ...] = TS):
  """Every (problem, method, T in ``ts``); returns the records and the mean error curves.
  Each program is compiled once and run on every problem whose settings it shares; its
  ``compile_seconds`` go into the record of the problem that compiled it (0 in the others)."""
  ku, kv = jax.random.split(jax.random.key(seed))
  u0 = jax.random.uniform(ku, (trials, DIM), minval=-BOX, maxval=BOX)
  v0 = jax.random.uniform(kv, (trials, DIM), minval=-BOX, maxval=BOX)
  records, curves, programs = [], {}, {}
  problems = {name: problem(name) for name in PROBLEMS}
  data_of = {name: arguments(p) for name, p in problems.items()}
  f_star = {name: float(value(d["f"], d["u_star"], d["v_star"])) for name, d in data_of.items()}
  jobs = [(name, m, T) for m in METHODS for T in ts for name in PROBLEMS]
  for name, method, T in tqdm(jobs, desc="bilevel_synthetic", unit="run"):
    p, data = problems[name], data_of[name]
    key = (method, T, static(p, method))
    compile_s = 0.0
    if key not in programs:
      fn = jax.vmap(program(method, T, num_iters, key[2]), in_axes=(None, 0, 0))
      programs[key], compile_s = _common.compile_fn(fn, data, u0, v0)
    (errors, diverging, values), run_s = _common.time_call(
      programs[key], data, u0, v0, repeats=repeats
    )
    errors = np.asarray(errors, np.float64)  # (trials, num_iters)
    final, gap = errors[:, -1], np.asarray(values, np.float64) - f_star[name]
    records.append(
      dict(
        problem=name, method=method, T=T, error_mean=float(np.mean(final)),
        error_std=float(np.std(final)), finite=int(np.sum(np.isfinite(final))),
        upper_gap_mean=float(np.mean(gap)), seconds=run_s, compile_seconds=compile_s,
        diverging_trials=int(np.sum(np.any(diverging, axis=1))),
        diverging_steps=int(np.max(np.sum(diverging, axis=1))),
        trials=trials, iterations=num_iters, seconds_per_iteration=run_s / num_iters,
      )
    )  # fmt: skip
    curves[name, method, T] = errors.mean(axis=0)
  return records, curves


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


def _by_case(records) -> tuple[dict[tuple[str, str, int], dict[str, Any]], list[int]]:
  """The records by ``(problem, method, T)``, and the T values they hold (the columns)."""
  by = {(r["problem"], r["method"], r["T"]): r for r in records}
  return by, sorted({T for _, _, T in by})


def markdown(records, meta) -> str:
  by, ts = _by_case(records)
  lines = [
    f"# Synthetic bilevel problems: error |(u, v) - (u*, v*)| after {meta['iterations']}"
    f" outer steps (mean ± std over {meta['trials']} trials), and run time\n",
    f"Outer step {meta['outer_lr']}, inner step {meta['inner_lr']}; penalty steps "
    f"{meta['penalty_lr']}, γ capped at {meta['penalty_max_gamma']}; both levels projected "
    f"onto [-{meta['box']}, {meta['box']}]. Seconds: all trials vmapped, after compiling "
    "(median of repeats). Last column: f(u, v) - f* at the end, mean over trials, T = 10 "
    "(below 0 where v is not yet a lower solution).\n",
  ]
  # the cells of the problem ``name`` of the loop below
  columns = {"method": str} | {f"T = {T}": lambda m, T=T: _cell(by[name, m, T]) for T in ts}
  columns["f - f* (T = 10)"] = lambda m: f"{by[name, m, 10]['upper_gap_mean']:.2e}"
  for name in PROBLEMS:
    note = [NOTES[name] + "\n"] if name in NOTES else []
    lines += [f"## {name}\n", *note, _common.table(METHODS, columns) + "\n"]
    flagged = [r for r in records if r["problem"] == name and r["diverging_trials"]]
    if flagged:
      lines.append(
        "Flagged divergence (`info.diverging`: the inner or linear solve ran away; "
        "`kbeam_jax.run` would warn of it; recorded here instead): " + ", ".join(
          f"{r['method']} T = {r['T']} in {r['diverging_trials']}/{r['trials']} trials "
          f"(at most {r['diverging_steps']} of {r['iterations']} steps)" for r in flagged
        ) + ".\n"
      )  # fmt: skip
  return "\n".join(lines + [_bilevel.measured_on(meta)])


def plot(records, curves):
  import matplotlib.pyplot as plt

  by, ts = _by_case(records)
  fig, axes = plt.subplots(
    len(PROBLEMS), len(ts), figsize=(4.5 * len(ts), 3.2 * len(PROBLEMS)), squeeze=False
  )
  for row, name in zip(axes, PROBLEMS, strict=True):
    for ax, T in zip(row, ts, strict=True):
      for method in METHODS:
        curve = curves[name, method, T]
        t = np.arange(1, len(curve) + 1) * by[name, method, T]["seconds_per_iteration"]
        ax.loglog(t, np.clip(np.nan_to_num(curve, nan=1e6), 1e-12, 1e6), label=method)
      ax.set(title=f"{name}, T = {T}", xlabel="wall time (s)", ylabel="error")
  axes[0, 0].legend(fontsize=7)
  fig.tight_layout()
  return fig


def main(args) -> None:
  """``python -m benchmarks bilevel_synthetic``."""
  num_iters = 300 if args.quick else 2000
  ts = QUICK_TS if args.quick else TS
  records, curves = run_suite(args.trials, num_iters, args.seed, 1 if args.quick else 3, ts)
  meta = dict(
    trials=args.trials, iterations=num_iters, outer_lr=OUTER_LR, inner_lr=INNER_LR,
    penalty_lr=PENALTY_LR, penalty_max_gamma=MAX_GAMMA, box=BOX, dim=DIM,
    environment=_common.environment(),
  )  # fmt: skip
  text = markdown(records, meta)
  _common.publish(args.out, "bilevel_synthetic", records, meta, text, plot(records, curves))
