"""The minimax filter on GENKI (Hamm, JMLR 2017): keep expression, hide gender.

``python -m benchmarks privacy [--quick] [--trials N] [--iters N] [--resume] [--out results]``

Faces standardized with the training statistics; filters to d = 10 features (linear, and
a two-layer tanh network with 64 hidden units); utility classifier and adversary are
multiclass logistic regressions (L2 1e-3); objective ``min_{u,w} max_v -f_priv + ρ f_util``
full batch, solved by

* ``kbeam``: K = 5 adversary beams, rule ``best``, 5 Adam ascent steps (lr 1e-2) per
  beam per iteration, Adam (lr 1e-3) on the filter and utility classifier;
* ``kiwiel``: the same beams with Kiwiel's linearization rule (ε = 0.1) and its Armijo
  line search over an SGD step (lr 1e-2), as in the author's code;
* ``alt_gda``: one adversary, alternating descent-ascent (K-beam with K = 1).

Evaluation as the author's: fresh logistic regressions for expression and gender fitted
on the filtered training set (L-BFGS), test accuracy on the 200 test faces; also the
test accuracy of a stronger gender attacker (a two-layer network) the filter never saw.
Baselines: the unfiltered faces, PCA and a random projection to d = 10. Then a sweep of ρ.
Every training run is checkpointed after each block of iterations (``--resume``).

Writes ``privacy.json``, ``privacy.md`` and ``privacy.png``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import kbeam_jax
from benchmarks import _common
from kbeam_jax import data, minimax, nn
from kbeam_jax.tasks import privacy

DIM, K, RHO, BLOCK = 10, 5, 10.0, 500
SOLVERS = ("kbeam", "kiwiel", "alt_gda")
FILTERS = ("linear", "mlp")
RHOS = (0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
# The author's figures (data README): (expression, gender) test accuracy, d = 10, ρ = 10.
PUBLISHED = {
  "raw": (None, None),
  "random": (0.705, 0.705),
  "pca": (0.84, 0.665),
  "ppls": (0.85, 0.685),
  "linear": (0.825, 0.52),
  "mlp": (0.88, 0.66),
}


def load(data_dir: str | None = None) -> dict[str, jax.Array]:
  g = data.load_genki(data_dir)
  x_train, x_test = privacy.standardize(jnp.asarray(g.x_train), jnp.asarray(g.x_test))
  return {
    "x_train": x_train,
    "x_test": x_test,
    **{k: jnp.asarray(getattr(g, k)) for k in g._fields if not k.startswith("x_")},
  }


def filter_module(kind: str, seed: int) -> nnx.Module:
  rngs = nnx.Rngs(seed)
  if kind == "linear":
    return privacy.LinearFilter(256, DIM, rngs)
  if kind == "mlp":
    return privacy.MLPFilter(256, DIM, rngs)
  raise KeyError(f"unknown filter {kind!r}; known: {', '.join(FILTERS)}.")


def evaluate(features, d: dict[str, jax.Array], key: jax.Array) -> dict[str, float]:
  """Retrained test accuracies on the filtered data (the author's protocol + an MLP attacker)."""
  z_train, z_test = features(d["x_train"]), features(d["x_test"])
  acc = jax.jit(privacy.retrain_accuracy)
  mlp = jax.jit(privacy.retrain_mlp_accuracy)
  return {
    "expression": float(acc(z_train, d["expression_train"], z_test, d["expression_test"])),
    "gender": float(acc(z_train, d["gender_train"], z_test, d["gender_test"])),
    "gender_mlp": float(mlp(z_train, d["gender_train"], z_test, d["gender_test"], key)),
  }


def train_filter(
  kind: str,
  solver_name: str,
  rho: float,
  seed: int,
  d: dict[str, jax.Array],
  num_iters: int,
  checkpoint: Path | None = None,
  resume: bool = False,
) -> tuple[Any, dict[str, Any]]:
  """Trains one filter; returns ``(features_fn, info)``."""
  fdef, filt = nnx.split(filter_module(kind, seed), nnx.Param)
  cdef, w = nnx.split(privacy.LogisticRegression(DIM, 2, nnx.Rngs(seed + 1)), nnx.Param)
  u = {"filter": nnx.as_pure(filt), "utility": nnx.as_pure(w)}
  num_beams = 1 if solver_name == "alt_gda" else K
  _, beams = nn.stack_modules(
    lambda rngs: privacy.LogisticRegression(DIM, 2, rngs), jax.random.key(seed + 2), num_beams
  )
  f = privacy.objective(fdef, cdef, rho)
  follower = optax.adam(1e-2)
  if solver_name == "kiwiel":
    solver = minimax.kbeam(f, optax.sgd(1e-2), follower, rule=minimax.Kiwiel(0.1), ascent_steps=5)
  elif solver_name in ("kbeam", "alt_gda"):
    solver = minimax.kbeam(f, optax.adam(1e-3), follower, ascent_steps=5)
  else:
    raise KeyError(f"unknown solver {solver_name!r}; known: {', '.join(SOLVERS)}.")
  state = solver.init(jax.random.key(seed + 3), u, beams, num_beams)
  args = (d["x_train"], d["expression_train"], d["gender_train"])
  block = _common.chunk_length(num_iters, BLOCK)

  @jax.jit
  def chunk(state):
    state, info = kbeam_jax.run(solver.step, state, block, *args)
    return state, {"max_value": jnp.max(info.values[-1]), "certificate": info.certificate[-1]}

  state, history, timing = _common.train_in_chunks(
    chunk,
    state,
    num_iters // block,
    checkpoint=checkpoint,
    resume=resume,
    desc=f"{kind}/{solver_name}/ρ={rho:g}/seed {seed}",
  )
  features = lambda x: nnx.merge(fdef, state.u["filter"])(x)
  return features, {"history": history, "train_s": timing["run_s"]}


def run_suite(
  out_dir: Path,
  *,
  trials: int = 3,
  num_iters: int = 2000,
  seed: int = 0,
  rhos: tuple[float, ...] = RHOS,
  solvers: tuple[str, ...] = SOLVERS,
  resume: bool = False,
  data_dir: str | None = None,
) -> list[dict[str, Any]]:
  d = load(data_dir)
  key = jax.random.key(seed)
  records = []
  raw = evaluate(lambda x: x, d, key)
  records.append({"filter": "raw", "solver": "-", "rho": None, "seed": seed, **raw})
  records.append(
    {
      "filter": "pca",
      "solver": "-",
      "rho": None,
      "seed": seed,
      **evaluate(lambda x: x @ privacy.pca_filter(d["x_train"], DIM), d, key),
    }
  )
  for t in range(trials):
    U = privacy.random_filter(jax.random.key(seed + 100 + t), 256, DIM)
    records.append(
      {
        "filter": "random",
        "solver": "-",
        "rho": None,
        "seed": seed + t,
        **evaluate(lambda x, U=U: x @ U, d, key),
      }
    )
  ckpt = lambda name: out_dir / "checkpoints" / f"privacy_{name}"
  for kind in FILTERS:
    for solver_name in solvers:
      for t in range(trials):
        s = seed + 10 * t
        features, info = train_filter(
          kind, solver_name, RHO, s, d, num_iters, ckpt(f"{kind}_{solver_name}_{RHO:g}_{s}"), resume
        )
        records.append(
          {
            "filter": kind,
            "solver": solver_name,
            "rho": RHO,
            "seed": s,
            **evaluate(features, d, key),
            **info,
          }
        )
    for rho in rhos:
      if rho == RHO:
        continue
      features, info = train_filter(
        kind, "kbeam", rho, seed, d, num_iters, ckpt(f"{kind}_kbeam_{rho:g}_{seed}"), resume
      )
      records.append(
        {
          "filter": kind,
          "solver": "kbeam",
          "rho": rho,
          "seed": seed,
          **evaluate(features, d, key),
          **info,
        }
      )
  meta = {
    "trials": trials,
    "num_iters": num_iters,
    "seed": seed,
    "dim": DIM,
    "K": K,
    "rho": RHO,
    "rhos": list(rhos),
    "environment": _common.environment(),
  }
  _common.write_json(out_dir / "privacy.json", records, meta)
  report(records, out_dir, meta)
  plot(records, out_dir)
  return records


def _summary(records: list[dict[str, Any]], key: str) -> str:
  x = np.array([r[key] for r in records])
  return f"{x.mean():.3f} ± {x.std():.3f}" if len(x) > 1 else f"{x.mean():.3f}"


def report(records: list[dict[str, Any]], out_dir: Path, meta: dict[str, Any]) -> str:
  groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
  for r in records:
    if r["rho"] in (None, RHO):
      groups.setdefault((r["filter"], r["solver"]), []).append(r)
  pub = lambda x: "-" if x is None else f"{x:.3f}"
  rows = []
  for (kind, solver_name), rs in groups.items():
    published = PUBLISHED.get(kind, (None, None)) if solver_name in ("-", "kiwiel") else (None,) * 2
    rows.append(
      [
        kind,
        solver_name,
        len(rs),
        _summary(rs, "expression"),
        pub(published[0]),
        _summary(rs, "gender"),
        pub(published[1]),
        _summary(rs, "gender_mlp"),
      ]
    )
  rows.append(["private PLS", "-", "-", "not run", "0.850", "not run", "0.685", "-"])
  sweep = sorted(
    (r for r in records if r["solver"] == "kbeam" and r["seed"] == meta["seed"]),
    key=lambda r: (r["filter"], r["rho"]),
  )
  sweep_rows = [
    [
      r["filter"],
      f"{r['rho']:g}",
      f"{r['expression']:.3f}",
      f"{r['gender']:.3f}",
      f"{r['gender_mlp']:.3f}",
    ]
    for r in sweep
  ]
  text = "\n\n".join(
    [
      f"# Minimax filter on GENKI (d = {DIM}, ρ = {RHO:g}, {meta['num_iters']} iterations, "
      f"{meta['trials']} seeds)",
      "Test accuracy of classifiers retrained on the filtered training set. Expression: "
      "higher is better; gender: nearer 0.5 (chance) is better. 'published' = Hamm, JMLR "
      "2017 (the data README); the published minimax rows were solved with Kiwiel's method.",
      _common.markdown_table(
        [
          "filter",
          "solver",
          "runs",
          "expression",
          "published",
          "gender (logistic)",
          "published",
          "gender (MLP attacker)",
        ],
        rows,
      ),
      "Sweep of ρ (K-beam, one seed):",
      _common.markdown_table(["filter", "ρ", "expression", "gender", "gender (MLP)"], sweep_rows),
    ]
  )
  (out_dir / "privacy.md").write_text(text + "\n")
  return text


def plot(records: list[dict[str, Any]], out_dir: Path) -> None:
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4.5))
  for kind, marker in (("linear", "o"), ("mlp", "s")):
    rs = sorted(
      (r for r in records if r["filter"] == kind and r["solver"] == "kbeam"), key=lambda r: r["rho"]
    )
    by_rho: dict[float, list[dict[str, Any]]] = {}
    for r in rs:
      by_rho.setdefault(r["rho"], []).append(r)
    g = [np.mean([r["gender"] for r in v]) for v in by_rho.values()]
    e = [np.mean([r["expression"] for r in v]) for v in by_rho.values()]
    ax.plot(g, e, marker=marker, label=f"ours, {kind} filter (K-beam), ρ sweep")
    for rho, gi, ei in zip(by_rho, g, e, strict=True):
      ax.annotate(f"ρ={rho:g}", (gi, ei), fontsize=7, xytext=(3, 3), textcoords="offset points")
  for name, (e, g) in PUBLISHED.items():
    if e is not None:
      ax.scatter([g], [e], marker="x", color="gray")
      ax.annotate(
        f"published {name}",
        (g, e),
        fontsize=7,
        color="gray",
        xytext=(3, -9),
        textcoords="offset points",
      )
  for name in ("raw", "pca"):
    r = next(r for r in records if r["filter"] == name)
    ax.scatter([r["gender"]], [r["expression"]], marker="^", color="black")
    ax.annotate(
      f"ours {name}",
      (r["gender"], r["expression"]),
      fontsize=7,
      xytext=(3, 3),
      textcoords="offset points",
    )
  ax.axvline(0.5, color="gray", lw=0.5, ls="--")
  ax.set(
    xlabel="gender accuracy (private, lower is better)",
    ylabel="expression accuracy (utility)",
    title="Privacy-utility trade-off on GENKI",
  )
  ax.legend(fontsize=7, loc="lower right")
  _common.save_figure(fig, out_dir / "privacy.png")


def main(args) -> None:
  """``python -m benchmarks privacy``; ``--quick``: one seed, 500 iterations, ρ in {1, 10}."""
  run_suite(
    args.out,
    trials=args.trials or (1 if args.quick else 3),
    num_iters=args.iters or (500 if args.quick else 2000),
    seed=args.seed,
    rhos=(1.0, 10.0) if args.quick else RHOS,
    resume=args.resume,
  )
