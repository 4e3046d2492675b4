"""Few-shot learning as a bilevel problem: MNIST N-way K-shot and sinusoid regression.

``KBEAM_JAX_DATA=../shared/data python -m benchmarks fewshot [--quick] [--out results]``

The formulation of ``kbeam_jax.tasks.fewshot``: a shared representation ``T(x; u)`` (the
upper variable), a linear head per task fitted on its support set (the lower variables,
stacked over the meta-batch), the mean query loss as the upper objective.

Problems:

* ``mnist-5w1s``, ``mnist-5w5s``: 5-way 1-shot / 5-shot classification, 15 queries per
  class. Meta-train classes: digits 0-4 of the training file, each rotated by 0, 90, 180
  and 270 degrees (20 classes); meta-test classes: digits 5-9 of the test file, rotated the
  same way (20 classes never seen in training). Representation: MLP 784-256-64, ReLU.
* ``sine-5shot``, ``sine-10shot``: the sinusoid tasks of Finn et al. 2017 (amplitude in
  [0.1, 5], phase in [0, pi], inputs in [-5, 5]), K support points, K query points in
  training and 100 in testing. Representation: MLP 1-40-40, ReLU (MAML's network without
  its last layer, which is our per-task head).

Methods, each a ``kbeam_jax.Solver`` (``METHODS``) whose step draws a fresh meta-batch and
trains ``u`` with Adam (heads start at zero for every meta-batch: the tasks are new):

* ``gd``: the naive baseline, T descent steps on the heads and ``∇_u f`` at ``v_T``
  (the implicit term ``-∇²_uv g (∇²_vv g)⁻¹ ∇_v f`` dropped);
* ``rmd``: reverse-mode through the T steps (``bilevel.RMD()``);
* ``approxgrad``: ``bilevel.ApproxGrad(T, solve_lr)``, T solve steps;
* ``penalty``: ``bilevel.penalty`` (fixed γ ≈ 1/B or below, see the note above
  ``settings``), heads warm-started by T descent steps on the lower problem for every new
  meta-batch, then T penalty steps;
* ``joint``: not bilevel; one shared head over all meta-train classes (classification)
  or one shared regressor over all tasks (regression: the "pretrained" baseline of Finn
  et al.), trained on the same number of examples per step;
* ``untrained``: the representation at its random initialization.

Every method is evaluated the same way on held-out tasks: each head fitted on its support
set by ``EVAL_STEPS`` descent steps (the lower problem solved), the query accuracy / mean
squared error averaged over the test tasks (95% interval); for classification also the
nearest-centroid accuracy on the same representation. Training runs the solver by
``kbeam_jax.run`` in compiled chunks (``_common.train_in_chunks``: a progress bar,
``--resume`` continues from the checkpoints in ``--out``); wall time is the steady
per-chunk time times the number of chunks, compilation reported apart.
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
from benchmarks import _bilevel, _common, _fewshot_report
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
  kind: str
  sizes: tuple[int, ...]
  num_outputs: int
  k_shot: int
  num_query: int  # per class (classification) or per task (regression), in training
  eval_query: int
  meta_batch: int
  iterations: int
  eval_tasks: int
  l2: float
  feature_scale: float
  num_steps: int  # T, descent steps on the heads
  inner_lr: float
  solve_lr: float  # ApproxGrad's step on ½|Hq - ∇_v f|², stable below 2 / λ_max(H)²
  upper_lr: float
  penalty_lr: float  # ρ, the step on v: ρ (λ_max(∇²f) + γ λ_max(H)²) < 2 for stability
  penalty_gamma: float  # γ_0 = the cap (fresh tasks every step: no schedule to carry)
  penalty_lower_weight: float
  penalty_num_steps: int  # steps on v of the penalized objective, after the T steps on g


# The penalty method's γ here. γ multiplies |∇_v g|², and g *sums* the B tasks of a
# meta-batch while f *averages* them, so each task's penalty weight is γ·B. The heads
# restart for every meta-batch and are never converged, so u's gradient
# ∇_u f + γ ∇²_uv g ∇_v g is dominated by the second term (pulling u towards making
# unconverged heads stationary) unless γ·B is of order 1 or below: with γ = 1 and ρ = 0.05
# neither sinusoid problem trained at all (MSE 5.82 / 5.07, the untrained 5.83 / 5.08) and
# MNIST 5-way 5-shot fell to 31%. Measured on seed 0 with ρ = 1 (the steps on v as large as
# stability allows: the Hessian of L in v is ∇²f + γ(∇²_vv g)², small at this γ),
# 4,000 iterations: sine-5shot γ = 0.01 (γB = 0.25) -> MSE 1.59, γ = 0.02 -> 2.97; MNIST
# 5-way 5-shot, 300 iterations: γ = 0.06 (γB ≈ 1), ρ = 0.5 -> 67.0%, γ = 0.02, ρ = 1 -> 66.0%.


def settings(quick: bool) -> list[Setting]:
  it = (lambda full: 40) if quick else (lambda full: full)
  shared = dict(
    eval_tasks=40 if quick else 600,
    num_steps=10,
    inner_lr=0.5,
    solve_lr=0.1,
    upper_lr=1e-3,
    penalty_lower_weight=0.0,
    penalty_num_steps=10,
  )
  mnist = dict(
    shared,
    kind="classification",
    sizes=(784, 256, 64),
    num_outputs=5,
    num_query=15,
    eval_query=15,
    meta_batch=4 if quick else 16,
    l2=0.01,
    feature_scale=3.0,
    penalty_lr=0.5,
    penalty_gamma=0.06,  # ≈ 1 / meta_batch of the full run: see the note above
  )
  sine = dict(
    shared,
    kind="regression",
    sizes=(1, 40, 40),
    num_outputs=1,
    eval_query=100,
    meta_batch=25,
    l2=1e-3,
    feature_scale=1.0,
    penalty_lr=1.0,
    penalty_gamma=0.01,  # see the note above
  )
  return [
    Setting("mnist-5w1s", k_shot=1, iterations=it(1000), **mnist),
    Setting("mnist-5w5s", k_shot=5, iterations=it(1000), **mnist),
    Setting("sine-5shot", k_shot=5, num_query=5, iterations=it(4000), **sine),
    Setting("sine-10shot", k_shot=10, num_query=10, iterations=it(4000), **sine),
  ]


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


def bilevel_config(s: Setting, method: str) -> dict[str, Any]:
  """This suite's settings in the shape of ``_bilevel.bilevel_solver``'s config; the penalty
  method's γ is fixed at γ_0 (fresh tasks every step: no schedule to carry)."""
  gamma = s.penalty_gamma
  penalty = dict(gamma=gamma, epsilon=1.0, lower_weight=s.penalty_lower_weight, max_gamma=gamma)
  return dict(
    inner_steps=s.penalty_num_steps if method in _bilevel.PENALTY_METHODS else s.num_steps,
    inner_lr=s.inner_lr,
    solve_steps=s.num_steps,
    solve_lr=s.solve_lr,
    penalty=penalty,
    penalty_lr=s.penalty_lr,
  )


def meta_solver(s: Setting, method: str) -> kbeam_jax.Solver:
  """A bilevel method (``_bilevel.bilevel_solver``) on fresh tasks: ``step(state, pool)``
  draws a meta-batch, restarts its heads at zero (the penalty method's first take T
  descent steps on g) and takes one step of the method, keeping ``u`` and the upper
  optimizer's state."""
  f, g = fewshot.objectives(s.kind, l2=s.l2, feature_scale=s.feature_scale)
  sample = sampler(s, train=True)
  heads0 = fewshot.init_heads(s.meta_batch, s.sizes[-1], s.num_outputs)
  penalty = method in _bilevel.PENALTY_METHODS
  solver = _bilevel.bilevel_solver(method, f, g, bilevel_config(s, method), optax.adam(s.upper_lr))

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
  """The non-bilevel baseline: one shared head over all meta-train classes (classification)
  or one regressor over all tasks (regression), trained with ``u`` by Adam (one-player
  ``games.gradient_play``) on as many labelled examples per step as a meta-batch holds."""
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
  """``(u, pool, key) -> per-task metrics`` on ``batch`` held-out tasks, one jitted function
  per setting (traced once per pool shape): fitted heads (and nearest centroid for
  classification)."""
  sample = sampler(s, train=False)
  options = dict(num_outputs=s.num_outputs, l2=s.l2, feature_scale=s.feature_scale)

  @jax.jit
  def one(u, pool, key):
    ep = sample(key, pool, batch)
    head = fewshot.evaluate(s.kind, u, ep, inner_steps=EVAL_STEPS, inner_lr=s.inner_lr, **options)
    if s.kind == "regression":
      return {"head": head}
    centroid = fewshot.nearest_centroid_accuracy(
      u, ep, n_way=s.num_outputs, feature_scale=s.feature_scale
    )
    return {"head": head, "centroid": centroid}

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

  train: np.ndarray
  test: np.ndarray
  seen: np.ndarray


def pools(data_dir=None) -> Pools:
  train = data.load_mnist("train", data_dir)
  test = data.load_mnist("test", data_dir)
  return Pools(
    fewshot.class_pool(train.images, train.labels, range(5)).images,
    fewshot.class_pool(test.images, test.labels, range(5, 10)).images,
    fewshot.class_pool(test.images, test.labels, range(5)).images,
  )


@functools.cache
def chunk_program(s: Setting, method: str, chunk: int):
  """The method's ``Solver`` and ``(state, pool) -> (state, metrics)``, ``chunk`` of its
  steps by ``kbeam_jax.run``: jitted once per setting, method and chunk (seeds share it)."""
  solver = METHODS[method](s)
  return solver, jax.jit(lambda state, pool: kbeam_jax.run(solver.step, state, chunk, pool))


def run_one(
  s: Setting,
  method: str,
  seed: int,
  train_pool,
  test_pool,
  out_dir: Path,
  *,
  seen_pool=None,
  resume: bool = False,
  chunk: int = 100,
) -> tuple[dict[str, Any], list[float]]:
  """Trains one method and evaluates it on ``s.eval_tasks`` test tasks (and on tasks of the
  meta-train classes' unseen images, ``seen_pool``, when given). After every chunk the mean
  test metric over ``CURVE_TASKS`` tasks (the same tasks each time) joins the record's
  ``test_curve``: it shows when meta-training starts to hurt the unseen classes."""
  key_init, key_train, key_eval = jax.random.split(jax.random.key(seed), 3)
  u = fewshot.init_mlp(key_init, s.sizes)
  key_curve = jax.random.fold_in(key_eval, 1)
  test_metric = lambda u: float(np.mean(evaluate(s, u, test_pool, key_curve, CURVE_TASKS)["head"]))
  test_curve, curve = [(0, test_metric(u))], []
  timing = {"compile_s": 0.0, "chunk_s": 0.0}
  iterations = s.iterations if METHODS[method] else 0
  if iterations:
    chunk = min(chunk, iterations)
    num_chunks = -(-iterations // chunk)
    iterations = num_chunks * chunk
    solver, run_chunk = chunk_program(s, method, chunk)
    state, history, timing = _common.train_in_chunks(
      lambda state: run_chunk(state, train_pool),
      solver.init(key_train, u),
      num_chunks,
      checkpoint=out_dir / "fewshot_checkpoints" / f"{s.name}_{method}_{seed}",
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
    problem=s.name,
    method=method,
    seed=seed,
    iterations=iterations,
    train_seconds=timing["chunk_s"] * (iterations // chunk if iterations else 0),
    compile_seconds=timing["compile_s"],
    eval_seconds=eval_s,
    final_train_query_loss=curve[-1] if curve else None,
    test_curve=test_curve,
  )
  for name, values in metrics.items():
    record[f"{name}_mean"], record[f"{name}_ci95"] = fewshot.mean_ci95(values)
  return record, curve


def run_suite(
  out_dir: Path, *, quick: bool = False, seeds=(0,), resume: bool = False, data_dir=None
) -> list[dict[str, Any]]:
  from tqdm.auto import tqdm

  p = Pools(*(jnp.asarray(x) for x in pools(data_dir)))
  records, curves = [], {}
  jobs = [(s, m, seed) for s in settings(quick) for m in METHODS for seed in seeds]
  for s, method, seed in tqdm(jobs, desc="fewshot", unit="run"):
    seen = p.seen if s.kind == "classification" else None
    record, curve = run_one(
      s, method, seed, p.train, p.test, out_dir, seen_pool=seen, resume=resume
    )
    records.append(record)
    curves[(s.name, method, seed)] = curve
  meta = dict(
    seeds=list(seeds),
    quick=quick,
    eval_steps=EVAL_STEPS,
    settings=[s._asdict() for s in settings(quick)],
    published_maml_sine_mse=PUBLISHED_MAML_SINE,
    published_source="Li et al. 2017, Meta-SGD, Table 1 (MAML, one adaptation step)",
    environment=_common.environment(),
  )
  _fewshot_report.write(out_dir, records, meta, curves, CURVE_TASKS)
  return records


def main(args) -> None:
  """``python -m benchmarks fewshot``."""
  trials = args.trials or 1
  run_suite(
    args.out,
    quick=args.quick,
    seeds=tuple(args.seed + i for i in range(trials)),
    resume=args.resume,
  )
