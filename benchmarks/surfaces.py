"""The 2D-surface study of the K-beam paper (Hamm & Noh, ICML 2018, Table 1).

``python -m benchmarks surfaces [--quick] [--out results]``

Box ``|u|, |v| <= 0.5`` (projected after every step), step ``0.1/sqrt(t)`` for both
players (``optax.sgd`` with a schedule), 1000 iterations, 100 trials, ``u0`` and the
beams uniform in ``[-0.45, 0.45]``; GD and Alt-GD start from the first beam. Error
``|u_T - u*|``. Every method of one surface, all trials, runs as one jitted, vmapped
computation; each method is also compiled alone and timed (median of repeats) for its
``seconds``. The same study's published methods also run as a per-trial NumPy loop
(``benchmarks/numpy_reference.py``) for the wall-time comparison.

Writes ``surfaces.json``, ``surfaces.md`` and ``surfaces.png`` to the output folder.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import kbeam_jax
from benchmarks import _common, numpy_reference
from kbeam_jax import minimax
from kbeam_jax.tasks import surfaces

INIT_RANGE = 0.45
EPSILON = 0.01
QP_ITERS = 100
MAX_K = 10


class Method(NamedTuple):
  name: str
  family: str  # "gd", "alt_gd", "ogda", "extragradient" or "kbeam"
  K: int
  rule: str = "best"
  epsilon: float = 0.0


def methods() -> list[Method]:
  """The study's methods: the paper's six, optimistic GDA, extragradient, the ε-rules."""
  out = [
    Method("gd", "gd", 1),
    Method("alt_gd", "alt_gd", 1),
    Method("ogda", "ogda", 1),
    Method("extragradient", "extragradient", 1),
  ]
  out += [Method(f"kbeam_{K}", "kbeam", K) for K in (1, 2, 5, 10)]
  for rule in ("random", "min_norm", "kiwiel"):
    out += [Method(f"kbeam_{K}_{rule}", "kbeam", K, rule, EPSILON) for K in (2, 5, 10)]
  return out


def schedule(count: jax.Array) -> jax.Array:
  """``0.1 / sqrt(t)`` at iteration ``t = count + 1``."""
  return 0.1 / jnp.sqrt(count + 1.0)


def make_solver(surface: surfaces.Surface, method: Method) -> kbeam_jax.Solver:
  opt = optax.sgd(schedule)
  box = dict(project_u=surfaces.project, project_v=surfaces.project)
  if method.family == "kbeam":
    return minimax.kbeam(
      surface.f, opt, opt, rule=method.rule, epsilon=method.epsilon, qp_iters=QP_ITERS, **box
    )
  factory = {
    "gd": minimax.simultaneous_gda,
    "alt_gd": minimax.alternating_gda,
    "ogda": minimax.optimistic_gda,
    "extragradient": minimax.extragradient,
  }
  return factory[method.family](surface.f, opt, opt, **box)


def init_state(solver, method: Method, key, u0, beams0):
  if method.family == "kbeam":
    return solver.init(key, u0, beams0[: method.K], method.K)
  return solver.init(key, u0, beams0[0])


def final_u(surface: surfaces.Surface, method: Method, num_iters: int):
  """``(keys, u0, beams0) -> (u_T, v_T or beams_T)`` for all trials (vmapped), to be jitted.

  The followers are returned too, so that XLA cannot drop their updates from the timed
  computation when ``u_T`` happens not to depend on them (it does not on the saddle).
  """
  solver = make_solver(surface, method)

  def one_trial(key, u0, beams0):
    state = init_state(solver, method, key, u0, beams0)
    state, _ = kbeam_jax.run(solver.step, state, num_iters, trace=lambda s, i: None)
    return state.u, state.beams if method.family == "kbeam" else state.v

  return jax.vmap(one_trial)


def trajectories(surface: surfaces.Surface, num_iters: int, key, u0, beams0, K: int = 5):
  """The paths of trial 0 for the plot, starting points included: GD and Alt-GD
  ``(u, v)``, K-beam ``(u, beams)``."""

  def path(method, pick):
    solver = make_solver(surface, method)
    state = init_state(solver, method, key, u0, beams0)
    _, trace = kbeam_jax.run(solver.step, state, num_iters, trace=lambda s, i: pick(s))
    return jax.tree.map(lambda x0, xs: jnp.concatenate([x0[None], xs]), pick(state), trace)

  out = {m: path(Method(m, m, 1), lambda s: (s.u, s.v)) for m in ("gd", "alt_gd")}
  out[f"kbeam_{K}"] = path(Method(f"kbeam_{K}", "kbeam", K), lambda s: (s.u, s.beams))
  return out


def draw_inits(seed: int, trials: int):
  k_u, k_v, k_run = jax.random.split(jax.random.key(seed), 3)
  u0 = jax.random.uniform(k_u, (trials,), minval=-INIT_RANGE, maxval=INIT_RANGE)
  beams0 = jax.random.uniform(k_v, (trials, MAX_K), minval=-INIT_RANGE, maxval=INIT_RANGE)
  return jax.random.split(k_run, trials), u0, beams0


def run_study(
  out_dir: Path,
  *,
  trials: int,
  num_iters: int,
  seed: int = 0,
  repeats: int = 3,
  names: list[str] | None = None,
  numpy_baseline: bool = True,
) -> list[dict[str, Any]]:
  """Runs the study on every surface in ``names`` (default all), writes the reports."""
  names = names or list(surfaces.SURFACES)
  keys, u0, beams0 = draw_inits(seed, trials)
  all_methods = methods()
  records, timing, paths = [], [], {}
  for name in tqdm(names, desc="surfaces", unit="surface"):
    surface = surfaces.get(name)

    def study(keys, u0, beams0, surface=surface):
      return {m.name: final_u(surface, m, num_iters)(keys, u0, beams0)[0] for m in all_methods}

    start = time.perf_counter()
    finals = jax.block_until_ready(jax.jit(study)(keys, u0, beams0))
    study_seconds = time.perf_counter() - start

    per_method = {}
    for m in tqdm(all_methods, desc=f"  timing {name}", leave=False):
      _, compile_s, run_s = _common.compile_and_time(
        final_u(surface, m, num_iters), keys, u0, beams0, repeats=repeats
      )
      per_method[m.name] = (compile_s, run_s)

    for m in all_methods:
      err = np.abs(np.asarray(finals[m.name], np.float64) - surface.u_star)
      records.append(
        dict(
          surface=name,
          method=m.family if m.family != "kbeam" else f"kbeam_{m.rule}",
          name=m.name,
          K=m.K,
          rule=m.rule if m.family == "kbeam" else None,
          epsilon=m.epsilon,
          error_mean=float(err.mean()),
          error_std=float(err.std()),
          trials=trials,
          iterations=num_iters,
          seconds=per_method[m.name][1],
          compile_seconds=per_method[m.name][0],
        )
      )

    row = dict(surface=name, jax_study_seconds=study_seconds)
    if numpy_baseline:
      ks = (1, 2, 5, 10)
      subset = ["gd", "alt_gd"] + [f"kbeam_{K}" for K in ks]
      start = time.perf_counter()
      ref = numpy_reference.study(
        name, np.asarray(u0, np.float64), np.asarray(beams0, np.float64), num_iters, ks
      )
      row["numpy_seconds"] = time.perf_counter() - start
      row["jax_subset_run_seconds"] = sum(per_method[n][1] for n in subset)
      row["jax_subset_compile_seconds"] = sum(per_method[n][0] for n in subset)
      row["max_abs_diff_u"] = max(
        float(np.max(np.abs(ref[n] - np.asarray(finals[n], np.float64)))) for n in subset
      )
      row["numpy_error_means"] = {
        n: float(np.mean(np.abs(ref[n] - surface.u_star))) for n in subset
      }
    timing.append(row)
    paths[name] = jax.jit(lambda k, u, b, s=surface: trajectories(s, num_iters, k, u, b))(
      keys[0], u0[0], beams0[0]
    )

  meta = dict(
    trials=trials,
    iterations=num_iters,
    seed=seed,
    epsilon=EPSILON,
    qp_iters=QP_ITERS,
    step="0.1/sqrt(t)",
    box=surfaces.BOUND,
    environment=_common.environment(),
    timing=timing,
  )
  _common.write_json(out_dir / "surfaces.json", records, meta)
  (out_dir / "surfaces.md").write_text(markdown(records, meta))
  plot(paths, out_dir / "surfaces.png")
  return records


def markdown(records: list[dict[str, Any]], meta: dict[str, Any]) -> str:
  by = {(r["surface"], r["name"]): r for r in records}
  names = list(dict.fromkeys(r["surface"] for r in records))
  lines = [
    "# 2D minimax surfaces: error |u_T - u*| (mean ± std over "
    f"{meta['trials']} trials, {meta['iterations']} iterations)",
    "",
    "Ours beside the published value (Hamm & Noh, ICML 2018, Table 1) for the paper's "
    "methods; '-' where the paper has no figure.",
    "",
  ]
  header = ["surface"]
  for m in surfaces.PUBLISHED_METHODS:
    header += [f"{m} (ours)", f"{m} (paper)"]
  rows = []
  for s in names:
    row = [s]
    for i, m in enumerate(surfaces.PUBLISHED_METHODS):
      r = by[(s, m)]
      row.append(_common.mean_std(r["error_mean"], r["error_std"]))
      pub = surfaces.PUBLISHED.get(s)
      row.append(_common.mean_std(*pub[i]) if pub else "-")
    rows.append(row)
  lines += [_common.markdown_table(header, rows), ""]

  extra = [
    m for m in dict.fromkeys(r["name"] for r in records) if m not in surfaces.PUBLISHED_METHODS
  ]
  lines += [f"## Other methods (ε = {meta['epsilon']} for the ε-rules)", ""]
  rows = [
    [s] + [_common.mean_std(by[(s, m)]["error_mean"], by[(s, m)]["error_std"]) for m in extra]
    for s in names
  ]
  lines += [_common.markdown_table(["surface"] + extra, rows), ""]

  lines += [
    "## Wall time",
    "",
    "Seconds per method: median of repeated runs of that method alone, all trials "
    "vmapped, after compiling. `numpy` is the per-trial loop of "
    "`benchmarks/numpy_reference.py` for GD, Alt-GD and K-beam K = 1, 2, 5, 10; "
    "`jax run` is the sum of the same six methods' run times, `jax compile` their "
    "compile times; `jax study` is the whole surface (all methods, one jit) "
    "including its compilation.",
    "",
  ]
  rows = []
  for t in meta["timing"]:
    if "numpy_seconds" in t:
      rows.append(
        [
          t["surface"],
          f"{t['numpy_seconds']:.2f}",
          f"{t['jax_subset_run_seconds']:.3f}",
          f"{t['jax_subset_compile_seconds']:.2f}",
          f"{t['numpy_seconds'] / t['jax_subset_run_seconds']:.0f}x",
          f"{t['jax_study_seconds']:.2f}",
          f"{t['max_abs_diff_u']:.1e}",
        ]
      )
  if rows:
    lines += [
      _common.markdown_table(
        [
          "surface",
          "numpy (s)",
          "jax run (s)",
          "jax compile (s)",
          "speedup (run)",
          "jax study incl. compile (s)",
          "max |u_numpy - u_jax|",
        ],
        rows,
      ),
      "",
    ]
    total_np = sum(t["numpy_seconds"] for t in meta["timing"])
    total_jax = sum(t["jax_study_seconds"] for t in meta["timing"])
    lines += [
      f"Whole study: NumPy loop {total_np:.1f} s for the six published methods; "
      f"JAX {total_jax:.1f} s for all {len(extra) + 6} methods including "
      "compilation.",
      "",
    ]
  env = meta["environment"]
  lines += [f"Measured on {env['device']} ({env['backend']}), jax {env['jax']}.", ""]
  return "\n".join(lines)


def plot(paths: dict[str, Any], path: Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  n = len(paths)
  cols = min(3, n)
  rows = (n + cols - 1) // cols
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4 * rows), squeeze=False)
  grid = np.linspace(-surfaces.BOUND, surfaces.BOUND, 101)
  U, V = np.meshgrid(grid, grid, indexing="ij")
  for ax, (name, p) in zip(axes.flat, paths.items(), strict=False):
    s = surfaces.get(name)
    F = np.asarray(jax.vmap(jax.vmap(s.f))(jnp.asarray(U), jnp.asarray(V)))
    ax.contourf(U, V, F, levels=20, cmap="RdBu_r", alpha=0.6)
    for key, color in (("gd", "k"), ("alt_gd", "tab:orange")):
      u, v = (np.asarray(x) for x in p[key])
      ax.plot(u, v, color=color, lw=1, label=key)
    kname = next(k for k in p if k.startswith("kbeam"))
    u, beams = (np.asarray(x) for x in p[kname])
    for k in range(beams.shape[1]):
      ax.plot(
        u,
        beams[:, k],
        color="tab:green",
        lw=0.6,
        alpha=0.7,
        label=f"{kname} beams" if k == 0 else None,
      )
    ax.scatter(u[-1] * np.ones(beams.shape[1]), beams[-1], color="tab:green", zorder=3, s=15)
    ax.axvline(s.u_star, color="tab:purple", ls="--", lw=1, label="u*")
    ax.set(
      title=f"{name}: {s.formula}", xlabel="u", ylabel="v", xlim=(-0.52, 0.52), ylim=(-0.52, 0.52)
    )
  for ax in list(axes.flat)[n:]:
    ax.axis("off")
  axes.flat[0].legend(loc="lower left", fontsize=7)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(args) -> None:
  """``python -m benchmarks surfaces``: the full study, or seesaw and anti-saddle only."""
  run_study(
    args.out,
    trials=args.trials or (10 if args.quick else 100),
    num_iters=1000,
    seed=args.seed,
    repeats=1 if args.quick else 3,
    names=["seesaw", "anti_saddle"] if args.quick else None,
  )
