"""The K-beam paper's GAN on a mixture of 7 Gaussians (Hamm & Noh, ICML 2018, section 5.2).

``python -m benchmarks gan_mog [--quick] [--trials N] [--iters N] [--resume] [--out results]``
``python -m benchmarks gan_mog --devices 1,2,8``: instead of training, the time of one
K-beam step (K = 10, one trial) on each device count and its numbers against one device
(``gan_mog_devices.json`` / ``.md``).

Generator and discriminator of ``kbeam_jax.tasks.gan_mog``; the saturating minimax loss;
Adam with β1 = 0.5, generator lr 1e-3, discriminator lr 1e-4; batch 128. Methods:
simultaneous and alternating gradient descent-ascent, and K-beam (rule ``best``, one
ascent step per beam) with K in {1, 2, 5, 10}. Trial t starts every method from the same
generator and the same first discriminator (K-beam adds K - 1 more, all from the trial's
key). Every ``EVAL_EVERY`` iterations: the JSD between 10,000 generator and 10,000 data
samples (20×20 histogram on [-2, 2]², one added per bin), the modes covered and the
share of high-quality samples. All trials of a method run vmapped in one compiled
``lax.scan`` per evaluation interval; with ``--resume`` the state is checkpointed after every
interval and a stopped run continues, ending with the same numbers.

Writes ``gan_mog.json``, ``gan_mog.md`` and ``gan_mog.png``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import optax
from flax import nnx

import kbeam_jax
from benchmarks import _common, _devices
from kbeam_jax import data, minimax, nn, parallel
from kbeam_jax.tasks import gan_mog

BATCH, EVAL_SAMPLES = 128, 10_000
G_LR, D_LR, BETA1 = 1e-3, 1e-4, 0.5


class Method(NamedTuple):
  """A method of the study: how to build its solver and how many discriminators it keeps
  (GDA keeps one, unstacked; K-beam K stacked)."""

  build: Callable[..., kbeam_jax.Solver]  # (f, leader, follower) -> solver
  num_discriminators: int
  stacked: bool


METHODS = {
  "gd_simultaneous": Method(minimax.simultaneous_gda, 1, False),
  "gd_alternating": Method(minimax.alternating_gda, 1, False),
  **{f"kbeam_{K}": Method(minimax.kbeam, K, True) for K in (1, 2, 5, 10)},
}
# --quick: the shortest run in which K-beam's effect shows (measured, 3 trials, seeds 0 and
# 1: final JSD 0.132 / 0.085 for K = 5 against 0.221 / 0.383 for K = 1 at 8,000 iterations;
# at 1,000 iterations no method has left its start and K = 5 was not better than K = 1).
QUICK_METHODS = ("gd_alternating", "kbeam_1", "kbeam_5")


def method_of(name: str) -> Method:
  if name not in METHODS:
    raise KeyError(f"unknown method {name!r}; known: {', '.join(METHODS)}.")
  return METHODS[name]


def make_solver(name: str) -> kbeam_jax.Solver:
  """The solver of the method ``name`` on the GAN's objective and optimizers."""
  f = gan_mog.objective(*gan_mog.graphdefs())
  return method_of(name).build(f, optax.adam(G_LR, b1=BETA1), optax.adam(D_LR, b1=BETA1))


def init_trial(method: str, key: jax.Array) -> tuple[Any, jax.Array]:
  """``(solver_state, data_key)`` of one trial; the same networks for every method."""
  m, solver = method_of(method), make_solver(method)
  k_gen, k_disc, k_solver, k_data = jax.random.split(key, 4)
  _, u = nnx.split(gan_mog.Generator(nnx.Rngs(k_gen)), nnx.Param)
  _, beams = nn.stack_modules(gan_mog.Discriminator, k_disc, m.num_discriminators)
  u = nnx.as_pure(u)
  if not m.stacked:
    return solver.init(k_solver, u, nn.unstack(beams, 0)), k_data
  return solver.init(k_solver, u, beams, m.num_discriminators), k_data


def evaluate(u: Any, key: jax.Array) -> dict[str, jax.Array]:
  """JSD, modes covered and high-quality share of the generator ``u``."""
  g_def, _ = gan_mog.graphdefs()
  k_z, k_x = jax.random.split(key)
  fake = nnx.merge(g_def, u)(gan_mog.sample_noise(k_z, EVAL_SAMPLES))
  real = data.sample_mog(k_x, EVAL_SAMPLES)
  modes, quality = gan_mog.mode_stats(fake)
  return {"jsd": gan_mog.jsd(real, fake), "modes": modes, "quality": quality}


def chunk_fn(method: str, num_iters: int):
  """``states -> (states, metrics)``: ``num_iters`` steps of every trial, then an evaluation."""
  solver = make_solver(method)

  def one_trial(carry):
    state, key = carry

    def body(state, k):
      k_x, k_z = jax.random.split(k)
      x = data.sample_mog(k_x, BATCH)
      z = gan_mog.sample_noise(k_z, BATCH)
      return solver.step(state, x, z)[0], None

    key, k_steps, k_eval = jax.random.split(key, 3)
    state, _ = jax.lax.scan(body, state, jax.random.split(k_steps, num_iters))
    return (state, key), evaluate(state.u, k_eval)

  return jax.jit(jax.vmap(one_trial))


def run_method(
  method: str,
  *,
  trials: int,
  num_iters: int,
  eval_every: int,
  seed: int,
  checkpoint: Path | None = None,
  resume: bool = False,
  stop_after: int | None = None,
) -> dict[str, Any]:
  """Trains all trials of one method; returns its curves and timing."""
  if num_iters % eval_every:
    raise ValueError(f"num_iters={num_iters} must be a multiple of eval_every={eval_every}.")
  keys = jax.random.split(jax.random.key(seed), trials)
  states = jax.vmap(lambda k: init_trial(method, k))(keys)
  initial = jax.vmap(lambda s, k: evaluate(s.u, k))(states[0], jax.random.split(keys[0], trials))
  states, history, timing = _common.train_in_chunks(
    chunk_fn(method, eval_every),
    states,
    num_iters // eval_every,
    checkpoint=checkpoint,
    resume=resume,
    stop_after=stop_after,
    desc=method,
  )
  curves = {
    name: np.array([_common.to_python(initial[name])] + [h[name] for h in history])
    for name in ("jsd", "modes", "quality")
  }
  ms_per_iter = 1e3 * timing["chunk_s"] / eval_every / trials
  return {
    "method": method,
    "iterations": [i * eval_every for i in range(len(curves["jsd"]))],
    **{name: c.tolist() for name, c in curves.items()},
    "ms_per_iter_per_trial": ms_per_iter,
    "compile_s": timing["compile_s"],
    "final_u": nn.unstack(states[0].u, 0),
  }


def report(records: list[dict[str, Any]], meta: dict[str, Any]) -> str:
  rows = []
  for r in records:
    jsd, modes, quality = (np.array(r[k])[-1] for k in ("jsd", "modes", "quality"))
    rows.append(
      [
        r["method"],
        _common.mean_std(jsd.mean(), jsd.std()),
        f"{modes.mean():.1f}",
        f"{quality.mean():.3f}",
        f"{r['ms_per_iter_per_trial']:.2f}",
      ]
    )
  steps = records[0]["iterations"]
  picks = sorted({steps[len(steps) * i // 4] for i in range(1, 4)} | {steps[-1]})
  curve_rows = [
    [r["method"]] + [f"{np.mean(r['jsd'][steps.index(s)]):.3f}" for s in picks] for r in records
  ]
  text = "\n\n".join(
    [
      f"# GAN on a mixture of 7 Gaussians ({meta['trials']} trials, {meta['num_iters']} "
      f"iterations, seed {meta['seed']})",
      _common.markdown_table(
        [
          "method",
          "final JSD (mean ± std)",
          "modes (of 7)",
          "high-quality share",
          "ms / iteration / trial",
        ],
        rows,
      ),
      "JSD (mean over trials) vs iteration:",
      _common.markdown_table(["method"] + [str(s) for s in picks], curve_rows),
      "Published (Hamm & Noh 2018, Fig. 4): JSD curves only, no table; K-beam with K >= 2 "
      "ends lower than GD and K = 1. Wall time: all trials vmapped on "
      f"{meta['environment']['device']}, the evaluation every {meta['eval_every']} "
      "iterations included.",
    ]
  )
  return text


def plot(records: list[dict[str, Any]]):
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 1 + len(records), figsize=(5 + 2.6 * len(records), 3.6))
  for r in records:
    jsd = np.array(r["jsd"])
    m, s = jsd.mean(axis=1), jsd.std(axis=1)
    (line,) = axes[0].plot(r["iterations"], m, label=r["method"])
    axes[0].fill_between(r["iterations"], m - s, m + s, color=line.get_color(), alpha=0.15)
  axes[0].set(xlabel="iteration", ylabel="JSD (mean ± std)", title="JSD vs iteration")
  axes[0].legend(fontsize=7)
  g_def, _ = gan_mog.graphdefs()
  centers = np.asarray(data.mog_centers())
  for ax, r in zip(axes[1:], records, strict=True):
    fake = nnx.merge(g_def, r["final_u"])(gan_mog.sample_noise(jax.random.key(0), 2000))
    ax.scatter(*np.asarray(fake).T, s=1, alpha=0.4)
    ax.scatter(*centers.T, marker="x", color="red", s=30)
    ax.set(xlim=(-2, 2), ylim=(-2, 2), title=f"{r['method']} (trial 0)", aspect="equal")
    ax.set_xticks([])
    ax.set_yticks([])
  return fig


def run_suite(
  out_dir: Path,
  *,
  trials: int = 10,
  num_iters: int = 50_000,
  eval_every: int = 1_000,
  seed: int = 0,
  methods: tuple[str, ...] = tuple(METHODS),
  resume: bool = False,
) -> list[dict[str, Any]]:
  records = []
  for method in methods:
    records.append(
      run_method(
        method,
        trials=trials,
        num_iters=num_iters,
        eval_every=eval_every,
        seed=seed,
        checkpoint=out_dir / "checkpoints" / f"gan_mog_{method}",
        resume=resume,
      )
    )
  meta = {
    "trials": trials,
    "num_iters": num_iters,
    "eval_every": eval_every,
    "seed": seed,
    "batch": BATCH,
    "lr": {"generator": G_LR, "discriminator": D_LR, "beta1": BETA1},
    "environment": _common.environment(),
  }
  saved = [{k: v for k, v in r.items() if k != "final_u"} for r in records]
  _common.publish(out_dir, "gan_mog", saved, meta, report(records, meta), plot(records))
  return records


def devices_suite(out_dir: Path, counts: tuple[int, ...], *, K: int = 10, steps: int = 20):
  """Step time of K-beam (K discriminators, batch 128) on each device count."""
  f = gan_mog.objective(*gan_mog.graphdefs())
  leader, follower = optax.adam(G_LR, b1=BETA1), optax.adam(D_LR, b1=BETA1)
  state, _ = init_trial(f"kbeam_{K}", jax.random.key(0))

  def batch(key):
    k_x, k_z = jax.random.split(key)
    return data.sample_mog(k_x, BATCH), gan_mog.sample_noise(k_z, BATCH)

  counts = (1,) + tuple(c for c in counts if c != 1)
  rows = _devices.device_scaling(
    counts,
    K,
    lambda mesh: parallel.kbeam(f, leader, follower, mesh=mesh),
    state,
    batch,
    steps=steps,
  )
  return _devices.device_report("gan_mog", rows, out_dir, f"GAN on a MoG, K = {K}, batch {BATCH}")


def main(args) -> None:
  """``python -m benchmarks gan_mog``; ``--quick``: Alt-GDA, K = 1 and K = 5, 3 trials,
  8,000 iterations."""
  if getattr(args, "devices", None):
    devices_suite(args.out, args.devices, steps=5 if args.quick else 20)
    return
  run_suite(
    args.out,
    trials=args.trials,
    num_iters=args.iters,
    eval_every=_common.chunk_length(args.iters, 2_000 if args.quick else 1_000),
    seed=args.seed,
    methods=QUICK_METHODS if args.quick else tuple(METHODS),
    resume=args.resume,
  )
