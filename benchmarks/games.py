"""Learning dynamics on the games of the literature, every solver from many starts at once.

``python -m benchmarks games [--quick] [--trials N] [--out results]``

Each (game, solver) runs from ``--trials`` random initializations (100 by default) vmapped
together in one compiled ``kbeam_jax.run``: the share of runs at the game's named
equilibrium, the final value of its metric (median), the steps the converged runs needed
(median), and the time per step of the whole batch (compiled first, median of repeats).
The literature's outcome stands beside ours. Games: matching pennies, a bilinear game,
the tandem game, the iterated prisoner's dilemma (exact discounted value), a general-sum
leader-follower game (Stackelberg vs Nash), and a three-level linear-quadratic program.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import kbeam_jax
from benchmarks import _common
from kbeam_jax import bilevel, games
from kbeam_jax.tasks import games as tasks

LETCHER = "Letcher et al., ICLR 2019 (SOS), Sec. 5"
BALDUZZI = "Balduzzi et al., ICML 2018 (SGA), Sec. 5"


class Case(NamedTuple):
  """A game: its solvers, starting points, metric and what counts as the equilibrium."""

  losses: list[Any]
  solvers: dict[str, kbeam_jax.Solver]
  start: Callable[[jax.Array, int], tuple]  # (key, n) -> batched players
  metric: Callable[[tuple], jax.Array]  # players -> scalar (lower is closer)
  tol: float  # metric <= tol: at the equilibrium
  steps: int
  equilibrium: str
  metric_name: str
  published: dict[str, str]  # solver -> the literature's outcome
  source: str


def _normal(dims):
  return lambda key, n: tuple(
    jax.random.normal(k, (n, *d))
    for k, d in zip(jax.random.split(key, len(dims)), dims, strict=True)
  )


def naive_to_sos(losses, lr, alpha, gamma=1.0):
  """Every Nash-learning solver at one step size (``alpha``: the lookahead step, ``gamma``:
  consensus's weight)."""
  return {
    "naive": games.gradient_play(losses, optax.sgd(lr)),
    "consensus": games.consensus(losses, lr, gamma=gamma),
    "sga": games.sga(losses, lr),
    "lookahead": games.lookahead(losses, lr, alpha),
    "lola": games.lola(losses, lr, alpha),
    "sos": games.sos(losses, lr, alpha),
    "cgd": games.cgd(losses, lr),
  }


def matching_pennies(steps):
  losses = tasks.matching_pennies()
  half = lambda p: jnp.sqrt(sum((jax.nn.sigmoid(x) - 0.5) ** 2 for x in p))
  published = {"naive": "cycles", "sga": "converges", "consensus": "converges"}
  published.update(sos="converges")
  return Case(
    losses,
    naive_to_sos(losses, 1.0, 1.0),
    _normal([(), ()]),
    half,
    0.01,
    steps,
    "mixed Nash p = (½, ½)",
    "|p - ½|",
    published,
    f"{LETCHER}; {BALDUZZI}",
  )


def bilinear_game(steps):
  losses = tasks.bilinear()
  norm = lambda p: jnp.sqrt(sum(jnp.sum(x**2) for x in p))
  published = {"naive": "diverges", "sga": "converges", "consensus": "converges"}
  return Case(
    losses,
    naive_to_sos(losses, 0.1, 0.1),
    _normal([(2,), (2,)]),
    norm,
    1e-3,
    steps,
    "Nash point 0",
    "|θ|",
    published,
    f"{BALDUZZI}; Mescheder et al., NeurIPS 2017",
  )


def tandem(steps):
  losses = tasks.tandem()
  gap = lambda p: jnp.abs(p[0] + p[1] - 1.0)
  published = {"lola": "leaves x + y = 1", "sos": "converges", "lookahead": "converges"}
  # consensus at γ = 0.5: at γ = 1 its step lr(1 + 4γ)·4 = 2 sits on tandem's stability edge
  return Case(
    losses,
    naive_to_sos(losses, 0.1, 0.1, gamma=0.5),
    _normal([(), ()]),
    gap,
    1e-3,
    steps,
    "fixed points x + y = 1",
    "|x + y - 1|",
    published,
    LETCHER,
  )


def ipd(steps):
  losses = tasks.ipd(0.96)
  per_step = lambda p: 0.04 * 0.5 * (losses[0](p) + losses[1](p))  # (1 - γ)·mean loss
  published = {"naive": "defect, ≈ 2", "lola": "cooperate, ≈ 1", "sos": "cooperate, ≈ 1"}
  return Case(
    losses,
    naive_to_sos(losses, 1.0, 1.0),
    _normal([(5,), (5,)]),
    per_step,
    1.2,
    steps,
    "cooperation (loss per step < 1.2)",
    "loss per step",
    published,
    f"Foerster et al., AAMAS 2018 (exact-value IPD); {LETCHER}",
  )


def leader_follower(steps):
  losses, points = tasks.leader_follower()
  inner = dict(inner_steps=20, inner_lr=0.25)
  solvers = {
    "naive": games.gradient_play(losses, optax.sgd(0.2)),
    "stackelberg (CG)": games.stackelberg(*losses, optax.sgd(0.2), bilevel.CG(5), **inner),
    "stackelberg (RMD)": games.stackelberg(*losses, optax.sgd(0.2), bilevel.RMD(), **inner),
  }
  gap = lambda p: jnp.abs(p[0] - points["stackelberg_u"])
  published = {
    "naive": f"Nash u = 2/3, leader loss {points['nash_loss']:.4f}",
    "stackelberg (CG)": f"u = 1/2, leader loss {points['stackelberg_loss']:.4f}",
    "stackelberg (RMD)": f"u = 1/2, leader loss {points['stackelberg_loss']:.4f}",
  }
  return Case(
    losses,
    solvers,
    _normal([(), ()]),
    gap,
    1e-3,
    steps,
    "Stackelberg point u = 1/2",
    "|u - ½|",
    published,
    "closed form; Fiez et al., ICML 2020",
  )


def three_level(steps):
  """``min_x F(x) = ½|x - a|² + ½|y*(x) - c|²``, ``y*(x) = argmin_y ½|y - Ax|² +
  ½|z*(y) - d|²``, ``z*(y) = argmin_z ½|z - By|² + ½zᵀDz``: nested argmin, closed form."""
  rng = np.random.default_rng(0)
  A, B = 0.25 * rng.normal(size=(3, 3)), 0.25 * rng.normal(size=(3, 3))
  D = np.diag(rng.uniform(0.1, 0.3, 3))
  a, c, d = (rng.normal(size=3) for _ in range(3))
  P3 = np.linalg.solve(np.eye(3) + D, B)
  Q = np.eye(3) + P3.T @ P3
  P2, p2 = np.linalg.solve(Q, A), np.linalg.solve(Q, P3.T @ d)
  x_star = np.linalg.solve(np.eye(3) + P2.T @ P2, a + P2.T @ (c - p2))

  def make(method):
    solve = dict(method=method, inner_steps=20, inner_lr=0.8)

    def y_star(x):
      z_star = lambda y: bilevel.argmin(
        lambda y, z: 0.5 * jnp.sum((z - B @ y) ** 2) + 0.5 * z @ D @ z,
        y,
        jnp.zeros(3),
        **solve,
      )
      g = lambda x, y: 0.5 * jnp.sum((y - A @ x) ** 2) + 0.5 * jnp.sum((z_star(y) - d) ** 2)
      return bilevel.argmin(g, x, jnp.zeros(3), **solve)

    F = lambda p: 0.5 * jnp.sum((p[0] - a) ** 2) + 0.5 * jnp.sum((y_star(p[0]) - c) ** 2)
    return games.gradient_play([F], optax.sgd(0.5))  # one player: the top level

  solvers = {"nested CG": make(bilevel.CG(3)), "nested RMD": make(bilevel.RMD())}
  gap = lambda p: jnp.linalg.norm(p[0] - x_star)
  published = {k: "exact optimum (closed form)" for k in solvers}
  return Case(
    [],
    solvers,
    _normal([(3,)]),
    gap,
    1e-6,
    steps,
    "the optimum x*",
    "|x - x*|",
    published,
    "closed form",
  )


CASES = {
  "matching_pennies": (matching_pennies, 500),
  "bilinear": (bilinear_game, 500),
  "tandem": (tandem, 500),
  "ipd": (ipd, 200),
  "leader_follower": (leader_follower, 300),
  "three_level": (three_level, 100),
}


def run_case(case: Case, solver: kbeam_jax.Solver, trials: int, seed: int, repeats: int):
  """The metric's trajectory ``(steps, trials)`` and the seconds per step of the batch."""

  def one(players):
    trace = lambda s, info: case.metric(s.players)
    return kbeam_jax.run(solver.step, solver.init(players), case.steps, trace=trace)[1]

  players = case.start(jax.random.key(seed), trials)
  compiled = jax.jit(jax.vmap(one, out_axes=1)).lower(players).compile()
  times, out = [], None
  for _ in range(repeats):
    start = time.perf_counter()
    out = jax.block_until_ready(compiled(players))
    times.append(time.perf_counter() - start)
  return np.asarray(out), statistics.median(times) / case.steps


def summarize(trajectory: np.ndarray, tol: float) -> dict[str, Any]:
  final = trajectory[-1]
  at = final <= tol
  below = trajectory <= tol
  first = np.where(below.any(0), below.argmax(0) + 1, -1)  # the first step at tol
  return dict(
    share=float(at.mean()),
    final_median=float(np.median(final)),
    steps_needed=float(np.median(first[at])) if at.any() else float("nan"),
  )


def run_suite(out_dir: Path, *, quick: bool = False, trials: int = 100, seed: int = 0):
  scale = 0.4 if quick else 1.0
  records, curves = [], {}
  jobs = [(g, s) for g, (make, n) in CASES.items() for s in make(1).solvers]
  cases = {g: make(max(20, int(n * scale))) for g, (make, n) in CASES.items()}
  for game, name in tqdm(jobs, desc="games", unit="run"):
    case = cases[game]
    trajectory, seconds = run_case(case, case.solvers[name], trials, seed, 1 if quick else 5)
    curves[(game, name)] = trajectory
    records.append(
      dict(
        game=game,
        solver=name,
        trials=trials,
        steps=case.steps,
        equilibrium=case.equilibrium,
        metric=case.metric_name,
        us_per_step=1e6 * seconds,
        published=case.published.get(name, ""),
        source=case.source,
        **summarize(trajectory, case.tol),
      )
    )
  meta = dict(quick=quick, trials=trials, seed=seed, environment=_common.environment())
  _common.write_json(out_dir / "games.json", records, meta)
  (out_dir / "games.md").write_text(markdown(records, meta))
  plot(curves, cases, out_dir / "games.png")
  print(markdown(records, meta))
  return records


def markdown(records, meta) -> str:
  lines = [
    f"# Learning dynamics on differentiable games ({meta['trials']} random starts each)",
    "",
    "Share: runs whose metric ends at or below the game's tolerance (at the named "
    "equilibrium); steps: median first step there among those runs; µs / step: one step of "
    "all the runs together, vmapped, compiled, median of repeats.",
    "",
  ]
  for game in dict.fromkeys(r["game"] for r in records):
    rs = [r for r in records if r["game"] == game]
    lines += [
      f"## {game}: {rs[0]['equilibrium']} ({rs[0]['steps']} steps; published: {rs[0]['source']})",
      "",
      _common.markdown_table(
        [
          "solver",
          "share at equilibrium",
          f"final {rs[0]['metric']} (median)",
          "steps",
          "µs / step",
          "published",
        ],
        [
          [
            r["solver"],
            f"{r['share']:.2f}",
            f"{r['final_median']:.3g}",
            "—" if np.isnan(r["steps_needed"]) else f"{r['steps_needed']:.0f}",
            f"{r['us_per_step']:.1f}",
            r["published"],
          ]
          for r in rs
        ],
      ),
      "",
    ]
  env = meta["environment"]
  lines += [f"Measured on {env['device']} ({env['backend']}), jax {env['jax']}.", ""]
  return "\n".join(lines)


def plot(curves, cases, path: Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
  for ax, game in zip(axes.flat, cases, strict=True):
    for (g, name), tr in curves.items():
      if g != game:
        continue
      steps = np.arange(1, tr.shape[0] + 1)
      floor = 1e-9 if game != "ipd" else -np.inf  # exact zeros drawn at the floor
      lo, mid, hi = np.maximum(np.percentile(tr, [25, 50, 75], axis=1), floor)
      ax.plot(steps, mid, label=name)
      ax.fill_between(steps, lo, hi, alpha=0.15)
    ax.axhline(cases[game].tol, color="k", ls=":", lw=1)
    ax.set(title=game, xlabel="step", ylabel=cases[game].metric_name)
    if game != "ipd":
      ax.set_yscale("log")
    ax.legend(fontsize=7)
  fig.suptitle("median and 25–75% of the runs (exact zeros at 1e-9); dotted: the tolerance")
  fig.tight_layout()
  _common.save_figure(fig, path)


def main(args) -> None:
  """``python -m benchmarks games``."""
  trials = args.trials or 100
  run_suite(args.out, quick=args.quick, trials=trials, seed=args.seed)
