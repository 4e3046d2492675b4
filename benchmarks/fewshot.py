"""Few-shot learning as a bilevel problem: 5-way MNIST with rotations and sinusoid regression.

``KBEAM_JAX_DATA=... python -m benchmarks fewshot [--quick] [--trials N] [--resume] [--out DIR]``

A shared representation (upper), a linear head per task (lower, ``kbeam_jax.tasks.fewshot``),
trained by each of ``METHODS`` and evaluated on held-out tasks (docs/pages/benchmarks/fewshot.md).
Writes ``fewshot.json``, ``fewshot.md`` and ``fewshot.png``.
"""

from __future__ import annotations

import collections
import functools
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import kbeam_jax
from benchmarks import _bilevel, _common
from kbeam_jax import bilevel, data, games
from kbeam_jax.tasks import fewshot

BILEVEL = ("gd", "rmd", "approxgrad", "penalty")  # through _bilevel.bilevel_solver
EVAL_STEPS = 200
CURVE_TASKS = 200  # test tasks behind each point of the test curve (every chunk)
JOINT_CLASSES = 20  # the joint baseline's head: digits 0-4, four rotations each
# MAML's sinusoid MSE as reported by Li et al. 2017 (Meta-SGD), Table 1 (MAML row, one
# adaptation step, 40-40 ReLU network): K-shot -> MSE. Finn et al. 2017 show curves only.
PUBLISHED_MAML_SINE = {5: 1.13, 10: 0.85}


# A problem: kind (classification or regression), sizes (the representation's MLP), num_query
# (per class or per task, in training), penalty_lr ρ (the step on v: ρ (λ_max(∇²f) + γ
# λ_max(H)²) < 2 for stability), penalty_gamma (γ_0 = the cap: fresh tasks every step),
# num_steps (T, descent steps on the heads), solve_lr (ApproxGrad's step on ½|Hq - ∇_v f|²,
# stable below 2 / λ_max(H)²), penalty_num_steps (on v of the penalized objective, after T on g).
Setting = collections.namedtuple(
  "Setting",
  "name kind sizes num_outputs k_shot num_query eval_query meta_batch iterations l2 feature_scale"
  " penalty_lr penalty_gamma eval_tasks num_steps inner_lr solve_lr upper_lr penalty_lower_weight"
  " penalty_num_steps",
  defaults=(600, 10, 0.5, 0.1, 1e-3, 0.0, 10),
)


# The penalty method's γ (g sums the B tasks, f averages them: γ·B per task). Measured on
# seed 0: γ = 1, ρ = 0.05 trained neither sinusoid problem (MSE 5.82 / 5.07, untrained 5.83 /
# 5.08) and MNIST 5-way 5-shot fell to 31%; with ρ = 1, 4,000 iterations: sine-5shot γ = 0.01
# (γB = 0.25) -> MSE 1.59, γ = 0.02 -> 2.97; MNIST 5-way 5-shot, 300 iterations: γ = 0.06
# (γB ≈ 1), ρ = 0.5 -> 67.0%, γ = 0.02, ρ = 1 -> 66.0%.
def settings(quick: bool) -> list[Setting]:
  """The four problems; ``quick``: 40 iterations, 40 test tasks, MNIST meta-batch 4."""
  mnist, sine = ("classification", (784, 256, 64), 5), ("regression", (1, 40, 40), 1)
  b = 4 if quick else 16
  table = [  # name, kind, sizes, num_outputs, k_shot, num_query, eval_query, meta_batch,
    # iterations, l2, feature_scale, penalty_lr, penalty_gamma
    ("mnist-5w1s", *mnist, 1, 15, 15, b, 1000, 0.01, 3.0, 0.5, 0.06),
    ("mnist-5w5s", *mnist, 5, 15, 15, b, 1000, 0.01, 3.0, 0.5, 0.06),
    ("sine-5shot", *sine, 5, 5, 100, 25, 4000, 1e-3, 1.0, 1.0, 0.01),
    ("sine-10shot", *sine, 10, 10, 100, 25, 4000, 1e-3, 1.0, 1.0, 0.01),
  ]
  quick_sizes = dict(iterations=40, eval_tasks=40) if quick else {}
  return [Setting(*row)._replace(**quick_sizes) for row in table]


def sampler(s: Setting, *, train: bool):
  """``(key, pool, num_tasks) -> Episodes`` for the setting (``pool`` unused for regression)."""
  opts = dict(k_shot=s.k_shot, num_query=s.num_query if train else s.eval_query)
  if s.kind == "classification":
    return lambda key, pool, n: fewshot.sample_classification(
      key, pool, num_tasks=n, n_way=s.num_outputs, **opts
    )
  return lambda key, pool, n: fewshot.sample_sinusoid(key, num_tasks=n, **opts)


# A method's training state: the representation u, the solver's state, the meta-batches' key.
State = collections.namedtuple("State", "u inner key")


def meta_solver(s: Setting, method: str) -> kbeam_jax.Solver:
  """Each step draws a meta-batch, restarts its heads at zero (the penalty method's then take
  T descent steps on g) and takes one step of the bilevel ``method``."""
  f, g = fewshot.objectives(s.kind, l2=s.l2, feature_scale=s.feature_scale)
  sample = sampler(s, train=True)
  heads0 = fewshot.init_heads(s.meta_batch, s.sizes[-1], s.num_outputs)
  penalty = method in _bilevel.PENALTY_METHODS
  gamma = s.penalty_gamma
  cfg = dict(
    inner_steps=s.penalty_num_steps if penalty else s.num_steps, inner_lr=s.inner_lr,
    solve_steps=s.num_steps, solve_lr=s.solve_lr, penalty_lr=s.penalty_lr,
    penalty=dict(gamma=gamma, epsilon=1.0, lower_weight=s.penalty_lower_weight, max_gamma=gamma),
  )  # fmt: skip
  solver = _bilevel.bilevel_solver(method, f, g, cfg, optax.adam(s.upper_lr))
  descend = dict(method=bilevel.Naive(), inner_steps=s.num_steps, inner_lr=s.inner_lr)

  def step(state, pool):
    key, sub = jax.random.split(state.key)
    ep = sample(sub, pool, s.meta_batch)
    heads = bilevel.argmin(g, state.u, heads0, ep, **descend) if penalty else heads0
    old = state.inner
    inner = solver.init(sub, state.u, heads)._replace(upper_state=old.upper_state, count=old.count)
    inner, info = solver.step(inner, ep)
    metrics = {"query_loss": info.value} | ({"gamma": info.gamma} if penalty else {})
    return State(inner.u, inner, key), metrics

  return kbeam_jax.Solver(lambda key, u: State(u, solver.init(key, u, heads0), key), step)


def joint_solver(s: Setting) -> kbeam_jax.Solver:
  """The non-bilevel baseline: one head over all meta-train classes (or one regressor over
  all tasks) trained with ``u`` by one-player ``games.gradient_play`` (Adam), on as many
  labelled examples a step as one meta-batch holds."""
  out = s.num_outputs if s.kind == "regression" else JOINT_CLASSES

  def loss(players, x, y):
    u, head = players[0]
    z = fewshot.features(u, x, s.feature_scale)
    return fewshot.task_losses(s.kind, (z @ head["w"] + head["b"][None, :])[None], y[None])[0]

  def batch(key, pool):
    if s.kind == "classification":
      n = s.meta_batch * s.num_outputs * (s.k_shot + s.num_query)
      kc, ki = jax.random.split(key)
      c = jax.random.randint(kc, (n,), 0, pool.shape[0])
      i = jax.random.randint(ki, (n,), 0, pool.shape[1])
      return pool[c, i].reshape(n, -1).astype(jnp.float32) / 255.0, c
    ep = sampler(s, train=True)(key, pool, s.meta_batch)
    x = jnp.concatenate([ep.support_x, ep.query_x], axis=1).reshape(-1, 1)
    return x, jnp.concatenate([ep.support_y, ep.query_y], axis=1).reshape(-1)

  play = games.gradient_play([loss], optax.adam(s.upper_lr))

  def init(key, u):
    k1, key = jax.random.split(key)
    head = {"w": jax.random.normal(k1, (s.sizes[-1], out)) * 0.01, "b": jnp.zeros((out,))}
    return State(u, play.init(((u, head),)), key)

  def step(state, pool):
    key, sub = jax.random.split(state.key)
    inner, info = play.step(state.inner, *batch(sub, pool))
    return State(inner.players[0][0], inner, key), {"query_loss": info.losses[0]}

  return kbeam_jax.Solver(init, step)


# Every method as the Solver that trains it (None: the representation stays at its draw).
METHODS = {m: functools.partial(meta_solver, method=m) for m in BILEVEL}
METHODS |= {"joint": joint_solver, "untrained": None}


@functools.cache
def evaluator(s: Setting, batch: int = 100):
  """``(u, pool, key) -> per-task metrics`` on ``batch`` held-out tasks (jitted once per
  setting): fitted heads, and nearest centroid for classification."""
  sample, scale = sampler(s, train=False), s.feature_scale
  options = dict(num_outputs=s.num_outputs, l2=s.l2, feature_scale=scale, inner_steps=EVAL_STEPS)

  @jax.jit
  def one(u, pool, key):
    ep = sample(key, pool, batch)
    out = {"head": fewshot.evaluate(s.kind, u, ep, inner_lr=s.inner_lr, **options)}
    if s.kind == "classification":
      out["centroid"] = fewshot.nearest_centroid_accuracy(
        u, ep, n_way=s.num_outputs, feature_scale=scale
      )
    return out

  return one


def evaluate(s: Setting, u, pool, key, num_tasks: int, batch: int = 100) -> dict[str, Any]:
  one = evaluator(s, batch)
  parts = [one(u, pool, k) for k in jax.random.split(key, -(-num_tasks // batch))]
  return {m: np.concatenate([np.asarray(p[m]) for p in parts])[:num_tasks] for m in parts[0]}


@functools.cache
def chunk_program(s: Setting, method: str, chunk: int):
  """The method's ``Solver`` and its jitted ``chunk`` steps (the seeds share them)."""
  solver = METHODS[method](s)
  return solver, jax.jit(lambda state, pool: kbeam_jax.run(solver.step, state, chunk, pool))


def run_one(
  s: Setting, method: str, seed: int, train_pool, test_pool, out_dir: Path, *,
  seen_pool=None, resume: bool = False, chunk: int = 100,
) -> tuple[dict[str, Any], list[float]]:  # fmt: skip
  """The record of one trained method and its training query loss per chunk. ``test_curve``:
  the test metric on ``CURVE_TASKS`` fixed tasks before training and after every chunk."""
  key_init, key_train, key_eval = jax.random.split(jax.random.key(seed), 3)
  u = fewshot.init_mlp(key_init, s.sizes)
  key_curve = jax.random.fold_in(key_eval, 1)
  test_metric = lambda u: float(np.mean(evaluate(s, u, test_pool, key_curve, CURVE_TASKS)["head"]))
  test_curve, curve = [(0, test_metric(u))], []
  timing = {"compile_s": 0.0, "chunk_s": 0.0}
  chunk = min(chunk, s.iterations)
  num_chunks = -(-s.iterations // chunk) if METHODS[method] else 0
  if num_chunks:
    solver, run_chunk = chunk_program(s, method, chunk)
    state, history, timing = _common.train_in_chunks(
      lambda state: run_chunk(state, train_pool), solver.init(key_train, u), num_chunks,
      checkpoint=out_dir / "checkpoints" / f"fewshot_{s.name}_{method}_{seed}", resume=resume,
      desc=f"{s.name} {method}", after_chunk=lambda state: {"test_metric": test_metric(state.u)},
    )  # fmt: skip
    u, curve = state.u, [float(np.mean(h["query_loss"])) for h in history]
    test_curve += [((i + 1) * chunk, h["test_metric"]) for i, h in enumerate(history)]
  start = time.perf_counter()
  metrics = evaluate(s, u, test_pool, key_eval, s.eval_tasks)
  eval_s = time.perf_counter() - start
  if seen_pool is not None:
    metrics["seen_head"] = evaluate(s, u, seen_pool, key_eval, s.eval_tasks)["head"]
  record = dict(
    problem=s.name, method=method, seed=seed, iterations=num_chunks * chunk,
    train_seconds=timing["chunk_s"] * num_chunks, compile_seconds=timing["compile_s"],
    eval_seconds=eval_s, final_train_query_loss=curve[-1] if curve else None,
    test_curve=test_curve,
  )  # fmt: skip
  for name, values in metrics.items():
    record[f"{name}_mean"], record[f"{name}_ci95"] = fewshot.mean_ci95(values)
  return record, curve


# --- The report: Markdown tables and the figure ----------------------------------------------


def _cell(rs, metric: str, scale: float = 1.0) -> str:
  if not rs or f"{metric}_mean" not in rs[0]:
    return "-"
  mean, ci = (np.mean([r[f"{metric}_{k}"] for r in rs]) * scale for k in ("mean", "ci95"))
  return f"{mean:.3f} ± {ci:.3f}" if scale == 1.0 else f"{mean:.1f} ± {ci:.1f}"


def _mean_test_curve(rs) -> tuple[list[int], np.ndarray]:
  its = [i for i, _ in rs[0]["test_curve"]]
  return its, np.mean([[v for _, v in r["test_curve"]] for r in rs], axis=0)


def _curve_cell(rs, accuracy: bool) -> str:
  """``start → best (at iteration) → end`` of the seeds' mean test curve."""
  its, values = _mean_test_curve(rs)
  best = int(np.argmax(values) if accuracy else np.argmin(values))
  fmt = (lambda v: f"{100 * v:.1f}") if accuracy else (lambda v: f"{v:.3f}")
  return f"{fmt(values[0])} → {fmt(values[best])} ({its[best]}) → {fmt(values[-1])}"


def _seconds_cell(rs) -> str:
  train, evaluate = (np.mean([r[k] for r in rs]) for k in ("train_seconds", "eval_seconds"))
  compile_s = np.mean([r["compile_seconds"] or 0.0 for r in rs])
  return f"{train:.1f} (+{compile_s:.1f}) / {evaluate:.1f}"


def report(records, meta: dict[str, Any]) -> str:
  names = [s["name"] for s in meta["settings"]]
  mnist, sine = ([n for n in names if n.startswith(p)] for p in ("mnist", "sine"))
  methods = list(dict.fromkeys(r["method"] for r in records))
  trained = list(dict.fromkeys(r["method"] for r in records if len(r["test_curve"]) > 1))
  runs = lambda n, m: [r for r in records if (r["problem"], r["method"]) == (n, m)]
  per_problem = lambda cell, ms=methods: _common.table(
    ms, {"method": str} | {n: lambda m, n=n: cell(runs(n, m), n) for n in names}
  )
  mnist_cols = {
    f"{n} {k.replace('seen_head', 'seen classes')}": lambda m, n=n, k=k: _cell(runs(n, m), k, 100.0)
    for n in mnist for k in ("head", "centroid", "seen_head")
  }  # fmt: skip
  published = meta["published_maml_sine_mse"]
  maml = [published.get(int(n.split("-")[1].removesuffix("shot")), "-") for n in sine]
  sine_rows = [[m] + [_cell(runs(n, m), "head") for n in sine] for m in methods]
  sine_rows.append([f"MAML, published ({meta['published_source']})", *map(str, maml)])
  return "\n\n".join([
    "# Few-shot learning: shared representation (upper), per-task linear heads (lower)",
    f"Seeds {meta['seeds']}; heads fitted by {meta['eval_steps']} descent steps on each "
    "test task's support set; ± is the 95% interval over test tasks (mean of the seeds' "
    "intervals).",
    "## MNIST N-way K-shot: query accuracy (%) on digits 5-9 (with rotations)",
    _common.table(methods, {"method": str} | mnist_cols),
    '"seen classes": the same head accuracy on tasks drawn from digits 0-4 of the test '
    "file, i.e. the meta-train classes on images never trained on.",
    "## Sinusoid regression: query mean squared error (100 points per task)",
    _common.markdown_table(["method", *sine], sine_rows),
    f"## Test metric during meta-training ({CURVE_TASKS} fixed test tasks after every chunk)",
    "Accuracy (%) for MNIST, MSE for the sinusoid: at the start, at its best (iteration) "
    "and at the end.",
    per_problem(lambda rs, n: _curve_cell(rs, n in mnist), trained),
    "## Wall time (s): training (compilation apart) / evaluation",
    per_problem(lambda rs, n: _seconds_cell(rs)),
    _bilevel.measured_on(meta),
  ])  # fmt: skip


def plot(records, curves: dict[tuple[str, str, int], list[float]]):
  """Top: training query loss per chunk (``curves[problem, method, seed]``); bottom: the
  test metric during meta-training."""
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
      rs = [r for r in records if (r["problem"], r["method"]) == (problem, method)]
      if rs and len(rs[0]["test_curve"]) > 1:
        bottom.plot(*_mean_test_curve(rs), label=method)
      elif rs:  # untrained: a level
        bottom.axhline(rs[0]["test_curve"][0][1], color="gray", ls=":", label=method)
    top.set(title=problem, xlabel="chunk of training steps", ylabel="training query loss")
    top.set_yscale("log")
    metric = "test accuracy" if problem.startswith("mnist") else "test MSE"
    bottom.set(xlabel="meta-iteration", ylabel=f"{metric} ({CURVE_TASKS} tasks)")
  for ax in axes[:, 0]:
    ax.legend(fontsize=7)
  return fig


def main(args) -> None:
  """``python -m benchmarks fewshot``: every method on every problem and seed. MNIST class
  pools, each digit rotated by 0/90/180/270° as four classes: meta-train (digits 0-4 of the
  training file), meta-test (5-9 of the test file) and seen (0-4 of the test file)."""
  from tqdm.auto import tqdm

  seeds = tuple(args.seed + i for i in range(args.trials))
  train, test = data.load_mnist("train"), data.load_mnist("test")
  pool = lambda d, digits: jnp.asarray(fewshot.class_pool(d.images, d.labels, digits).images)
  train_pool, test_pool = pool(train, range(5)), pool(test, range(5, 10))
  seen_pool = pool(test, range(5))
  records, curves = [], {}
  jobs = [(s, m, seed) for s in settings(args.quick) for m in METHODS for seed in seeds]
  for s, method, seed in tqdm(jobs, desc="fewshot", unit="run"):
    seen = seen_pool if s.kind == "classification" else None
    record, curves[s.name, method, seed] = run_one(
      s, method, seed, train_pool, test_pool, args.out, seen_pool=seen, resume=args.resume
    )
    records.append(record)
  meta = dict(
    seeds=list(seeds), quick=args.quick, eval_steps=EVAL_STEPS,
    settings=[s._asdict() for s in settings(args.quick)],
    published_maml_sine_mse=PUBLISHED_MAML_SINE,
    published_source="Li et al. 2017, Meta-SGD, Table 1 (MAML, one adaptation step)",
    environment=_common.environment(),
  )  # fmt: skip
  _common.publish(args.out, "fewshot", records, meta, report(records, meta), plot(records, curves))
