"""The surfaces suite's report (``markdown``: ours beside Table 1 of the paper, the other
methods, the long-run means per protocol, the wall time beside the NumPy loop) and figure
(``plot``: trial 0's paths); the report reads only what ``surfaces.json`` holds."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import _common
from kbeam_jax.tasks import surfaces

Records = list[dict[str, Any]]
# The authors' NumPy code, 100 trials, measured on this machine (not here).
AUTHORS_SECONDS_PER_SURFACE = 118.0


def markdown(records: Records, meta: dict[str, Any]) -> str:
  six, t, env = surfaces.PUBLISHED_METHODS, meta["timing"], meta["environment"]
  names = list(dict.fromkeys(r["surface"] for r in records))
  extra = [m for m in dict.fromkeys(r["name"] for r in records) if m not in six]
  ours = {
    (r["surface"], r["name"]): _common.mean_std(r["error_mean"], r["error_std"]) for r in records
  }
  pub = lambda s, m: (
    _common.mean_std(*surfaces.PUBLISHED[s][six.index(m)]) if s in surfaces.PUBLISHED else "-"
  )
  header = ["surface"] + [f"{m} ({who})" for m in six for who in ("ours", "paper")]
  main = [[s] + [c for m in six for c in (ours[s, m], pub(s, m))] for s in names]
  parts = [
    f"# 2D minimax surfaces: error |u_T - u*| (mean ± std over {meta['trials']} trials, "
    f"{meta['iterations']} updates, protocol '{meta['protocols'][0]}')",
    "Ours beside the published value (Hamm & Noh, ICML 2018, Table 1) for the paper's "
    "methods; '-' where the paper has no figure.",
    _common.markdown_table(header, main),
  ]
  if extra:
    rows = [[s] + [ours[s, m] for m in extra] for s in names]
    parts += [f"## Other methods (ε = {meta['epsilon']} for the ε-rules)"]
    parts += [_common.markdown_table(["surface"] + extra, rows)]
  for proto in meta["protocols"]:
    if rows := [r for r in meta["protocol_tables"] if r["protocol"] == proto]:
      n, block, blocks = rows[0]["long_trials"], rows[0]["block_trials"], rows[0]["blocks"]
      header = ["surface", "method", f"{n:,}-trial mean", "block means min / median / max",
                "blocks <= published", "published"]  # fmt: skip
      cells = [
        [r["surface"], r["name"], f"{r['long_error_mean']:.3f}",
         " / ".join(f"{r[f'block_mean_{k}']:.3f}" for k in ("min", "median", "max")),
         f"{r['blocks_at_or_below_published']} of {r['blocks']}", f"{r['published']:.3f}"]
        for r in rows
      ]  # fmt: skip
      parts += [
        f"## Protocol '{proto}': {n:,}-trial means and the spread of {block}-trial means",
        f"Each cell: mean over {n:,} trials / the {blocks} means of {block} trials (min, "
        "median, max) / how many of those means are at or below the published mean / "
        "published.",
        _common.markdown_table(header, cells),
      ]
  compiled = ", ".join(f"{k} {v:.2f} s" for k, v in t["compile_seconds"].items())
  parts += [
    "## Wall time\n\n"
    f"JAX: {t['jax_seconds']:.2f} s for {len(names)} surfaces × {len(six) + len(extra)} "
    f"methods × {meta['trials']} trials, compilation of {t['programs']} programs included "
    f"({compiled}; compilation cache: {meta['compilation_cache'] or 'off'})"
    + ("" if meta["paper"] else ", per-method timing repeats included") + "."
  ]  # fmt: skip
  if "numpy_seconds" in t:
    parts += _numpy(names, t, meta["paper"])
  parts += [f"Measured on {env['device']} ({env['backend']}), jax {env['jax']}."]
  return "\n\n".join(parts) + "\n"


def _numpy(names: list[str], t: dict[str, Any], paper: bool) -> list[str]:
  total, jax_s = sum(t["numpy_seconds"].values()), t["jax_seconds"]
  authors = AUTHORS_SECONDS_PER_SURFACE * len(names)
  header = ["surface", "numpy (s)", "jax, six methods, compiled (s)", "max |u_numpy - u_jax|"]
  cells = [
    [s, f"{t['numpy_seconds'][s]:.2f}", f"{t['six_methods_seconds'][s]:.4f}",
     f"{t['max_abs_diff_u'][s]:.1e}"]
    for s in names
  ]  # fmt: skip
  tail = (
    f"the JAX study, everything above included: {jax_s:.2f} s ({total / jax_s:.1f}x "
    f"faster end to end). The authors' own NumPy code took about "
    f"{AUTHORS_SECONDS_PER_SURFACE:.0f} s per surface on this machine (measured once, "
    f"not in this run): {authors:.0f} s for {len(names)} surfaces, {authors / jax_s:.0f}x "
    "this run."
  ) if paper else ("the six methods' JAX run times are in the table; `--paper` times the "
                   "six methods end to end, compilation included.")  # fmt: skip
  return [
    _common.markdown_table(header, cells),
    f"`benchmarks/numpy_reference.py` (per-trial NumPy loop, float64, same draws, "
    f"protocol '{t['numpy_protocol']}', GD, Alt-GD, K-beam K = 1, 2, 5, 10): {total:.1f} s; "
    + tail,
  ]


def plot(paths: dict[str, Any]):
  """Trial 0 on every surface over its contours: each contender's ``(u, v)`` path, or ``u``
  against each of its beams (``paths[surface][contender] = (u, followers)``)."""
  import matplotlib.pyplot as plt

  n = len(paths)
  cols, rows = min(3, n), -(-n // min(3, n))
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4 * rows), squeeze=False)
  grid = np.linspace(-surfaces.BOUND, surfaces.BOUND, 101)
  U, V = np.meshgrid(grid, grid, indexing="ij")
  for ax, (name, p) in zip(axes.flat, paths.items(), strict=False):
    s = surfaces.get(name)
    F = np.asarray(jax.vmap(jax.vmap(s.f))(jnp.asarray(U), jnp.asarray(V)))
    ax.contourf(U, V, F, levels=20, cmap="RdBu_r", alpha=0.6)
    for (label, (u, v)), color in zip(p.items(), ("k", "tab:orange", "tab:green"), strict=True):
      u, v = np.asarray(u), np.asarray(v).reshape(len(u), -1)
      beams = v.shape[1] > 1
      style = dict(color=color, lw=0.6, alpha=0.7) if beams else dict(color=color, lw=1)
      for k in range(v.shape[1]):
        ax.plot(u, v[:, k], **style, label=None if k else f"{label} beams" if beams else label)
      if beams:
        ax.scatter(u[-1] * np.ones(v.shape[1]), v[-1], color=color, zorder=3, s=15)
    ax.axvline(s.u_star, color="tab:purple", ls="--", lw=1, label="u*")
    lim = (-0.52, 0.52)
    ax.set(title=f"{name}: {s.formula}", xlabel="u", ylabel="v", xlim=lim, ylim=lim)
  for ax in list(axes.flat)[n:]:
    ax.axis("off")
  axes.flat[0].legend(loc="lower left", fontsize=7)
  fig.tight_layout()
  return fig
