"""The fewshot suite's one report and one figure.

``write`` puts the records and the run's ``meta`` in ``fewshot.json``, the tables they hold
in ``fewshot.md`` (MNIST accuracies, sinusoid errors beside MAML's published figure, the
test metric along meta-training, wall times) and the training curves in ``fewshot.png``.
Methods appear in the order of the records; the trained ones are those with a test curve.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import _common

Records = list[dict[str, Any]]


def write(out_dir: Path, records: Records, meta: dict[str, Any], curves, curve_tasks: int) -> None:
  """Writes ``fewshot.json``, ``fewshot.md`` and ``fewshot.png`` (``curves[(problem,
  method, seed)]``: the training query loss per chunk)."""
  _common.write_json(out_dir / "fewshot.json", records, meta)
  (out_dir / "fewshot.md").write_text(markdown(records, meta, curve_tasks))
  plot(curves, records, out_dir / "fewshot.png", curve_tasks)


def _runs(records: Records, problem: str, method: str) -> Records:
  """The seeds' records of ``method`` on ``problem``."""
  return [r for r in records if (r["problem"], r["method"]) == (problem, method)]


def _cell(rs: Records, metric: str, scale: float = 1.0) -> str:
  if not rs or f"{metric}_mean" not in rs[0]:
    return "-"
  mean = np.mean([r[f"{metric}_mean"] for r in rs]) * scale
  ci = np.mean([r[f"{metric}_ci95"] for r in rs]) * scale
  return f"{mean:.3f} ± {ci:.3f}" if scale == 1.0 else f"{mean:.1f} ± {ci:.1f}"


def _mean_test_curve(rs: Records) -> tuple[list[int], np.ndarray]:
  """Iterations and the seeds' mean of the records' ``test_curve``."""
  its = [i for i, _ in rs[0]["test_curve"]]
  return its, np.mean([[v for _, v in r["test_curve"]] for r in rs], axis=0)


def _curve_cell(rs: Records, accuracy: bool) -> str:
  """``start → best (at iteration) → end`` of the seeds' mean test curve."""
  if not rs:
    return "-"
  its, values = _mean_test_curve(rs)
  best = int(np.argmax(values) if accuracy else np.argmin(values))
  fmt = (lambda v: f"{100 * v:.1f}") if accuracy else (lambda v: f"{v:.3f}")
  return f"{fmt(values[0])} → {fmt(values[best])} ({its[best]}) → {fmt(values[-1])}"


def _seconds_cell(rs: Records) -> str:
  if not rs:
    return "-"
  train, evaluate = (np.mean([r[k] for r in rs]) for k in ("train_seconds", "eval_seconds"))
  compile_s = np.mean([r["compile_seconds"] or 0.0 for r in rs])
  return f"{train:.1f} (+{compile_s:.1f}) / {evaluate:.1f}"


def markdown(records: Records, meta: dict[str, Any], curve_tasks: int) -> str:
  names = [s["name"] for s in meta["settings"]]
  mnist = [n for n in names if n.startswith("mnist")]
  sine = [n for n in names if n.startswith("sine")]
  methods = list(dict.fromkeys(r["method"] for r in records))
  trained = [
    m for m in methods if any(len(r["test_curve"]) > 1 for r in records if r["method"] == m)
  ]
  mnist_metrics = ("head", "centroid", "seen_head")
  rows = [
    [m] + [_cell(_runs(records, n, m), k, 100.0) for n in mnist for k in mnist_metrics]
    for m in methods
  ]
  header = ["method"] + [f"{n} {c}" for n in mnist for c in ("head", "centroid", "seen classes")]
  lines = [
    "# Few-shot learning: shared representation (upper), per-task linear heads (lower)",
    "",
    f"Seeds {meta['seeds']}; heads fitted by {meta['eval_steps']} descent steps on each "
    "test task's support set; ± is the 95% interval over test tasks (mean of the seeds' "
    "intervals).",
    "",
    "## MNIST N-way K-shot: query accuracy (%) on digits 5-9 (with rotations)",
    "",
    _common.markdown_table(header, rows),
    "",
    '"seen classes": the same head accuracy on tasks drawn from digits 0-4 of the test '
    "file, i.e. the meta-train classes on images never trained on.",
    "",
    "## Sinusoid regression: query mean squared error (100 points per task)",
    "",
  ]
  rows = [[m] + [_cell(_runs(records, n, m), "head") for n in sine] for m in methods]
  published = meta["published_maml_sine_mse"]
  shots = lambda n: int(n.split("-")[1].removesuffix("shot"))
  rows.append(
    [f"MAML, published ({meta['published_source']})"]
    + [str(published.get(shots(n), "-")) for n in sine]
  )
  lines += [_common.markdown_table(["method"] + sine, rows), ""]
  lines += [
    f"## Test metric during meta-training ({curve_tasks} fixed test tasks after every chunk)",
    "",
    "Accuracy (%) for MNIST, MSE for the sinusoid: at the start, at its best (iteration) "
    "and at the end.",
    "",
  ]
  rows = [[m] + [_curve_cell(_runs(records, n, m), n in mnist) for n in names] for m in trained]
  lines += [_common.markdown_table(["method"] + names, rows), ""]
  lines += ["## Wall time (s): training (compilation apart) / evaluation", ""]
  rows = [[m] + [_seconds_cell(_runs(records, n, m)) for n in names] for m in methods]
  lines += [_common.markdown_table(["method"] + names, rows), ""]
  env = meta["environment"]
  lines += [f"Measured on {env['device']} ({env['backend']}), jax {env['jax']}.", ""]
  return "\n".join(lines)


def plot(curves, records: Records, path: Path, curve_tasks: int) -> None:
  """Top: training query loss per chunk; bottom: the test metric during meta-training."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  problems = sorted({p for p, _, _ in curves})
  methods = list(dict.fromkeys(r["method"] for r in records))
  fig, axes = plt.subplots(2, len(problems), figsize=(5.2 * len(problems), 7), squeeze=False)
  for j, problem in enumerate(problems):
    top, bottom = axes[0, j], axes[1, j]
    for method in methods:
      runs = [c for (p, m, _), c in curves.items() if (p, m) == (problem, method) and c]
      if runs:
        top.plot(np.mean(runs, axis=0), label=method)
      rs = _runs(records, problem, method)
      if rs and len(rs[0]["test_curve"]) > 1:
        bottom.plot(*_mean_test_curve(rs), label=method)
      elif rs:  # untrained: a level
        bottom.axhline(rs[0]["test_curve"][0][1], color="gray", ls=":", label=method)
    top.set(title=problem, xlabel="chunk of training steps", ylabel="training query loss")
    top.set_yscale("log")
    metric = "test accuracy" if problem.startswith("mnist") else "test MSE"
    bottom.set(xlabel="meta-iteration", ylabel=f"{metric} ({curve_tasks} tasks)")
  axes[0, 0].legend(fontsize=7)
  axes[1, 0].legend(fontsize=7)
  _common.save_figure(fig, path)
