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

Methods, each training ``u`` with Adam on fresh meta-batches (heads start at zero for
every meta-batch: the tasks are new):

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
nearest-centroid accuracy on the same representation. Training runs in compiled chunks
with a progress bar (``--resume`` continues from the checkpoints in ``--out``); wall time
is the steady per-chunk time times the number of chunks, compilation reported apart.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import _common
from kbeam_jax import bilevel, data
from kbeam_jax.tasks import fewshot

METHODS = ("gd", "rmd", "approxgrad", "penalty", "joint", "untrained")
BILEVEL = ("gd", "rmd", "approxgrad", "penalty")  # through _common.bilevel_solver

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
  ev = 40 if quick else 600
  mnist = dict(
    kind="classification",
    sizes=(784, 256, 64),
    num_outputs=5,
    num_query=15,
    eval_query=15,
    meta_batch=4 if quick else 16,
    eval_tasks=ev,
    l2=0.01,
    feature_scale=3.0,
    num_steps=10,
    inner_lr=0.5,
    solve_lr=0.1,
    upper_lr=1e-3,
    penalty_lr=0.5,
    penalty_gamma=0.06,  # ≈ 1 / meta_batch of the full run: see the note above
    penalty_lower_weight=0.0,
    penalty_num_steps=10,
  )
  sine = dict(
    kind="regression",
    sizes=(1, 40, 40),
    num_outputs=1,
    eval_query=100,
    meta_batch=25,
    eval_tasks=ev,
    l2=1e-3,
    feature_scale=1.0,
    num_steps=10,
    inner_lr=0.5,
    solve_lr=0.1,
    upper_lr=1e-3,
    penalty_lr=1.0,
    penalty_gamma=0.01,  # see the note above
    penalty_lower_weight=0.0,
    penalty_num_steps=10,
  )
  return [
    Setting("mnist-5w1s", k_shot=1, iterations=it(1000), **mnist),
    Setting("mnist-5w5s", k_shot=5, iterations=it(1000), **mnist),
    Setting("sine-5shot", k_shot=5, num_query=5, iterations=it(4000), **sine),
    Setting("sine-10shot", k_shot=10, num_query=10, iterations=it(4000), **sine),
  ]


def sampler(s: Setting, *, train: bool):
  """``(key, pool) -> Episodes`` for the setting (``pool`` unused for regression)."""
  query = s.num_query if train else s.eval_query

  def sample(key, pool, num_tasks):
    if s.kind == "classification":
      return fewshot.sample_classification(
        key, pool, num_tasks=num_tasks, n_way=s.num_outputs, k_shot=s.k_shot, num_query=query
      )
    return fewshot.sample_sinusoid(key, num_tasks=num_tasks, k_shot=s.k_shot, num_query=query)

  return sample


class Trainer(NamedTuple):
  init: Any  # (u, key) -> state
  step: Any  # (state, pool) -> (state, metrics)
  params: Any  # state -> u


def bilevel_config(s: Setting) -> dict[str, Any]:
  """This suite's settings in the shape of ``_common.bilevel_solver``'s config; the penalty
  method's γ is fixed at γ_0 (fresh tasks every step: no schedule to carry)."""
  gamma = s.penalty_gamma
  return dict(
    inner_steps=s.num_steps,
    inner_lr=s.inner_lr,
    solve_steps=s.num_steps,
    solve_lr=s.solve_lr,
    penalty=dict(gamma=gamma, epsilon=1.0, lower_weight=s.penalty_lower_weight, max_gamma=gamma),
    penalty_lr=s.penalty_lr,
  )


def trainer(s: Setting, method: str) -> Trainer:
  """The training loop's pieces for one method; ``step`` draws a fresh meta-batch."""
  f, g = fewshot.objectives(s.kind, l2=s.l2, feature_scale=s.feature_scale)
  sample = sampler(s, train=True)
  heads0 = fewshot.init_heads(s.meta_batch, s.sizes[-1], s.num_outputs)
  opt = optax.adam(s.upper_lr)

  if method == "joint":

    def init(u, key):
      k1, key = jax.random.split(key)
      out = s.num_outputs if s.kind == "regression" else joint_classes(s)
      head = {
        "w": jax.random.normal(k1, (s.sizes[-1], out)) * 0.01,
        "b": jnp.zeros((out,)),
      }
      params = (u, head)
      return params, opt.init(params), key

    def loss(params, ep, labels):
      u, head = params
      z = fewshot.features(u, ep, s.feature_scale)
      out = z @ head["w"] + head["b"][None, :]
      if s.kind == "classification":
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(out), labels[:, None], 1))
      return jnp.mean((out[:, 0] - labels) ** 2)

    def step(state, pool):
      params, opt_state, key = state
      key, sub = jax.random.split(key)
      x, y = joint_batch(s, sub, pool)
      value, grad = jax.value_and_grad(loss)(params, x, y)
      updates, opt_state = opt.update(grad, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state, key), {"query_loss": value}

    return Trainer(init, step, lambda state: state[0][0])

  penalty = method in _common.PENALTY_METHODS
  cfg = bilevel_config(s)
  if penalty:
    cfg["inner_steps"] = s.penalty_num_steps
  solver = _common.bilevel_solver(method, f, g, cfg, opt)

  def init(u, key):
    return solver.init(key, u, heads0), key

  def step(state, pool):
    st, key = state
    key, sub = jax.random.split(key)
    ep = sample(sub, pool, s.meta_batch)
    heads = heads0
    if penalty:  # the heads of fresh tasks first descend on g, then on the penalized L
      heads = bilevel.argmin(
        g, st.u, heads0, ep, method=bilevel.Naive(), inner_steps=s.num_steps, inner_lr=s.inner_lr
      )
    # Fresh tasks: restart the lower level, keep the upper optimizer's state.
    st = solver.init(sub, st.u, heads)._replace(upper_state=st.upper_state, count=st.count)
    st, info = solver.step(st, ep)
    metrics = {"query_loss": info.value}
    if penalty:
      metrics["gamma"] = info.gamma
    return (st, key), metrics

  return Trainer(init, step, lambda state: state[0].u)


def joint_classes(s: Setting) -> int:
  return 20  # digits 0-4, four rotations each


def joint_batch(s: Setting, key, pool):
  """The non-bilevel baseline's batch: as many labelled examples as one meta-batch holds."""
  if s.kind == "classification":
    n = s.meta_batch * s.num_outputs * (s.k_shot + s.num_query)
    kc, ki = jax.random.split(key)
    c = jax.random.randint(kc, (n,), 0, pool.shape[0])
    i = jax.random.randint(ki, (n,), 0, pool.shape[1])
    x = pool[c, i].reshape(n, -1).astype(jnp.float32) / 255.0
    return x, c
  ep = fewshot.sample_sinusoid(key, num_tasks=s.meta_batch, k_shot=s.k_shot, num_query=s.num_query)
  x = jnp.concatenate([ep.support_x, ep.query_x], axis=1).reshape(-1, 1)
  y = jnp.concatenate([ep.support_y, ep.query_y], axis=1).reshape(-1)
  return x, y


@functools.cache
def evaluator(s: Setting, batch: int = 100):
  """``(u, pool, key) -> per-task metrics`` on ``batch`` held-out tasks, one jitted function
  per setting (traced once per pool shape): fitted heads (and nearest centroid for
  classification)."""
  sample = sampler(s, train=False)

  @jax.jit
  def one(u, pool, key):
    ep = sample(key, pool, batch)
    out = {
      "head": fewshot.evaluate(
        s.kind,
        u,
        ep,
        num_outputs=s.num_outputs,
        l2=s.l2,
        inner_steps=EVAL_STEPS,
        inner_lr=s.inner_lr,
        feature_scale=s.feature_scale,
      )
    }
    if s.kind == "classification":
      out["centroid"] = fewshot.nearest_centroid_accuracy(
        u, ep, n_way=s.num_outputs, feature_scale=s.feature_scale
      )
    return out

  return one


def evaluate(s: Setting, u, pool, key, num_tasks: int, batch: int = 100) -> dict[str, Any]:
  """Per-task metrics on ``num_tasks`` held-out tasks, fitted heads (and nearest centroid)."""
  one = evaluator(s, batch)
  keys = jax.random.split(key, -(-num_tasks // batch))
  parts = [one(u, pool, k) for k in keys]
  return {m: np.concatenate([np.asarray(p[m]) for p in parts])[:num_tasks] for m in parts[0]}


EVAL_STEPS = 200
CURVE_TASKS = 200  # test tasks behind each point of the test curve (every chunk)


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
  u0 = fewshot.init_mlp(key_init, s.sizes)
  t = trainer(s, "gd" if method == "untrained" else method)  # untrained: never stepped
  state = t.init(u0, key_train)
  timing = {"compile_s": 0.0, "chunk_s": 0.0, "run_s": 0.0}
  curve: list[float] = []
  iterations = 0 if method == "untrained" else s.iterations
  key_curve = jax.random.fold_in(key_eval, 1)
  test_metric = lambda u: float(np.mean(evaluate(s, u, test_pool, key_curve, CURVE_TASKS)["head"]))
  test_curve = [(0, test_metric(u0))]
  if iterations:
    chunk = min(chunk, iterations)
    num_chunks = -(-iterations // chunk)
    iterations = num_chunks * chunk

    @jax.jit
    def run_chunk(state, pool):
      return jax.lax.scan(lambda st, _: t.step(st, pool), state, length=chunk)

    state, history, timing = _common.train_in_chunks(
      lambda st: run_chunk(st, train_pool),
      state,
      num_chunks,
      checkpoint=out_dir / "fewshot_checkpoints" / f"{s.name}_{method}_{seed}",
      resume=resume,
      desc=f"{s.name} {method}",
      after_chunk=lambda st: {"test_metric": test_metric(t.params(st))},
    )
    curve = [float(np.mean(h["query_loss"])) for h in history]
    # (a checkpoint written before test curves existed has none: those points are left out)
    test_curve += [
      ((i + 1) * chunk, h["test_metric"]) for i, h in enumerate(history) if "test_metric" in h
    ]
  start = time.perf_counter()
  metrics = evaluate(s, t.params(state), test_pool, key_eval, s.eval_tasks)
  eval_s = time.perf_counter() - start
  if seen_pool is not None:
    seen = evaluate(s, t.params(state), seen_pool, key_eval, s.eval_tasks)
    metrics["seen_head"] = seen["head"]
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
  _common.write_json(out_dir / "fewshot.json", records, meta)
  (out_dir / "fewshot.md").write_text(markdown(records, meta))
  plot(curves, records, out_dir / "fewshot.png")
  return records


def _cell(records, problem, method, metric, scale=1.0):
  rs = [r for r in records if (r["problem"], r["method"]) == (problem, method)]
  if not rs or f"{metric}_mean" not in rs[0]:
    return "-"
  mean = np.mean([r[f"{metric}_mean"] for r in rs]) * scale
  ci = np.mean([r[f"{metric}_ci95"] for r in rs]) * scale
  return f"{mean:.3f} ± {ci:.3f}" if scale == 1.0 else f"{mean:.1f} ± {ci:.1f}"


def _mean_test_curve(rs) -> tuple[list[int], np.ndarray]:
  """Iterations and the seeds' mean of the records' ``test_curve``."""
  its = [i for i, _ in rs[0]["test_curve"]]
  return its, np.mean([[v for _, v in r["test_curve"]] for r in rs], axis=0)


def _curve_cell(rs, accuracy: bool) -> str:
  """``start → best (at iteration) → end`` of the seeds' mean test curve."""
  its, values = _mean_test_curve(rs)
  best = int(np.argmax(values) if accuracy else np.argmin(values))
  fmt = (lambda v: f"{100 * v:.1f}") if accuracy else (lambda v: f"{v:.3f}")
  return f"{fmt(values[0])} → {fmt(values[best])} ({its[best]}) → {fmt(values[-1])}"


def markdown(records, meta) -> str:
  names = [s["name"] for s in meta["settings"]]
  mnist = [n for n in names if n.startswith("mnist")]
  sine = [n for n in names if n.startswith("sine")]
  lines = [
    "# Few-shot learning: shared representation (upper), per-task linear heads (lower)",
    "",
    f"Seeds {meta['seeds']}; heads fitted by {meta['eval_steps']} descent steps on each "
    "test task's support set; ± is the 95% interval over test tasks (mean of the seeds' "
    "intervals).",
    "",
    "## MNIST N-way K-shot: query accuracy (%) on digits 5-9 (with rotations)",
    "",
  ]
  header = ["method"]
  for n in mnist:
    header += [f"{n} head", f"{n} centroid", f"{n} seen classes"]
  rows = []
  for m in METHODS:
    row = [m]
    for n in mnist:
      row += [
        _cell(records, n, m, "head", 100.0),
        _cell(records, n, m, "centroid", 100.0),
        _cell(records, n, m, "seen_head", 100.0),
      ]
    rows.append(row)
  lines += [
    _common.markdown_table(header, rows),
    "",
    '"seen classes": the same head accuracy on tasks drawn from digits 0-4 of the test '
    "file, i.e. the meta-train classes on images never trained on.",
    "",
  ]
  lines += ["## Sinusoid regression: query mean squared error (100 points per task)", ""]
  header = ["method"] + sine
  rows = [[m] + [_cell(records, n, m, "head") for n in sine] for m in METHODS]
  published = meta["published_maml_sine_mse"]
  rows.append(
    [f"MAML, published ({meta['published_source']})"]
    + [str(published.get(int(n.split("-")[1].removesuffix("shot")), "-")) for n in sine]
  )
  lines += [_common.markdown_table(header, rows), ""]
  lines += [
    f"## Test metric during meta-training ({CURVE_TASKS} fixed test tasks after every chunk)",
    "",
    "Accuracy (%) for MNIST, MSE for the sinusoid: at the start, at its best (iteration) "
    "and at the end.",
    "",
  ]
  header = ["method"] + names
  rows = []
  for m in BILEVEL + ("joint",):
    row = [m]
    for n in names:
      rs = [r for r in records if (r["problem"], r["method"]) == (n, m)]
      row.append(_curve_cell(rs, n.startswith("mnist")) if rs else "-")
    rows.append(row)
  lines += [_common.markdown_table(header, rows), ""]
  lines += ["## Wall time (s): training (compilation apart) / evaluation", ""]
  header = ["method"] + names
  rows = []
  for m in METHODS:
    row = [m]
    for n in names:
      rs = [r for r in records if (r["problem"], r["method"]) == (n, m)]
      row.append(
        f"{np.mean([r['train_seconds'] for r in rs]):.1f} "
        f"(+{np.mean([r['compile_seconds'] or 0.0 for r in rs]):.1f}) / "
        f"{np.mean([r['eval_seconds'] for r in rs]):.1f}"
        if rs
        else "-"
      )
    rows.append(row)
  lines += [_common.markdown_table(header, rows), ""]
  env = meta["environment"]
  lines += [f"Measured on {env['device']} ({env['backend']}), jax {env['jax']}.", ""]
  return "\n".join(lines)


def plot(curves, records, path: Path) -> None:
  """Top: training query loss per chunk; bottom: the test metric during meta-training."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  problems = sorted({p for p, _, _ in curves})
  fig, axes = plt.subplots(2, len(problems), figsize=(5.2 * len(problems), 7), squeeze=False)
  for j, problem in enumerate(problems):
    top, bottom = axes[0, j], axes[1, j]
    for method in METHODS:
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
  axes[0, 0].legend(fontsize=7)
  axes[1, 0].legend(fontsize=7)
  _common.save_figure(fig, path)


def main(args) -> None:
  """``python -m benchmarks fewshot``."""
  trials = args.trials or 1
  run_suite(
    args.out,
    quick=args.quick,
    seeds=tuple(args.seed + i for i in range(trials)),
    resume=args.resume,
  )
