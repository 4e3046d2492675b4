"""The synthetic bilevel problems of the penalty paper (Mehra & Hamm, ACML 2021).

``python -m benchmarks bilevel_synthetic [--quick] [--out results]``

``u, v`` in R^10, box ``[-5, 5]`` (projected after every step), initial points uniform in
the box, 20 trials:

* ``sum``:        ``f = |u|² + |v|²``, ``g = |1 - u - v|²``; solution ``u = v = 0.5``;
* ``difference``: ``f = |v|² - |u - v|²``, ``g = |u - v|²``; solution ``u = v = 0``.

Methods: ``gd`` (the naive baseline: ``∇_u f`` at ``v_T``, no ``dv/du`` term), ``rmd``,
``fmd``, ``approxgrad``, ``cg``, ``neumann`` (hypergradient steps on ``u``, ``v``
warm-started from the previous ``v_T``), and the penalty method (``penalty``, and
``penalty_al`` with the augmented-Lagrangian multipliers), each with T in {1, 5, 10}
inner steps per outer step. Every (method, T) runs all trials in one jitted, vmapped
``lax.scan``; it is compiled first, then timed. Error vs iteration and vs wall time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import kbeam_jax
from benchmarks import _common
from kbeam_jax import bilevel

DIM, BOX, TRIALS = 10, 5.0, 20
OUTER_LR, INNER_LR = 0.05, 0.1
METHODS = ("gd", "rmd", "fmd", "approxgrad", "cg", "neumann", "penalty", "penalty_al")
TS = (1, 5, 10)


def problem(name: str):
  """``(f, g, solution)`` of a synthetic problem."""
  if name == "sum":
    return (
      lambda u, v: jnp.sum(u**2) + jnp.sum(v**2),
      lambda u, v: jnp.sum((1.0 - u - v) ** 2),
      0.5,
    )
  if name == "difference":
    return (
      lambda u, v: jnp.sum(v**2) - jnp.sum((u - v) ** 2),
      lambda u, v: jnp.sum((u - v) ** 2),
      0.0,
    )
  raise KeyError(f"unknown problem {name!r}; known: 'sum', 'difference'.")


def project(x):
  return jnp.clip(x, -BOX, BOX)


def hypergradient_step(method: str, f, g, T: int):
  """One outer step ``(u, v) -> (u, v)`` of a hypergradient method (or naive GD)."""
  opts = dict(num_steps=T, inner_lr=INNER_LR)
  if method in ("approxgrad", "neumann"):
    opts.update(solve_steps=T, solve_lr=INNER_LR)
  elif method == "cg":
    opts.update(solve_steps=T)

  def step(u, v):
    if method == "gd":
      v, _ = bilevel.inner_solve(g, u, v, (), T, INNER_LR)
      grad = jax.grad(f)(u, v)
    else:
      grad, v = getattr(bilevel, method)(f, g, u, v, **opts)
    return project(u - OUTER_LR * grad), project(v)

  return step


def run_method(name: str, method: str, T: int, num_iters: int):
  """``(u0, v0) -> errors (num_iters,)`` for one trial; vmapped over trials by the caller."""
  f, g, solution = problem(name)

  def error(u, v):
    return jnp.sqrt(jnp.sum((u - solution) ** 2) + jnp.sum((v - solution) ** 2))

  if method.startswith("penalty"):
    solver = bilevel.penalty(
      f,
      g,
      optax.sgd(OUTER_LR / 5),
      optax.sgd(OUTER_LR / 5),
      num_inner=T,
      augmented=method == "penalty_al",
      max_gamma=20.0,
    )

    def one(u0, v0):
      trace = lambda s, info: error(s.u, s.v)
      return kbeam_jax.run(solver.step, solver.init(u0, v0), num_iters, trace=trace)[1]

    return one

  step = hypergradient_step(method, f, g, T)

  def one(u0, v0):
    def body(carry, _):
      u, v = step(*carry)
      return (u, v), error(u, v)

    return jax.lax.scan(body, (u0, v0), length=num_iters)[1]

  return one


def run_suite(
  out_dir: Path, *, trials: int = TRIALS, num_iters: int = 2000, seed: int = 0, repeats: int = 3
) -> list[dict[str, Any]]:
  ku, kv = jax.random.split(jax.random.key(seed))
  u0 = jax.random.uniform(ku, (trials, DIM), minval=-BOX, maxval=BOX)
  v0 = jax.random.uniform(kv, (trials, DIM), minval=-BOX, maxval=BOX)
  records, curves = [], {}
  jobs = [(p, m, T) for p in ("sum", "difference") for m in METHODS for T in TS]
  for name, method, T in tqdm(jobs, desc="bilevel_synthetic", unit="run"):
    fn = jax.vmap(run_method(name, method, T, num_iters))
    errors, compile_s, run_s = _common.compile_and_time(fn, u0, v0, repeats=repeats)
    errors = np.asarray(errors, np.float64)  # (trials, num_iters)
    final = errors[:, -1]
    records.append(
      dict(
        problem=name,
        method=method,
        T=T,
        error_mean=float(final.mean()),
        error_std=float(final.std()),
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
    penalty_lr=OUTER_LR / 5,
    penalty_max_gamma=20.0,
    box=BOX,
    dim=DIM,
    environment=_common.environment(),
  )
  _common.write_json(out_dir / "bilevel_synthetic.json", records, meta)
  (out_dir / "bilevel_synthetic.md").write_text(markdown(records, meta))
  plot(records, curves, out_dir / "bilevel_synthetic.png")
  return records


def markdown(records, meta) -> str:
  lines = [
    f"# Synthetic bilevel problems: error |(u, v) - (u*, v*)| after {meta['iterations']}"
    f" outer steps (mean ± std over {meta['trials']} trials), and run time",
    "",
    f"Outer step {meta['outer_lr']}, inner step {meta['inner_lr']}; penalty steps "
    f"{meta['penalty_lr']}, γ capped at {meta['penalty_max_gamma']}. Seconds: all "
    "trials vmapped, after compiling (median of repeats).",
    "",
  ]
  for name in ("sum", "difference"):
    rows = []
    for method in METHODS:
      row = [method]
      for T in TS:
        r = next(r for r in records if (r["problem"], r["method"], r["T"]) == (name, method, T))
        row.append(f"{_common.mean_std(r['error_mean'], r['error_std'])} ({r['seconds']:.3f} s)")
      rows.append(row)
    lines += [
      f"## {name}",
      "",
      _common.markdown_table(["method"] + [f"T = {T}" for T in TS], rows),
      "",
    ]
  env = meta["environment"]
  lines += [f"Measured on {env['device']} ({env['backend']}), jax {env['jax']}.", ""]
  return "\n".join(lines)


def plot(records, curves, path: Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(2, len(TS), figsize=(4.5 * len(TS), 7), squeeze=False)
  for i, name in enumerate(("sum", "difference")):
    for j, T in enumerate(TS):
      ax = axes[i, j]
      for method in METHODS:
        r = next(r for r in records if (r["problem"], r["method"], r["T"]) == (name, method, T))
        curve = curves[(name, method, T)]
        t = np.arange(1, len(curve) + 1) * r["seconds_per_iteration"]
        ax.loglog(t, np.maximum(curve, 1e-12), label=method)
      ax.set(title=f"{name}, T = {T}", xlabel="wall time (s)", ylabel="error")
  axes[0, 0].legend(fontsize=7)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(args) -> None:
  """``python -m benchmarks bilevel_synthetic``."""
  run_suite(
    args.out,
    trials=args.trials or (5 if args.quick else 20),
    num_iters=300 if args.quick else 2000,
    seed=args.seed,
    repeats=1 if args.quick else 3,
  )
