"""The K-beam paper's GAN on a mixture of 7 Gaussians (Hamm & Noh, ICML 2018, section 5.2).

``python -m benchmarks gan_mog [--quick] [--trials N] [--iters N] [--resume] [--out results]``
writes ``gan_mog.{json,md,png}``; ``--devices 1,2,8`` instead times one K-beam step (K = 10)
per device count (``gan_mog_devices.{json,md}``).

The networks and metrics of ``kbeam_jax.tasks.gan_mog``; Adam (β1 = 0.5, generator lr
1e-3, discriminator lr 1e-4), batch 128. Methods: simultaneous and alternating GDA, and
K-beam (rule ``best``) with K in {1, 2, 5, 10}, every method of trial t from the same
generator and first discriminator. All trials of a method run vmapped, one compiled chunk
per evaluation (JSD, modes covered, high-quality share on 10,000 samples).
"""

from __future__ import annotations

import functools
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
  """How to build a method's solver ``(f, leader, follower) -> Solver`` and how many
  discriminators it keeps (GDA one, unstacked; K-beam K, stacked)."""

  build: Callable[..., kbeam_jax.Solver]
  num_discriminators: int
  stacked: bool


METHODS = {
  "gd_simultaneous": Method(minimax.simultaneous_gda, 1, False),
  "gd_alternating": Method(minimax.alternating_gda, 1, False),
  **{f"kbeam_{K}": Method(minimax.kbeam, K, True) for K in (1, 2, 5, 10)},
}
# --quick: a run in which K-beam's effect shows, measured on 6 seeds (0-5, 3 trials each):
# at 5,000 iterations the mean JSD of K = 5 is below K = 1's on every seed (0.283 / 0.170 /
# 0.099 / 0.174 / 0.278 / 0.079 against 0.456 / 0.363 / 0.408 / 0.324 / 0.335 / 0.374), and
# it covers more modes on 5 of them; at 1,000 no method has left its start.
# K = 1 stands for GDA: it is alternating GDA step for step (tests/test_kbeam.py).
QUICK_METHODS = ("kbeam_1", "kbeam_5")


def make_solver(name: str, mesh=None) -> kbeam_jax.Solver:
  """The solver of the method ``name`` (on ``mesh``: ``parallel.kbeam``)."""
  if name not in METHODS:
    raise KeyError(f"unknown method {name!r}; known: {', '.join(METHODS)}.")
  f = gan_mog.objective(*gan_mog.graphdefs())
  build = METHODS[name].build if mesh is None else lambda *a: parallel.kbeam(*a, mesh=mesh)
  return build(f, optax.adam(G_LR, b1=BETA1), optax.adam(D_LR, b1=BETA1))


def init_trial(method: str, key: jax.Array) -> tuple[Any, jax.Array]:
  """``(solver_state, data_key)`` of one trial; the same networks for every method."""
  m, solver = METHODS[method], make_solver(method)
  k_gen, k_disc, k_solver, k_data = jax.random.split(key, 4)
  u = nnx.as_pure(nnx.split(gan_mog.Generator(nnx.Rngs(k_gen)), nnx.Param)[1])
  _, beams = nn.stack_modules(gan_mog.Discriminator, k_disc, m.num_discriminators)
  if not m.stacked:
    return solver.init(k_solver, u, nn.unstack(beams, 0)), k_data
  return solver.init(k_solver, u, beams, m.num_discriminators), k_data


def batch(key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One step's data and noise."""
  k_x, k_z = jax.random.split(key)
  return data.sample_mog(k_x, BATCH), gan_mog.sample_noise(k_z, BATCH)


def evaluate(u: Any, key: jax.Array) -> dict[str, jax.Array]:
  """JSD, modes covered and high-quality share of the generator ``u``."""
  k_z, k_x = jax.random.split(key)
  fake = nnx.merge(gan_mog.graphdefs()[0], u)(gan_mog.sample_noise(k_z, EVAL_SAMPLES))
  modes, quality = gan_mog.mode_stats(fake)
  return {"jsd": gan_mog.jsd(data.sample_mog(k_x, EVAL_SAMPLES), fake), "modes": modes,
          "quality": quality}  # fmt: skip


@functools.cache
def _init_trials(method: str):
  """``keys -> (solver states, data keys)`` of every trial, compiled once per method and
  process (not run op by op); like ``chunk_fn``, so a second run of a method in the same
  process records a ``compile_s`` near 0."""
  return jax.jit(jax.vmap(lambda k: init_trial(method, k)))


_evaluate_trials = jax.jit(jax.vmap(lambda s, k: evaluate(s.u, k)))


@functools.cache
def chunk_fn(method: str, num_iters: int):
  """``states -> (states, metrics)``: ``num_iters`` steps of every trial, then an evaluation."""
  step = make_solver(method).step

  def one_trial(carry):
    state, key = carry
    key, k_steps, k_eval = jax.random.split(key, 3)
    body = lambda state, k: (step(state, *batch(k))[0], None)
    state, _ = jax.lax.scan(body, state, jax.random.split(k_steps, num_iters))
    return (state, key), evaluate(state.u, k_eval)

  return jax.jit(jax.vmap(one_trial))


def run_method(
  method: str, *, trials: int, num_iters: int, eval_every: int, seed: int,
  checkpoint: Path | None = None, resume: bool = False, stop_after: int | None = None,
) -> dict[str, Any]:  # fmt: skip
  """Trains all trials of one method; returns its curves and timing."""
  if num_iters % eval_every:
    raise ValueError(f"num_iters={num_iters} must be a multiple of eval_every={eval_every}.")
  keys = jax.random.split(jax.random.key(seed), trials)
  states = _init_trials(method)(keys)
  initial = _evaluate_trials(states[0], jax.random.split(keys[0], trials))
  states, history, timing = _common.train_in_chunks(
    chunk_fn(method, eval_every), states, num_iters // eval_every, checkpoint=checkpoint,
    resume=resume, stop_after=stop_after, desc=method,
  )  # fmt: skip
  curves = {k: [_common.to_python(initial[k])] + [h[k] for h in history] for k in initial}
  return dict(
    method=method, iterations=[i * eval_every for i in range(len(history) + 1)], **curves,
    ms_per_iter_per_trial=1e3 * timing["chunk_s"] / eval_every / trials,
    compile_s=timing["compile_s"], final_u=nn.unstack(states[0].u, 0),
  )  # fmt: skip


SHORT_RUN_NOTE = (
  "A short run: one trial's JSD still swings by about 0.1 between evaluations, so a few "
  "trials only hint at the ordering. `python -m benchmarks gan_mog --trials 3 --iters 10000` "
  "(every method, about 7 min on 2 CPU cores) separates K = 2, 5, 10 from GD and K = 1 "
  "(docs/pages/benchmarks/gan_mog.md)."
)


def report(records: list[dict[str, Any]], meta: dict[str, Any]) -> str:
  final = lambda r, k: np.array(r[k][-1])
  jsd = lambda r: _common.mean_std(final(r, "jsd").mean(), final(r, "jsd").std())
  steps = records[0]["iterations"]
  picks = sorted({len(steps) * i // 4 for i in range(1, 4)} | {len(steps) - 1})
  curve = {str(steps[i]): lambda r, i=i: f"{np.mean(r['jsd'][i]):.3f}" for i in picks}
  return "\n\n".join([
    f"# GAN on a mixture of 7 Gaussians ({meta['trials']} trials, {meta['num_iters']} "
    f"iterations, seed {meta['seed']})",
    _common.table(records, {
      "method": lambda r: r["method"],
      "final JSD (mean ± std)": jsd,
      "modes (of 7)": lambda r: f"{final(r, 'modes').mean():.1f}",
      "high-quality share": lambda r: f"{final(r, 'quality').mean():.3f}",
      "ms / iteration / trial": lambda r: f"{r['ms_per_iter_per_trial']:.2f}",
    }),
    "JSD (mean over trials) vs iteration:",
    _common.table(records, {"method": lambda r: r["method"], **curve}),
    "Published (Hamm & Noh 2018, Fig. 4): JSD curves only, no table; K-beam with K >= 2 "
    "ends lower than GD and K = 1 (which is alternating GDA's update). Wall time: all "
    f"trials vmapped on {meta['environment']['device']}, the evaluation every {meta['eval_every']} "
    "iterations included.",
    *[SHORT_RUN_NOTE] * (meta["num_iters"] < 10_000),
  ])  # fmt: skip


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
  centers = np.asarray(data.mog_centers())
  for ax, r in zip(axes[1:], records, strict=True):
    fake = nnx.merge(gan_mog.graphdefs()[0], r["final_u"])(
      gan_mog.sample_noise(jax.random.key(0), 2000)
    )
    ax.scatter(*np.asarray(fake).T, s=1, alpha=0.4)
    ax.scatter(*centers.T, marker="x", color="red", s=30)
    ax.set(xlim=(-2, 2), ylim=(-2, 2), title=f"{r['method']} (trial 0)", aspect="equal")
    ax.set(xticks=[], yticks=[])
  return fig


def run_suite(
  out_dir: Path, *, trials: int = 10, num_iters: int = 50_000, eval_every: int = 1_000,
  seed: int = 0, methods: tuple[str, ...] = tuple(METHODS), resume: bool = False,
) -> list[dict[str, Any]]:  # fmt: skip
  ckpt = lambda method: out_dir / "checkpoints" / f"gan_mog_{method}"
  options = dict(trials=trials, num_iters=num_iters, eval_every=eval_every, seed=seed)
  records = [run_method(m, **options, checkpoint=ckpt(m), resume=resume) for m in methods]
  meta = dict(options, batch=BATCH, environment=_common.environment(),
              lr={"generator": G_LR, "discriminator": D_LR, "beta1": BETA1})  # fmt: skip
  saved = [{k: v for k, v in r.items() if k != "final_u"} for r in records]
  _common.publish(out_dir, "gan_mog", saved, meta, report(records, meta), plot(records))
  return records


def main(args) -> None:
  """``python -m benchmarks gan_mog``; ``--quick``: K = 1 (alternating GDA) and 5."""
  if args.devices:  # the K-beam step (K = 10 discriminators, batch 128) per device count
    state, _ = init_trial("kbeam_10", jax.random.key(0))
    make = lambda mesh: make_solver("kbeam_10", mesh)
    what, steps = f"GAN on a MoG, K = 10, batch {BATCH}", 5 if args.quick else 20
    _devices.study("gan_mog", what, args.out, args.devices, 10, make, state, batch, steps=steps)
    return
  run_suite(
    args.out, trials=args.trials, num_iters=args.iters, seed=args.seed, resume=args.resume,
    eval_every=_common.chunk_length(args.iters, 2_000 if args.quick else 1_000),
    methods=QUICK_METHODS if args.quick else tuple(METHODS),
  )  # fmt: skip
