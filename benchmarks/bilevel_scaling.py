"""Time and memory of one hypergradient of each method vs T and vs the size of v, on a
separable problem (v up to 10^6) and a tanh MLP, with growth exponents fitted in log-log
beside the design's table, and jaxopt beside us (``_peers``).

``python -m benchmarks bilevel_scaling [--quick] [--out results]``

Writes ``bilevel_scaling.json``, ``.md`` and ``.png``; docs/pages/benchmarks/bilevel_scaling.md
has the results.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from benchmarks import _bilevel, _common, _peers
from kbeam_jax import bilevel

U, SOLVE_STEPS, INNER_LR = 4, 10, 0.4
PROBLEMS = ("separable", "mlp")
MLP_IN, MLP_N = 8, 64
# method: expected exponents (time in T, time in V, memory in T, memory in V), design table
EXPECTED = {
  "fmd": (1, 1, 0, 1), "rmd": (1, 1, 1, 1), "rmd_checkpoint": (1, 1, 0.5, 1),
  "approxgrad": (1, 1, 0, 1), "cg": (1, 1, 0, 1), "neumann": (1, 1, 0, 1),
}  # fmt: skip
METHODS = tuple(EXPECTED)


def problem(kind: str, V: int, seed: int = 0):
  """``(f, g, (u, v0, *data))`` with ``dim(v) = V`` (about V for the MLP)."""
  if kind == "mlp":
    return mlp_problem(V, seed)
  ka, kb = jax.random.split(jax.random.key(seed))
  a = jax.random.uniform(ka, (V,), minval=1.0, maxval=2.0)
  B = jax.random.normal(kb, (U, V)) / jnp.sqrt(V)
  g = lambda u, v, a, B: 0.5 * jnp.sum(a * v**2) + jnp.sum(jax.nn.softplus(v)) + u @ B @ v
  f = lambda u, v, a, B: 0.5 * jnp.sum((v - 1.0) ** 2) + 0.5 * jnp.sum(u**2)
  return f, g, (jnp.ones(U), jnp.zeros(V), a, B)


def mlp_problem(V: int, seed: int = 0):
  """A tanh network 8 -> H -> 1 as the inner problem, its weights ``v`` (``dim(v) ≈ V``);
  ``u`` scales the first 4 input features by ``exp(u)``; ``g`` the training loss plus
  ``1e-3|v|²``, ``f`` the validation loss."""
  H = max(1, V // (MLP_IN + 2))
  kx, ky, kv, kw = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(kx, (2, MLP_N, MLP_IN))
  y = jnp.sin(x[..., 0]) + 0.1 * jax.random.normal(ky, (2, MLP_N))
  v0 = jax.random.normal(kv, (H * (MLP_IN + 2) + 1,)) / jnp.sqrt(MLP_IN)

  def predict(u, v, xs):
    W1 = v[: MLP_IN * H].reshape(MLP_IN, H)
    b1 = v[MLP_IN * H : MLP_IN * H + H]
    w2, b2 = v[MLP_IN * H + H : -1], v[-1]
    scale = jnp.concatenate([jnp.exp(u), jnp.ones(MLP_IN - U)])
    return jnp.tanh((xs * scale[None, :]) @ W1 + b1[None, :]) @ w2 / jnp.sqrt(H) + b2

  g = lambda u, v, x, y: jnp.mean((predict(u, v, x[0]) - y[0]) ** 2) + 1e-3 * jnp.sum(v**2)
  f = lambda u, v, x, y: jnp.mean((predict(u, v, x[1]) - y[1]) ** 2)
  return f, g, (jnp.zeros(U), v0, x, y)


def measure(method: str, T: int, V: int, repeats: int, kind: str = "separable"):
  """Compiled time (run once, then the median of ``repeats``) and memory (XLA's compiled
  memory analysis) of one hypergradient of ``method`` on problem ``kind``."""
  f, g, args = problem(kind, V)
  method_ = _bilevel.bilevel_method(method, solve_steps=SOLVE_STEPS, solve_lr=0.2)
  hypergradient = lambda u, v, *data: (
    bilevel.hypergradient(f, g, u, v, *data, method=method_, inner_steps=T, inner_lr=INNER_LR).grad
  )
  compiled, compile_s = _common.compile_fn(hypergradient, *args)
  mem = compiled.memory_analysis()
  peak = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
  jax.block_until_ready(compiled(*args))
  seconds = _common.in_turns({method: lambda: compiled(*args)}, repeats)[method][0]
  return dict(
    problem=kind, method=method, T=T, V=int(args[1].size), V_target=V, U=U, seconds=seconds,
    compile_seconds=compile_s, peak_bytes=int(peak), temp_bytes=int(mem.temp_size_in_bytes),
  )  # fmt: skip


def slope(x, y) -> float:
  x, y = np.log(np.asarray(x, float)), np.log(np.maximum(np.asarray(y, float), 1e-12))
  return float(np.polyfit(x, y, 1)[0])


def run_suite(quick: bool, repeats: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """Both sweeps of every method on both problems (``quick``: the separable one), the fits
  and the peer rows."""
  Ts = (1, 10, 100) if quick else (1, 10, 100, 1000)
  Vs = (10, 1_000, 100_000) if quick else (10, 100, 1_000, 10_000, 100_000, 1_000_000)
  problems = ("separable",) if quick else PROBLEMS
  jobs = [(k, "T", m, T, 10_000) for k in problems for m in METHODS for T in Ts]
  jobs += [(k, "V", m, 10, V) for k in problems for m in METHODS for V in Vs]
  records = []
  for kind, sweep, method, T, V in tqdm(jobs, desc="bilevel_scaling", unit="run"):
    records.append(dict(measure(method, T, V, repeats, kind), sweep=sweep))
  fits = {}
  for k, m in ((k, m) for k in problems for m in METHODS):
    mine = [r for r in records if (r["problem"], r["method"]) == (k, m)]
    t = [r for r in mine if r["sweep"] == "T"][1:]  # fit over the larger sizes, where fixed
    v = [r for r in mine if r["sweep"] == "V"]  # overheads no longer dominate
    v = v[len(v) // 2 :]
    fit = lambda rs, x, y, plus=0: slope([r[x] for r in rs], [r[y] + plus for r in rs])
    fits[f"{k}/{m}"] = dict(
      time_T=fit(t, "T", "seconds"), time_V=fit(v, "V", "seconds"),
      memory_T=fit(t, "T", "temp_bytes", 1), memory_V=fit(v, "V", "peak_bytes"),
    )  # fmt: skip
  peer_repeats = max(repeats, 7)
  peer_jobs = [(k, V) for k in problems for V in Vs[-3:]]
  peers = [
    _peers.hypergradient_row(problem, 10, V, SOLVE_STEPS, INNER_LR, peer_repeats, k)
    for k, V in tqdm(peer_jobs, desc="bilevel_scaling peers (jaxopt)", unit="row")
  ]
  outer_V = 10_000 if quick else 100_000
  meta = dict(
    U=U, quick=quick, solve_steps=SOLVE_STEPS, problems=problems, Ts=Ts, Vs=Vs, fits=fits,
    jaxopt=[p for p in peers if p is not None], ridge=_peers.ridge_row(max(repeats, 21)),
    outer=_peers.outer_row(problem, outer_V, 10, SOLVE_STEPS, INNER_LR, 100, 0.5, peer_repeats),
    environment=_common.environment(),
  )  # fmt: skip
  return records, meta


QUICK_NOTE = (
  "**--quick:** the separable problem only, and the sweeps stop at T = 100 and V = 10^5, "
  "where a call's fixed cost (dispatch, small kernels) is still a large part of its time, "
  "so the time exponents come out well below their asymptotic values; they are not a test "
  "of them. The full run (`python -m benchmarks bilevel_scaling`: both problems, T up to "
  "1000, V up to 10^6) is.\n"
)


def markdown(records, meta) -> str:
  lines = [
    "# One hypergradient: time and peak memory vs T and vs dim(v)\n",
    f"u in R^{meta['U']}; implicit methods use {meta['solve_steps']} solve steps. "
    "Time: median after compiling. Memory: XLA compiled memory analysis. Problems: "
    "`separable` (strongly convex, diagonal Hessian), `mlp` (8 -> H -> 1 tanh network, "
    "dim(v) = 10H + 1).\n",
    "## Fitted growth exponents (the asymptotic exponent in parentheses)\n",
    "Least-squares slopes in log-log over T >= 10 and the upper half of the V sweep. "
    "Memory in T is fitted on the temporaries (the arguments do not grow with T).\n",
    *([QUICK_NOTE] if meta["quick"] else []),
  ]
  keys = ("time_T", "time_V", "memory_T", "memory_V")
  rows = [
    [k, m]
    + [f"{meta['fits'][f'{k}/{m}'][q]:.2f} ({e})" for q, e in zip(keys, EXPECTED[m], strict=True)]
    for k in meta["problems"]
    for m in METHODS
  ]
  header = ["problem", "method", "time ~ T^", "time ~ V^", "memory ~ T^", "memory ~ V^"]
  lines.append(_common.markdown_table(header, rows) + "\n")
  cell = lambda r: f"{r['seconds'] * 1e3:.2f} ms / {r['peak_bytes'] / 2**20:.2f} MiB"
  for k in meta["problems"]:
    for sweep, size, values, title in (
      ("T", "T", meta["Ts"], "vs T (V ≈ 10^4)"), ("V", "V_target", meta["Vs"], "vs V (T = 10)")
    ):  # fmt: skip
      by = {(r["method"], r[size]): r for r in records if (r["problem"], r["sweep"]) == (k, sweep)}
      columns = {"method": str} | {
        f"{sweep} = {x}": lambda m, x=x, by=by: cell(by[m, x]) for x in values
      }
      lines += [f"## {k}: time / peak memory {title}\n", _common.table(METHODS, columns) + "\n"]
  return "\n".join(lines + peer_markdown(meta) + [_bilevel.measured_on(meta)])


def peer_markdown(meta) -> list[str]:
  """The jaxopt comparisons: one hypergradient, the ridge example, the whole outer loop."""
  if not meta["jaxopt"]:
    return ['jaxopt is not installed: `pip install -e ".[peers]"` adds the peer timing.\n']
  ms = lambda k: lambda p: f"{p[f'{k}_seconds'] * 1e3:.2f}"
  error = lambda k: lambda p: f"{p[f'{k}_error']:.1e}"
  hypergradient = {
    "problem": lambda p: p["problem"], "V": lambda p: p["V"], "jaxopt (ms)": ms("jaxopt"),
    "ours CG (ms)": ms("cg"), "ours plain (ms)": ms("cg_plain"),
    "jaxopt / ours": lambda p: f"{p['jaxopt_seconds'] / p['cg_seconds']:.2f}",
    "jaxopt error": error("jaxopt"), "ours error": error("cg"),
    "ours plain error": error("cg_plain"),
  }  # fmt: skip
  r, o = meta["ridge"], meta["outer"]
  ridge = {
    "jaxopt": "jaxopt custom_root, closed form", "ours_closed_form": "ours, solve=closed form",
    "ours_lbfgs": "ours, inner=optax.lbfgs(), tol=1e-6",
    "ours_2000_steps": "ours, 2,000 gradient steps",
  }  # fmt: skip
  loops = {"jaxopt": "custom_root", "ours": "bilevel.solver"}
  return [
    "## Peer: jaxopt implicit differentiation (custom_root + CG), T = 10\n",
    f"The same inner loop; at most {meta['solve_steps']} CG iterations each (jaxopt runs "
    "all of them, ours stops at its tolerance 1e-6); ours with its minimum-norm fallback "
    "(the default, `CG(10)`) and plain (`CG(10, fallback=False)`). Errors: relative to the "
    "implicit hypergradient in float64 with 2,000 CG iterations. Times: medians of "
    "alternating runs.\n",
    _common.table(meta["jaxopt"], hypergradient) + "\n",
    f"## Peer: jaxopt's ridge example ({r['n']} × {r['d']}), d(validation loss)/d(l2)\n",
    "The lower problem solved in closed form (`solve=`), by L-BFGS, or by the fixed-T loop; "
    "the derivative by `CG(20)`. Error: against autodiff of the closed form in float64.\n",
    _common.table(ridge, {
      "forward solve": ridge.get, "ms": lambda k: ms(k)(r),
      "jaxopt / this": lambda k: f"{r['jaxopt_seconds'] / r[f'{k}_seconds']:.2f}",
      "relative error": lambda k: error(k)(r),
    }) + "\n",
    f"## Peer: the whole outer loop ({o['outer_steps']} SGD steps on u, separable, V = {o['V']})\n",
    f"Both warm-start v (T = {o['T']} steps from the previous answer); jaxopt's CG starts "
    "from 0 every step, ours from the previous adjoint; both stop at a relative residual of "
    f"1e-4. Upper loss f(u, v*(u)) from {o['start_loss']:.4f}.\n",
    _common.table(loops, {
      "loop": lambda k: f"{k} ({loops[k]})", "seconds": lambda k: f"{o[f'{k}_seconds']:.3f}",
      "final upper loss": lambda k: f"{o[f'{k}_loss']:.6f}",
    }) + "\n",
  ]  # fmt: skip


def plot(records, problems):
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(2, 2 * len(problems), figsize=(4.5 * 2 * len(problems), 7))
  panels = [(k, key) for k in problems for key in ("T", "V")]
  for (top, bottom), (k, key) in zip(axes.T, panels, strict=True):
    for m in METHODS:
      rs = [r for r in records if (r["problem"], r["method"], r["sweep"]) == (k, m, key)]
      rs = sorted(rs, key=lambda r: r[key])
      xs = [r[key] for r in rs]
      top.loglog(xs, [r["seconds"] for r in rs], "o-", label=m)
      bottom.loglog(xs, [r["peak_bytes"] for r in rs], "o-", label=m)
    top.set(title=f"{k}: vs {key}", xlabel=key, ylabel="seconds")
    bottom.set(xlabel=key, ylabel="peak bytes")
  axes[0, 0].legend(fontsize=7)
  fig.tight_layout()
  return fig


def main(args) -> None:
  """``python -m benchmarks bilevel_scaling``."""
  records, meta = run_suite(args.quick, repeats=1 if args.quick else 3)
  text, figure = markdown(records, meta), plot(records, meta["problems"])
  _common.publish(args.out, "bilevel_scaling", records, meta, text, figure)
