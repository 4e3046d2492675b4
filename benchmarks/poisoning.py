"""Training-data poisoning of a linear softmax classifier (Mehra & Hamm, ACML 2021) on MNIST:
poison points optimised by each bilevel method, untargeted and targeted (``SOURCE`` relabelled
``TARGET``), judged by the classifier retrained on ``train ∪ poisons``.

``python -m benchmarks poisoning [--quick] [--trials N] [--seed 0] [--resume] [--out results]``

Writes ``poisoning.json``, ``.md`` and ``.png``; docs/pages/benchmarks/poisoning.md explains
the settings and the results.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import _bilevel, _common
from kbeam_jax.tasks import poisoning

METHODS = ("penalty", "approxgrad", "rmd", "naive", "cg")  # cg: ApproxGrad solved by CG
BASELINES = ("clean", "label_flip")
KINDS = {"untargeted": "test_accuracy", "targeted": "target_rate"}  # kind: its measure
SOURCE, TARGET = 3, 8
CONFIG: dict[str, Any] = dict(
  num_train=1000, num_val=1000, num_test=8000, poison_counts=(10, 20, 30, 60), outer_steps=200,
  chunk=20, inner_steps=5, inner_lr=0.3, warmup=300, upper_lr=0.02, solve_steps=20,
  solve_lr=0.05,
  penalty=dict(gamma=100.0, epsilon=0.1, max_gamma=100.0, lower_weight=1.0, warmup_steps=300),
  penalty_lower="adam", penalty_lr=1e-3, fit=dict(num_steps=300, lr=0.01),
)  # fmt: skip
# Step sizes and the penalty method's settings: docs/pages/benchmarks/poisoning.md.
QUICK = dict(
  num_train=200, num_val=200, num_test=500, poison_counts=(4, 12), outer_steps=10, chunk=5,
  warmup=30, fit=dict(num_steps=30, lr=0.01),
)  # fmt: skip
NOTE = "The paper's figures for this setting are not reliably known to us and are not quoted."


def run_trial(cfg: dict[str, Any], seed: int, out_dir: Path, resume: bool):
  """Every attack on one draw of the data; returns (records, {(kind, n, method): curve})."""
  d = _common.mnist_data(poisoning.make_data, seed, cfg, ("num_train", "num_val", "num_test"))
  model, test = poisoning.softmax_regression(), (jnp.asarray(d.x_test), jnp.asarray(d.y_test))

  def evaluate(x_p=None, y_p=None):
    params = poisoning.train_poisoned(model, d, x_p, y_p, **cfg["fit"])
    return dict(
      test_accuracy=poisoning.accuracy(model, params, *test),
      target_rate=poisoning.target_misclassification(model, params, d, SOURCE, TARGET),
    )

  clean = evaluate()
  records, curves = [], {}
  for kind in KINDS:
    st = dict(source=SOURCE, target=TARGET) if kind == "targeted" else {}
    f, g = poisoning.objectives(model, targeted=kind == "targeted")
    for n in cfg["poison_counts"]:
      x_p, y_p = poisoning.init_poisons(d, n, seed=seed + 1000 * n, **st)
      args, u0 = poisoning.bilevel_args(d, y_p, **st), jnp.asarray(x_p)
      v0 = _bilevel.warm_start(g, u0, model.init(None), args, cfg)
      base = dict(kind=kind, num_poison=n, fraction=n / cfg["num_train"], seed=seed)
      flip = evaluate(x_p, y_p)
      records += [dict(base, method="clean", **clean), dict(base, method="label_flip", **flip)]
      for method in METHODS:
        solver = _bilevel.bilevel_solver(
          method, f, g, cfg, upper=optax.adam(cfg["upper_lr"]), project_u=poisoning.project_images
        )
        state, curve, timing = _bilevel.train(
          solver, u0, v0, args, cfg, key=jax.random.key(0), out_dir=out_dir, resume=resume,
          label=("poisoning", kind, n, seed, method),
        )  # fmt: skip
        x_opt = np.asarray(state.u)
        curves[kind, n, method] = curve
        records.append(
          dict(
            base, method=method, **evaluate(np.clip(x_opt, 0.0, 1.0), y_p),
            upper_objective=curve[-1], **timing, poison_change=float(np.mean(np.abs(x_opt - x_p))),
          )
        )  # fmt: skip
  return records, curves


def markdown(records: list[dict[str, Any]], meta: dict[str, Any]) -> str:
  cfg = meta["config"]
  of = lambda kind, m, key, n=None: [
    r[key] for r in records
    if (r["kind"], r["method"]) == (kind, m) and n in (None, r["num_poison"])
  ]  # fmt: skip
  titles = {
    "untargeted": "Untargeted: test accuracy (lower is a stronger attack)",
    "targeted": f"Targeted {meta['source']} → {meta['target']}: target misclassification rate "
    "(higher is a stronger attack)",
  }
  lines = [
    "# Data poisoning of a linear softmax classifier (MNIST)\n",
    f"{cfg['num_train']} train / {cfg['num_val']} validation / {cfg['num_test']} test, "
    f"l2 = {poisoning.L2}, {cfg['outer_steps']} outer steps, T = {cfg['inner_steps']}; seeds "
    f"{meta['seeds']}. Columns: number of poison points (fraction of the training set).\n",
  ]
  counts = cfg["poison_counts"]
  header = ["method"] + [f"{n} ({n / cfg['num_train']:.0%})" for n in counts]
  for kind, key in KINDS.items():
    rows = [
      [m] + [_bilevel.summary(of(kind, m, key, n)) for n in counts] for m in BASELINES + METHODS
    ]
    lines += [f"## {titles[kind]}\n", _common.markdown_table(header, rows) + "\n"]
  seconds = {
    kind: lambda m, kind=kind: f"{np.median(of(kind, m, 'seconds')):.2f}" for kind in KINDS
  }
  lines += [
    "## Wall time per attack (seconds, median over poison counts, after compiling)\n",
    _common.table(METHODS, {"method": str} | seconds) + "\n",
    meta["published_note"] + "\n",
    _bilevel.measured_on(meta),
  ]
  return "\n".join(lines)


def plot(records: list[dict[str, Any]], curves: dict[tuple, list[float]], counts: list[int]):
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  for ax, (kind, key) in zip(axes, KINDS.items(), strict=False):
    for m in BASELINES + METHODS:
      mine = [r for r in records if (r["kind"], r["method"]) == (kind, m)]
      ys = [np.mean([r[key] for r in mine if r["num_poison"] == n]) for n in counts]
      ax.plot(counts, ys, marker="o", label=m, linestyle="--" if m in BASELINES else "-")
    ax.set(title=f"{kind}: {key.replace('_', ' ')}", xlabel="poison points")
    ax.legend(fontsize=7)
  n = counts[-1]
  for m in METHODS:
    curve = curves[("untargeted", n, m)]
    axes[2].plot(np.arange(1, len(curve) + 1), curve, label=m)
  axes[2].set(title=f"untargeted, {n} poisons: upper objective -CE(val)", xlabel="outer step")
  axes[2].legend(fontsize=7)
  fig.tight_layout()
  return fig


def main(args) -> None:
  """``python -m benchmarks poisoning``."""
  cfg = dict(CONFIG, **QUICK) if args.quick else dict(CONFIG)
  seeds, records = [args.seed + t for t in range(args.trials)], []
  for seed in seeds:  # the last trial's curves are plotted
    recs, curves = run_trial(cfg, seed, args.out, args.resume)
    records += recs
  meta = dict(
    seeds=seeds, trials=args.trials, quick=args.quick, config=_common.to_python(cfg),
    source=SOURCE, target=TARGET, published=None, published_note=NOTE,
    environment=_common.environment(),
  )  # fmt: skip
  text = markdown(records, meta)
  figure = plot(records, curves, list(cfg["poison_counts"]))
  _common.publish(args.out, "poisoning", records, meta, text, figure)
