"""Learning dynamics on the games of the literature, every solver from many starts at once.

``python -m benchmarks games [--quick] [--trials N] [--out results]``

Each (game, solver) runs from ``--trials`` standard-normal starts vmapped in one compiled
``kbeam_jax.run``: the share of runs at the game's equilibrium, the final metric (median),
the steps the converged runs needed (median) and the time per step of the batch, beside
the literature's outcome. Writes ``games.json``, ``games.md`` and ``games.png``.
"""

from __future__ import annotations

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
  """A game: players' shapes drawn standard normal; a run ends at the equilibrium when its
  metric is at most ``tol``; ``steps``: of a full run."""

  solvers: dict[str, kbeam_jax.Solver]
  shapes: list[tuple[int, ...]]
  metric: Callable[[tuple], jax.Array]
  tol: float
  equilibrium: str
  metric_name: str
  published: dict[str, str]  # solver -> the literature's outcome
  source: str
  steps: int = 500

  def start(self, key: jax.Array, n: int) -> tuple:
    keys = jax.random.split(key, len(self.shapes))
    return tuple(jax.random.normal(k, (n, *d)) for k, d in zip(keys, self.shapes, strict=True))


def naive_to_sos(losses, lr, alpha, gamma=1.0):
  """Every Nash-learning solver at step ``lr`` (lookahead ``alpha``, consensus ``gamma``)."""
  return {
    "naive": games.gradient_play(losses, optax.sgd(lr)),
    "consensus": games.consensus(losses, lr, gamma=gamma),
    "sga": games.sga(losses, lr),
    "lookahead": games.lookahead(losses, lr, alpha),
    "lola": games.lola(losses, lr, alpha),
    "sos": games.sos(losses, lr, alpha),
    "cgd": games.cgd(losses, lr),
  }


def norm(p):
  return jnp.sqrt(sum(jnp.sum(x**2) for x in p))


def matching_pennies():
  half = lambda p: norm([jax.nn.sigmoid(x) - 0.5 for x in p])
  published = dict(naive="cycles", sga="converges", consensus="converges", sos="converges")
  return Case(naive_to_sos(tasks.matching_pennies(), 1.0, 1.0), [(), ()], half, 0.01,
              "mixed Nash p = (½, ½)", "|p - ½|", published, f"{LETCHER}; {BALDUZZI}")  # fmt: skip


def bilinear_game():
  published = dict(naive="diverges", sga="converges", consensus="converges")
  return Case(naive_to_sos(tasks.bilinear(), 0.1, 0.1), [(2,), (2,)], norm, 1e-3, "Nash point 0",
              "|θ|", published, f"{BALDUZZI}; Mescheder et al., NeurIPS 2017")  # fmt: skip


def tandem():
  gap = lambda p: jnp.abs(p[0] + p[1] - 1.0)
  published = {"lola": "leaves x + y = 1", "sos": "converges", "lookahead": "converges"}
  # consensus at γ = 0.5: at γ = 1 its step lr(1 + 4γ)·4 = 2 sits on tandem's stability edge
  solvers = naive_to_sos(tasks.tandem(), 0.1, 0.1, gamma=0.5)
  return Case(solvers, [(), ()], gap, 1e-3, "fixed points x + y = 1", "|x + y - 1|",
              published, LETCHER)  # fmt: skip


def ipd():
  losses = tasks.ipd(0.96)
  per_step = lambda p: 0.04 * 0.5 * (losses[0](p) + losses[1](p))  # (1 - γ)·mean loss
  published = {"naive": "defect, ≈ 2", "lola": "cooperate, ≈ 1", "sos": "cooperate, ≈ 1"}
  return Case(naive_to_sos(losses, 1.0, 1.0), [(5,), (5,)], per_step, 1.2,
              "cooperation (loss per step < 1.2)", "loss per step", published,
              f"Foerster et al., AAMAS 2018 (exact-value IPD); {LETCHER}", 200)  # fmt: skip


def leader_follower():
  losses, points = tasks.leader_follower()
  inner = dict(inner_steps=20, inner_lr=0.25)
  solvers = {"naive": games.gradient_play(losses, optax.sgd(0.2))}
  for name, method in (("CG", bilevel.CG(5)), ("RMD", bilevel.RMD())):
    solvers[f"stackelberg ({name})"] = games.stackelberg(*losses, optax.sgd(0.2), method, **inner)
  gap = lambda p: jnp.abs(p[0] - points["stackelberg_u"])
  published = {k: f"u = 1/2, leader loss {points['stackelberg_loss']:.4f}" for k in solvers}
  published["naive"] = f"Nash u = 2/3, leader loss {points['nash_loss']:.4f}"
  return Case(solvers, [(), ()], gap, 1e-3, "Stackelberg point u = 1/2", "|u - ½|", published,
              "closed form; Fiez et al., ICML 2020", 300)  # fmt: skip


def three_level():
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
  sq = lambda x: 0.5 * jnp.sum(x**2)

  def make(method):
    argmin = lambda g, x: bilevel.argmin(g, x, jnp.zeros(3), method=method, inner_steps=20,
                                         inner_lr=0.8)  # fmt: skip
    z_star = lambda y: argmin(lambda y, z: sq(z - B @ y) + 0.5 * z @ D @ z, y)
    y_star = lambda x: argmin(lambda x, y: sq(y - A @ x) + sq(z_star(y) - d), x)
    F = lambda p: sq(p[0] - a) + sq(y_star(p[0]) - c)
    return games.gradient_play([F], optax.sgd(0.5))  # one player: the top level

  solvers = {"nested CG": make(bilevel.CG(3)), "nested RMD": make(bilevel.RMD())}
  gap = lambda p: jnp.linalg.norm(p[0] - x_star)
  published = {k: "exact optimum (closed form)" for k in solvers}
  return Case(solvers, [(3,)], gap, 1e-6, "the optimum x*", "|x - x*|", published,
              "closed form", 100)  # fmt: skip


CASES = dict(matching_pennies=matching_pennies, bilinear=bilinear_game, tandem=tandem, ipd=ipd,
             leader_follower=leader_follower, three_level=three_level)  # fmt: skip


def run_case(case: Case, solver: kbeam_jax.Solver, trials: int, seed: int, repeats: int):
  """The metric's trajectory ``(steps, trials)`` and the seconds per step of the batch."""

  def one(players):
    trace = lambda s, info: case.metric(s.players)
    return kbeam_jax.run(solver.step, solver.init(players), case.steps, trace=trace)[1]

  players = case.start(jax.random.key(seed), trials)
  out, _, seconds = _common.compile_and_time(jax.vmap(one, out_axes=1), players, repeats=repeats)
  return np.asarray(out), seconds / case.steps


def summarize(trajectory: np.ndarray, tol: float) -> dict[str, Any]:
  at, below = trajectory[-1] <= tol, trajectory <= tol
  first = np.where(below.any(0), below.argmax(0) + 1, -1)  # the first step at tol
  return dict(
    share=float(at.mean()),
    final_median=float(np.median(trajectory[-1])),
    steps_needed=float(np.median(first[at])) if at.any() else float("nan"),
  )


def run_suite(out_dir: Path, *, quick: bool = False, trials: int = 100, seed: int = 0):
  scale = 0.4 if quick else 1.0
  cases = {g: make() for g, make in CASES.items()}
  cases = {g: c._replace(steps=max(20, int(c.steps * scale))) for g, c in cases.items()}
  jobs = [(g, s) for g, case in cases.items() for s in case.solvers]
  records, curves = [], {}
  for game, name in tqdm(jobs, desc="games", unit="run"):
    c = cases[game]
    curves[game, name], seconds = run_case(c, c.solvers[name], trials, seed, 1 if quick else 5)
    records.append(
      dict(game=game, solver=name, trials=trials, steps=c.steps, equilibrium=c.equilibrium,
           metric=c.metric_name, us_per_step=1e6 * seconds, published=c.published.get(name, ""),
           source=c.source, **summarize(curves[game, name], c.tol))
    )  # fmt: skip
  meta = dict(quick=quick, trials=trials, seed=seed, environment=_common.environment())
  _common.publish(out_dir, "games", records, meta, markdown(records, meta), plot(curves, cases))
  return records


def markdown(records, meta) -> str:
  parts = [
    f"# Learning dynamics on differentiable games ({meta['trials']} random starts each)",
    "Share: runs whose metric ends at or below the game's tolerance (at the named "
    "equilibrium); steps: median first step there among those runs; µs / step: one step of "
    "all the runs together, vmapped, compiled, median of repeats.",
  ]
  for game in dict.fromkeys(r["game"] for r in records):
    rs = [r for r in records if r["game"] == game]
    header = ["solver", "share at equilibrium", f"final {rs[0]['metric']} (median)", "steps",
              "µs / step", "published"]  # fmt: skip
    rows = [
      [r["solver"], f"{r['share']:.2f}", f"{r['final_median']:.3g}",
       "—" if np.isnan(r["steps_needed"]) else f"{r['steps_needed']:.0f}",
       f"{r['us_per_step']:.1f}", r["published"]]
      for r in rs
    ]  # fmt: skip
    r = rs[0]
    parts += [f"## {game}: {r['equilibrium']} ({r['steps']} steps; published: {r['source']})"]
    parts += [_common.markdown_table(header, rows)]
  env = meta["environment"]
  parts += [f"Measured on {env['device']} ({env['backend']}), jax {env['jax']}."]
  return "\n\n".join(parts) + "\n"


def plot(curves, cases):
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
  for ax, (game, case) in zip(axes.flat, cases.items(), strict=True):
    for name in case.solvers:
      tr = curves[game, name]
      steps = np.arange(1, tr.shape[0] + 1)
      floor = 1e-9 if game != "ipd" else -np.inf  # exact zeros drawn at the floor
      lo, mid, hi = np.maximum(np.percentile(tr, [25, 50, 75], axis=1), floor)
      ax.plot(steps, mid, label=name)
      ax.fill_between(steps, lo, hi, alpha=0.15)
    ax.axhline(case.tol, color="k", ls=":", lw=1)
    ax.set(title=game, xlabel="step", ylabel=case.metric_name)
    if game != "ipd":
      ax.set_yscale("log")
    ax.legend(fontsize=7)
  fig.suptitle("median and 25–75% of the runs (exact zeros at 1e-9); dotted: the tolerance")
  fig.tight_layout()
  return fig


def main(args) -> None:
  """``python -m benchmarks games``."""
  run_suite(args.out, quick=args.quick, trials=args.trials, seed=args.seed)
