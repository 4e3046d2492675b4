"""Few-shot learning as a bilevel problem: 5-way MNIST with rotations and sinusoid regression.

``KBEAM_JAX_DATA=... python -m benchmarks fewshot [--quick] [--trials N] [--resume] [--out DIR]``

A shared representation ``T(x; u)`` (the upper variable), a linear head per task fitted on
its support set (the lower variables, stacked over the meta-batch), the mean query loss as
the upper objective (``kbeam_jax.tasks.fewshot``). Methods (``METHODS``, each trained by a
``kbeam_jax.Solver``): ``gd`` (naive), ``rmd``, ``approxgrad``, ``penalty``, ``joint`` (one
shared head, not bilevel) and ``untrained``. Each is evaluated on held-out tasks with heads
fitted by ``EVAL_STEPS`` descent steps (MNIST: also nearest centroid, and tasks of the
meta-train classes' unseen images); the test metric on ``CURVE_TASKS`` fixed tasks follows
every chunk of training. Writes ``fewshot.json``, ``fewshot.md`` and ``fewshot.png``.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

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


class Setting(NamedTuple):
  name: str
  kind: str  # a kind of kbeam_jax.tasks.fewshot: classification or regression
  sizes: tuple[int, ...]  # the representation's MLP
  num_outputs: int
  k_shot: int
  num_query: int  # per class (classification) or per task (regression), in training
  eval_query: int
  meta_batch: int
  iterations: int
  l2: float
  feature_scale: float
  penalty_lr: float  # ρ, the step on v: ρ (λ_max(∇²f) + γ λ_max(H)²) < 2 for stability
  penalty_gamma: float  # γ_0 = the cap (fresh tasks every step: no schedule to carry)
  eval_tasks: int = 600
  num_steps: int = 10  # T, descent steps on the heads
  inner_lr: float = 0.5
  solve_lr: float = 0.1  # ApproxGrad's step on ½|Hq - ∇_v f|², stable below 2 / λ_max(H)²
  upper_lr: float = 1e-3
  penalty_lower_weight: float = 0.0
  penalty_num_steps: int = 10  # steps on v of the penalized objective, after the T on g


# The penalty method's γ. g *sums* the B tasks of a meta-batch while f *averages* them, so
# each task's penalty weight is γ·B; the heads restart for every meta-batch and are never
# converged, so u's gradient ∇_u f + γ ∇²_uv g ∇_v g is dominated by its second term unless
# γ·B is of order 1 or below: with γ = 1 and ρ = 0.05 neither sinusoid problem trained (MSE
# 5.82 / 5.07, untrained 5.83 / 5.08) and MNIST 5-way 5-shot fell to 31%. Measured on seed 0
# with ρ = 1 (Hessian of L in v: ∇²f + γ(∇²_vv g)², small at this γ), 4,000 iterations:
# sine-5shot γ = 0.01 (γB = 0.25) -> MSE 1.59, γ = 0.02 -> 2.97; MNIST 5-way 5-shot, 300
# iterations: γ = 0.06 (γB ≈ 1), ρ = 0.5 -> 67.0%, γ = 0.02, ρ = 1 -> 66.0%.
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
  query = s.num_query if train else s.eval_query

  def sample(key, pool, num_tasks):
    if s.kind == "classification":
      return fewshot.sample_classification(
        key, pool, num_tasks=num_tasks, n_way=s.num_outputs, k_shot=s.k_shot, num_query=query
      )
    return fewshot.sample_sinusoid(key, num_tasks=num_tasks, k_shot=s.k_shot, num_query=query)

  return sample


class State(NamedTuple):
  """A method's training state: the representation ``u`` (what the evaluation reads), the
  library solver's state and the key that draws the meta-batches."""

  u: Any
  inner: Any
  key: jax.Array


def meta_solver(s: Setting, method: str) -> kbeam_jax.Solver:
  """A bilevel method on fresh tasks: each step draws a meta-batch, restarts its heads at zero
  (the penalty method's then take T descent steps on g) and takes one step of the method."""
  f, g = fewshot.objectives(s.kind, l2=s.l2, feature_scale=s.feature_scale)
  sample = sampler(s, train=True)
  heads0 = fewshot.init_heads(s.meta_batch, s.sizes[-1], s.num_outputs)
  penalty = method in _bilevel.PENALTY_METHODS
  gamma = s.penalty_gamma  # fixed: fresh tasks every step, no schedule to carry
  cfg = dict(
    inner_steps=s.penalty_num_steps if penalty else s.num_steps, inner_lr=s.inner_lr,
    solve_steps=s.num_steps, solve_lr=s.solve_lr, penalty_lr=s.penalty_lr,
    penalty=dict(gamma=gamma, epsilon=1.0, lower_weight=s.penalty_lower_weight, max_gamma=gamma),
  )  # fmt: skip
  solver = _bilevel.bilevel_solver(method, f, g, cfg, optax.adam(s.upper_lr))

  def init(key, u):
    return State(u, solver.init(key, u, heads0), key)

  def step(state, pool):
    key, sub = jax.random.split(state.key)
    ep = sample(sub, pool, s.meta_batch)
    heads = heads0
    if penalty:
      heads = bilevel.argmin(
        g, state.u, heads0, ep, method=bilevel.Naive(), inner_steps=s.num_steps, inner_lr=s.inner_lr
      )
    old = state.inner
    inner = solver.init(sub, state.u, heads)._replace(upper_state=old.upper_state, count=old.count)
    inner, info = solver.step(inner, ep)
    metrics = {"query_loss": info.value} | ({"gamma": info.gamma} if penalty else {})
    return State(inner.u, inner, key), metrics

  return kbeam_jax.Solver(init, step)


def joint_solver(s: Setting) -> kbeam_jax.Solver:
  """The non-bilevel baseline: one head over all meta-train classes (or one regressor over
  all tasks) trained with ``u`` by one-player ``games.gradient_play`` (Adam)."""
  out = s.num_outputs if s.kind == "regression" else JOINT_CLASSES

  def loss(players, x, y):
    u, head = players[0]
    z = fewshot.features(u, x, s.feature_scale)
    return fewshot.task_losses(s.kind, (z @ head["w"] + head["b"][None, :])[None], y[None])[0]

  play = games.gradient_play([loss], optax.adam(s.upper_lr))

  def init(key, u):
    k1, key = jax.random.split(key)
    head = {"w": jax.random.normal(k1, (s.sizes[-1], out)) * 0.01, "b": jnp.zeros((out,))}
    return State(u, play.init(((u, head),)), key)

  def step(state, pool):
    key, sub = jax.random.split(state.key)
    inner, info = play.step(state.inner, *joint_batch(s, sub, pool))
    return State(inner.players[0][0], inner, key), {"query_loss": info.losses[0]}

  return kbeam_jax.Solver(init, step)


def joint_batch(s: Setting, key, pool):
  """The joint baseline's batch: as many labelled examples as one meta-batch holds."""
  if s.kind == "classification":
    n = s.meta_batch * s.num_outputs * (s.k_shot + s.num_query)
    kc, ki = jax.random.split(key)
    c = jax.random.randint(kc, (n,), 0, pool.shape[0])
    i = jax.random.randint(ki, (n,), 0, pool.shape[1])
    return pool[c, i].reshape(n, -1).astype(jnp.float32) / 255.0, c
  ep = fewshot.sample_sinusoid(key, num_tasks=s.meta_batch, k_shot=s.k_shot, num_query=s.num_query)
  x = jnp.concatenate([ep.support_x, ep.query_x], axis=1).reshape(-1, 1)
  return x, jnp.concatenate([ep.support_y, ep.query_y], axis=1).reshape(-1)


# Every method as the Solver that trains it (None: the representation stays at its draw).
METHODS: dict[str, Callable[[Setting], kbeam_jax.Solver] | None] = {
  **{m: functools.partial(meta_solver, method=m) for m in BILEVEL},
  "joint": joint_solver,
  "untrained": None,
}


@functools.cache
def evaluator(s: Setting, batch: int = 100):
  """``(u, pool, key) -> per-task metrics`` on ``batch`` held-out tasks (jitted once per
  setting): fitted heads, and nearest centroid for classification."""
  sample = sampler(s, train=False)
  n, scale = s.num_outputs, s.feature_scale
  options = dict(num_outputs=n, l2=s.l2, feature_scale=scale, inner_steps=EVAL_STEPS)

  @jax.jit
  def one(u, pool, key):
    ep = sample(key, pool, batch)
    out = {"head": fewshot.evaluate(s.kind, u, ep, inner_lr=s.inner_lr, **options)}
    if s.kind == "classification":
      out["centroid"] = fewshot.nearest_centroid_accuracy(u, ep, n_way=n, feature_scale=scale)
    return out

  return one


def evaluate(s: Setting, u, pool, key, num_tasks: int, batch: int = 100) -> dict[str, Any]:
  """Per-task metrics on ``num_tasks`` held-out tasks, fitted heads (and nearest centroid)."""
  one = evaluator(s, batch)
  parts = [one(u, pool, k) for k in jax.random.split(key, -(-num_tasks // batch))]
  return {m: np.concatenate([np.asarray(p[m]) for p in parts])[:num_tasks] for m in parts[0]}


class Pools(NamedTuple):
  """MNIST class pools ``(C, M, 28, 28)``: meta-train (digits 0-4, training file), meta-test
  (digits 5-9, test file) and ``seen`` (digits 0-4 of the test file: the meta-train
  classes, images never trained on), each digit rotated by 0/90/180/270° as four classes."""

  train: jax.Array
  test: jax.Array
  seen: jax.Array


def pools(data_dir=None) -> Pools:
  train, test = data.load_mnist("train", data_dir), data.load_mnist("test", data_dir)
  pool = lambda d, digits: jnp.asarray(fewshot.class_pool(d.images, d.labels, digits).images)
  return Pools(pool(train, range(5)), pool(test, range(5, 10)), pool(test, range(5)))


@functools.cache
def chunk_program(s: Setting, method: str, chunk: int):
  """The method's ``Solver`` and ``(state, pool) -> (state, metrics)``, ``chunk`` of its
  steps by ``kbeam_jax.run``: jitted once per setting, method and chunk (seeds share it)."""
  solver = METHODS[method](s)
  return solver, jax.jit(lambda state, pool: kbeam_jax.run(solver.step, state, chunk, pool))


def run_one(
  s: Setting, method: str, seed: int, train_pool, test_pool, out_dir: Path, *,
  seen_pool=None, resume: bool = False, chunk: int = 100,
) -> tuple[dict[str, Any], list[float]]:  # fmt: skip
  """Trains one method and evaluates it on ``s.eval_tasks`` test tasks (and on tasks of
  ``seen_pool`` when given); returns the record and the training query loss per chunk. The
  record's ``test_curve``: the mean test metric on ``CURVE_TASKS`` fixed tasks before
  training and after every chunk (when meta-training starts to hurt the unseen classes)."""
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
      lambda state: run_chunk(state, train_pool),
      solver.init(key_train, u),
      num_chunks,
      checkpoint=out_dir / "checkpoints" / f"fewshot_{s.name}_{method}_{seed}",
      resume=resume,
      desc=f"{s.name} {method}",
      after_chunk=lambda state: {"test_metric": test_metric(state.u)},
    )
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

Records = list[dict[str, Any]]


def _runs(records: Records, problem: str, method: str) -> Records:
  """The seeds' records of ``method`` on ``problem``."""
  return [r for r in records if (r["problem"], r["method"]) == (problem, method)]


def _cell(rs: Records, metric: str, scale: float = 1.0) -> str:
  if not rs or f"{metric}_mean" not in rs[0]:
    return "-"
  mean, ci = (np.mean([r[f"{metric}_{k}"] for r in rs]) * scale for k in ("mean", "ci95"))
  return f"{mean:.3f} ± {ci:.3f}" if scale == 1.0 else f"{mean:.1f} ± {ci:.1f}"


def _mean_test_curve(rs: Records) -> tuple[list[int], np.ndarray]:
  """Iterations and the seeds' mean of the records' ``test_curve``."""
  its = [i for i, _ in rs[0]["test_curve"]]
  return its, np.mean([[v for _, v in r["test_curve"]] for r in rs], axis=0)


def _curve_cell(rs: Records, accuracy: bool) -> str:
  """``start → best (at iteration) → end`` of the seeds' mean test curve."""
  its, values = _mean_test_curve(rs)
  best = int(np.argmax(values) if accuracy else np.argmin(values))
  fmt = (lambda v: f"{100 * v:.1f}") if accuracy else (lambda v: f"{v:.3f}")
  return f"{fmt(values[0])} → {fmt(values[best])} ({its[best]}) → {fmt(values[-1])}"


def _seconds_cell(rs: Records) -> str:
  train, evaluate = (np.mean([r[k] for r in rs]) for k in ("train_seconds", "eval_seconds"))
  compile_s = np.mean([r["compile_seconds"] or 0.0 for r in rs])
  return f"{train:.1f} (+{compile_s:.1f}) / {evaluate:.1f}"


def report(records: Records, meta: dict[str, Any]) -> str:
  """MNIST accuracies, sinusoid errors beside MAML's published figure, the test metric
  along meta-training and the wall times; methods in the order of the records."""
  names = [s["name"] for s in meta["settings"]]
  mnist, sine = ([n for n in names if n.startswith(p)] for p in ("mnist", "sine"))
  methods = list(dict.fromkeys(r["method"] for r in records))
  trained = [
    m for m in methods if any(len(r["test_curve"]) > 1 for r in records if r["method"] == m)
  ]
  per_problem = lambda cell, ms=methods: _common.markdown_table(
    ["method", *names], [[m, *(cell(_runs(records, n, m), n) for n in names)] for m in ms]
  )
  mnist_cols = [(n, k) for n in mnist for k in ("head", "centroid", "seen_head")]
  published = meta["published_maml_sine_mse"]
  maml = [published.get(int(n.split("-")[1].removesuffix("shot")), "-") for n in sine]
  sine_rows = [[m] + [_cell(_runs(records, n, m), "head") for n in sine] for m in methods]
  sine_rows.append([f"MAML, published ({meta['published_source']})", *map(str, maml)])
  env = meta["environment"]
  return "\n\n".join([
    "# Few-shot learning: shared representation (upper), per-task linear heads (lower)",
    f"Seeds {meta['seeds']}; heads fitted by {meta['eval_steps']} descent steps on each "
    "test task's support set; ± is the 95% interval over test tasks (mean of the seeds' "
    "intervals).",
    "## MNIST N-way K-shot: query accuracy (%) on digits 5-9 (with rotations)",
    _common.markdown_table(
      ["method"] + [f"{n} {k.replace('seen_head', 'seen classes')}" for n, k in mnist_cols],
      [[m, *(_cell(_runs(records, n, m), k, 100.0) for n, k in mnist_cols)] for m in methods],
    ),
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
    f"Measured on {env['device']} ({env['backend']}), jax {env['jax']}.",
  ])  # fmt: skip


def plot(records: Records, curves: dict[tuple[str, str, int], list[float]]):
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
      rs = _runs(records, problem, method)
      if rs and len(rs[0]["test_curve"]) > 1:
        bottom.plot(*_mean_test_curve(rs), label=method)
      elif rs:  # untrained: a level
        bottom.axhline(rs[0]["test_curve"][0][1], color="gray", ls=":", label=method)
    top.set(title=problem, xlabel="chunk of training steps", ylabel="training query loss")
    top.set_yscale("log")
    metric = "test accuracy" if problem.startswith("mnist") else "test MSE"
    bottom.set(xlabel="meta-iteration", ylabel=f"{metric} ({CURVE_TASKS} tasks)")
  axes[0, 0].legend(fontsize=7)
  axes[1, 0].legend(fontsize=7)
  return fig


def run_suite(
  out_dir: Path, *, quick: bool = False, seeds=(0,), resume: bool = False, data_dir=None
) -> Records:
  from tqdm.auto import tqdm

  p = pools(data_dir)
  records, curves = [], {}
  jobs = [(s, m, seed) for s in settings(quick) for m in METHODS for seed in seeds]
  for s, method, seed in tqdm(jobs, desc="fewshot", unit="run"):
    seen = p.seen if s.kind == "classification" else None
    record, curves[s.name, method, seed] = run_one(
      s, method, seed, p.train, p.test, out_dir, seen_pool=seen, resume=resume
    )
    records.append(record)
  meta = dict(
    seeds=list(seeds), quick=quick, eval_steps=EVAL_STEPS,
    settings=[s._asdict() for s in settings(quick)], published_maml_sine_mse=PUBLISHED_MAML_SINE,
    published_source="Li et al. 2017, Meta-SGD, Table 1 (MAML, one adaptation step)",
    environment=_common.environment(),
  )  # fmt: skip
  _common.publish(out_dir, "fewshot", records, meta, report(records, meta), plot(records, curves))
  return records


def main(args) -> None:
  """``python -m benchmarks fewshot``."""
  seeds = tuple(args.seed + i for i in range(args.trials))
  run_suite(args.out, quick=args.quick, seeds=seeds, resume=args.resume)
