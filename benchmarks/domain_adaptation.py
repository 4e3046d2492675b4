"""Domain adaptation MNIST → MNIST-M as a K-beam game (Hamm & Noh, ICML 2018, section 5.3).

``python -m benchmarks domain_adaptation [--quick] [--iters N] [--resume] [--out results]``
``python -m benchmarks domain_adaptation --devices 1,2,8``: instead of training, the time
of one K-beam step (K = 5) on each device count and its numbers against one device
(``domain_adaptation_devices.json`` / ``.md``).

Models and loss of ``kbeam_jax.tasks.domain_adaptation`` (Ganin et al.'s MNIST network);
SGD with momentum 0.9, lr 1e-2, batch 128 from each domain, for both players.

* source: MNIST training images 0-8,999 (labels used), tiled to 3 channels;
* target: MNIST-M built from training images 9,000-17,999 (labels unused, except by the
  upper bound), patches from ``kbeam_jax.data.load_photos`` (scikit-learn's sample
  photographs, or the folder ``--photos DIR``);
* test: the 10,000 MNIST test digits (source) and their MNIST-M version (target).

Methods: ``source_only`` (lower bound: label loss on the source only), ``target_only``
(upper bound: trained on labelled target data), and K-beam with K in {1, 2, 5} domain
classifiers (K = 1 is DANN's alternating game). Every ``EVAL_EVERY`` iterations one
compiled ``lax.scan`` block runs and is checkpointed (``--resume``); accuracies are
measured on the test sets at the end of each block.

Writes ``domain_adaptation.json``, ``.md`` and ``.png``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import kbeam_jax
from benchmarks import _common, _devices
from kbeam_jax import data, games, minimax, nn, parallel
from kbeam_jax.tasks import domain_adaptation as da

BATCH, LR, MOMENTUM = 128, 1e-2, 0.9
# Ganin & Lempitsky, ICML 2015, Table 1 (MNIST → MNIST-M, target test accuracy).
PUBLISHED = {"source_only": 0.5225, "kbeam_1": 0.7666, "target_only": 0.9596}


def load(
  data_dir: str | None = None, seed: int = 0, photos_dir: str | Path | None = None
) -> dict[str, np.ndarray]:
  train, test = data.load_mnist("train", data_dir), data.load_mnist("test", data_dir)
  if train.images.shape[0] < 18_000:
    raise ValueError(f"need 18,000 MNIST training images, found {train.images.shape[0]}.")
  photos = data.load_photos(photos_dir)
  return {
    "x_source": da.to_rgb(train.images[:9000]),
    "y_source": train.labels[:9000].astype(np.int32),
    "x_target": da.to_rgb(data.mnist_m(train.images[9000:18000], photos, seed=seed + 1)),
    "y_target": train.labels[9000:18000].astype(np.int32),
    "x_source_test": da.to_rgb(test.images),
    "x_target_test": da.to_rgb(data.mnist_m(test.images, photos, seed=seed + 2)),
    "y_test": test.labels.astype(np.int32),
  }


class Method(NamedTuple):
  """A method of the study: ``start(key, u) -> (solver, state)``, every solver stepping on
  ``(x_source, y_source, x_target, y_target)``, and where its state keeps the leader."""

  start: Callable[[jax.Array, Any], tuple[kbeam_jax.Solver, Any]]
  leader: Callable[[Any], Any]


def _supervised(domain: int) -> Method:
  """Plain training on one domain's labels (0: source, 1: target), a one-player game."""
  loss = da.classification_loss()
  f = lambda players, *batch: loss(players[0], *batch[2 * domain : 2 * domain + 2])
  solver = games.gradient_play([f], optax.sgd(LR, momentum=MOMENTUM))
  return Method(lambda key, u: (solver, solver.init((u,))), lambda state: state.players[0])


def _kbeam(K: int) -> Method:
  opt = optax.sgd(LR, momentum=MOMENTUM)
  kb = minimax.kbeam(da.objective(), opt, opt)
  solver = kbeam_jax.Solver(kb.init, lambda state, xs, ys, xt, yt: kb.step(state, xs, ys, xt))

  def start(key, u):
    k_beams, k_solver = jax.random.split(key)
    _, beams = nn.stack_modules(da.DomainClassifier, k_beams, K)
    return solver, kb.init(k_solver, u, beams, K)

  return Method(start, lambda state: state.u)


METHODS = {
  "source_only": _supervised(0),
  "target_only": _supervised(1),
  **{f"kbeam_{K}": _kbeam(K) for K in (1, 2, 5)},
}


def init_state(method: str, key: jax.Array) -> tuple[Any, kbeam_jax.Solver]:
  """``(state, solver)``; the same extractor and label classifier for every method."""
  if method not in METHODS:
    raise KeyError(f"unknown method {method!r}; known: {', '.join(METHODS)}.")
  k_leader, k_rest = jax.random.split(key)
  solver, state = METHODS[method].start(k_rest, da.init_leader(k_leader))
  return state, solver


def sample_batch(d: dict[str, jax.Array], key: jax.Array) -> tuple[jax.Array, ...]:
  """``BATCH`` random examples of each domain: ``(x_source, y_source, x_target,
  y_target)`` (``y_target`` only where ``d`` has it)."""
  k_s, k_t = jax.random.split(key)
  i = jax.random.randint(k_s, (BATCH,), 0, d["x_source"].shape[0])
  j = jax.random.randint(k_t, (BATCH,), 0, d["x_target"].shape[0])
  labels = (d["y_target"][j],) if "y_target" in d else ()
  return d["x_source"][i], d["y_source"][i], d["x_target"][j], *labels


def chunk_fn(solver: kbeam_jax.Solver, d: dict[str, jax.Array], num_iters: int):
  """``(state, key) -> ((state, key), None)`` after ``num_iters`` steps."""
  batch = lambda key: sample_batch(d, key)

  @jax.jit
  def chunk(carry):
    state, key = carry
    key, k = jax.random.split(key)
    body = lambda state, k: (solver.step(state, *batch(k))[0], None)
    state, _ = jax.lax.scan(body, state, jax.random.split(k, num_iters))
    return (state, key), None

  return chunk


def run_method(
  method: str,
  d: dict[str, Any],
  *,
  num_iters: int,
  eval_every: int,
  seed: int,
  test_size: int,
  checkpoint: Path | None = None,
  resume: bool = False,
) -> dict[str, Any]:
  state, solver = init_state(method, jax.random.key(seed))
  carry = (state, jax.random.key(seed + 1))
  chunk = chunk_fn(solver, {k: jnp.asarray(v) for k, v in d.items()}, eval_every)

  def chunk_with_eval(carry):
    carry, _ = chunk(carry)
    u = METHODS[method].leader(carry[0])
    return carry, {
      "target": da.accuracy(u, d["x_target_test"][:test_size], d["y_test"][:test_size]),
      "source": da.accuracy(u, d["x_source_test"][:test_size], d["y_test"][:test_size]),
    }

  carry, history, timing = _common.train_in_chunks(
    chunk_with_eval,
    carry,
    num_iters // eval_every,
    checkpoint=checkpoint,
    resume=resume,
    desc=method,
  )
  return {
    "method": method,
    "iterations": [eval_every * (i + 1) for i in range(len(history))],
    "target_accuracy": [h["target"] for h in history],
    "source_accuracy": [h["source"] for h in history],
    "seconds_per_iter": timing["chunk_s"] / eval_every,
    "train_s": timing["run_s"],
  }


def report(records: list[dict[str, Any]], out_dir: Path, meta: dict[str, Any]) -> str:
  pub = lambda m: f"{PUBLISHED[m]:.4f}" if m in PUBLISHED else "-"
  rows = [
    [
      r["method"],
      f"{r['target_accuracy'][-1]:.4f}",
      pub(r["method"]),
      f"{r['source_accuracy'][-1]:.4f}",
      f"{1e3 * r['seconds_per_iter']:.0f}",
    ]
    for r in records
  ]
  text = "\n\n".join(
    [
      f"# Domain adaptation MNIST → MNIST-M ({meta['num_iters']} iterations, batch {BATCH}, "
      f"seed {meta['seed']}, {meta['test_size']} test images per domain)",
      _common.markdown_table(
        [
          "method",
          "target test acc.",
          "published (Ganin et al. 2015)",
          "source test acc.",
          "ms / iteration",
        ],
        rows,
      ),
      "Published: source only 0.5225, DANN 0.7666 (listed beside K = 1, DANN's alternating "
      "game), trained on target 0.9596, with BSDS500 patches for MNIST-M and far longer "
      "training. Our MNIST-M takes its patches from scikit-learn's two sample photographs.",
    ]
  )
  (out_dir / "domain_adaptation.md").write_text(text + "\n")
  return text


def plot(records: list[dict[str, Any]], out_dir: Path) -> None:
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  for r in records:
    (line,) = ax.plot(r["iterations"], r["target_accuracy"], marker="o", label=r["method"])
    ax.plot(r["iterations"], r["source_accuracy"], ls=":", color=line.get_color())
  ax.set(
    xlabel="iteration",
    ylabel="test accuracy (solid: MNIST-M, dotted: MNIST)",
    title="MNIST → MNIST-M",
    ylim=(0, 1),
  )
  ax.legend(fontsize=7)
  _common.save_figure(fig, out_dir / "domain_adaptation.png")


def run_suite(
  out_dir: Path,
  *,
  num_iters: int = 10_000,
  eval_every: int = 1_000,
  seed: int = 0,
  test_size: int = 10_000,
  methods: tuple[str, ...] = tuple(METHODS),
  resume: bool = False,
  data_dir: str | None = None,
  photos_dir: str | Path | None = None,
) -> list[dict[str, Any]]:
  if num_iters % eval_every:
    raise ValueError(f"num_iters={num_iters} must be a multiple of eval_every={eval_every}.")
  d = load(data_dir, seed, photos_dir)
  records = [
    run_method(
      m,
      d,
      num_iters=num_iters,
      eval_every=eval_every,
      seed=seed,
      test_size=test_size,
      checkpoint=out_dir / "checkpoints" / f"domain_adaptation_{m}",
      resume=resume,
    )
    for m in methods
  ]
  meta = {
    "num_iters": num_iters,
    "eval_every": eval_every,
    "seed": seed,
    "test_size": test_size,
    "batch": BATCH,
    "lr": LR,
    "momentum": MOMENTUM,
    "environment": _common.environment(),
  }
  _common.write_json(out_dir / "domain_adaptation.json", records, meta)
  report(records, out_dir, meta)
  plot(records, out_dir)
  return records


def devices_suite(
  out_dir: Path, counts: tuple[int, ...], *, K: int = 5, steps: int = 5, seed: int = 0
) -> str:
  """Step time of K-beam (K domain classifiers, batch 128 per domain) per device count."""
  d = {
    k: jnp.asarray(v)
    for k, v in load(seed=seed).items()
    if k in ("x_source", "y_source", "x_target")
  }
  opt = optax.sgd(LR, momentum=MOMENTUM)
  state, _ = init_state(f"kbeam_{K}", jax.random.key(seed))

  counts = (1,) + tuple(c for c in counts if c != 1)
  rows = _devices.device_scaling(
    counts,
    K,
    lambda mesh: parallel.kbeam(da.objective(), opt, opt, mesh=mesh),
    state,
    lambda key: sample_batch(d, key),
    steps=steps,
  )
  return _devices.device_report(
    "domain_adaptation", rows, out_dir, f"Domain adaptation, K = {K}, batch {BATCH} per domain"
  )


def main(args) -> None:
  """``--quick``: 20 iterations per method, 500 test images (a smoke check, not a result)."""
  if getattr(args, "devices", None):
    devices_suite(args.out, args.devices, steps=2 if args.quick else 5, seed=args.seed)
    return
  iters = args.iters or (20 if args.quick else 10_000)
  run_suite(
    args.out,
    num_iters=iters,
    eval_every=_common.chunk_length(iters, 10 if args.quick else 500),
    seed=args.seed,
    test_size=500 if args.quick else 10_000,
    resume=args.resume,
    photos_dir=getattr(args, "photos", None),
  )
