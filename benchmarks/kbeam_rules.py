"""The cost of a K-beam step under each direction rule, beside rule ``best``.

``python -m benchmarks kbeam_rules [--quick] [--out results]``

Two problems, K = 10 beams, every rule in the same process:

* ``scalar_2d``: the anti-saddle ``-u² + v² + 2uv`` on the box, step ``0.1/√t``, ε = 0.01
  (the 2D study's setting): one trial, and 100 trials vmapped;
* ``gan``: the MoG GAN's generator against 10 discriminators (MLPs 128-128), batch 128,
  Adam, ε = 0.01: one trial.

Each configuration compiles ``steps`` steps of every rule in one loop first, then times
the rules in turns (``repeats`` rounds) and reports the median time per step, its
difference from rule ``best`` and the ratio to it. The ε-rules solve their simplex
problems exactly (``simplex_qp``); ``kiwiel`` adds its Armijo line search.

A second table times the same K-beam step taken from linen and from the NNX patterns
(``benchmarks/_flax_paths.py``). Writes ``kbeam_rules.json``, ``.md`` and ``.png``.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from benchmarks import _common, _flax_paths
from kbeam_jax import data, minimax, nn
from kbeam_jax.tasks import gan_mog, surfaces

K, EPSILON = 10, 0.01
RULES = _common.kbeam_rules(EPSILON)  # name -> rule value
# Measured before the exact QP (300 projected-gradient iterations per solve).
BEFORE = {"scalar_2d min_norm": "388 µs vs 0.1 µs for best", "gan kiwiel": "2.09x best"}


def _compile(fn, args) -> tuple[Any, float]:
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  return compiled, time.perf_counter() - start


def scalar_2d(rule: str, trials: int, steps: int):
  """``(compiled loop, args)`` of ``steps`` K-beam steps on the anti-saddle."""
  f = surfaces.get("anti_saddle").f
  sgd = optax.sgd(lambda c: 0.1 / jnp.sqrt(c + 1.0))
  box = dict(project_u=surfaces.project, project_v=surfaces.project)
  solver = minimax.kbeam(f, sgd, sgd, rule=RULES[rule], **box)

  def one(key, u0, beams0):
    state = solver.init(key, u0, beams0, num_beams=K)
    state = jax.lax.fori_loop(0, steps, lambda _, s: solver.step(s)[0], state)
    return state.u, state.beams

  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  keys = jax.random.split(k1, trials)
  u0 = jax.random.uniform(k2, (trials,), minval=-0.45, maxval=0.45)
  beams0 = jax.random.uniform(k3, (trials, K), minval=-0.45, maxval=0.45)
  if trials == 1:
    return one, (keys[0], u0[0], beams0[0])
  return jax.vmap(one), (keys, u0, beams0)


def gan(rule: str, steps: int):
  """``(loop, args)`` of ``steps`` K-beam steps of the MoG GAN (one trial, batch 128)."""
  g_def, u = nnx.split(gan_mog.Generator(nnx.Rngs(0)), nnx.Param)
  d_def, beams = nn.stack_modules(gan_mog.Discriminator, jax.random.key(1), K)
  f = gan_mog.objective(g_def, d_def)
  solver = minimax.kbeam(f, optax.adam(1e-3, b1=0.5), optax.adam(1e-4, b1=0.5), rule=RULES[rule])
  state = solver.init(jax.random.key(2), nnx.as_pure(u), beams, num_beams=K)

  def loop(state, key):
    def body(s, k):
      k_x, k_z = jax.random.split(k)
      x, z = data.sample_mog(k_x, 128), gan_mog.sample_noise(k_z, 128)
      s, info = solver.step(s, x, z)
      return s, info.step_scale

    return jax.lax.scan(body, state, jax.random.split(key, steps))

  return loop, (state, jax.random.key(3))


def measure(make, steps: int, repeats: int, desc: str) -> dict[str, dict[str, Any]]:
  """Compiles every rule's loop, then times them in turns (``repeats`` rounds, so that a
  change of machine load hits every rule alike); median time per step."""
  from tqdm.auto import tqdm

  compiled, rows = {}, {}
  for rule in tqdm(RULES, desc=f"{desc}: compile", leave=False):
    fn, args = make(rule, steps)
    compiled[rule], compile_s = _compile(fn, args)
    rows[rule] = {"compile_s": compile_s, "times": [], "args": args}
  for _ in tqdm(range(repeats), desc=f"{desc}: time", leave=False):
    for rule in RULES:
      start = time.perf_counter()
      out = jax.block_until_ready(compiled[rule](*rows[rule]["args"]))
      rows[rule]["times"].append(time.perf_counter() - start)
      rows[rule]["out"] = out
  return {
    rule: {
      "seconds_per_step": statistics.median(r["times"]) / steps,
      "compile_s": r["compile_s"],
      **(
        {"mean_step_scale": float(jnp.mean(r["out"][1]))}
        if make is gan and rule == "kiwiel"
        else {}
      ),
    }
    for rule, r in rows.items()
  }


def run_suite(out_dir: Path, *, quick: bool = False) -> list[dict[str, Any]]:
  repeats = 3 if quick else 7
  configs = [
    ("scalar_2d", "1 trial", lambda r, n: scalar_2d(r, 1, n), 200 if quick else 1000),
    ("scalar_2d", "100 trials", lambda r, n: scalar_2d(r, 100, n), 100 if quick else 1000),
    ("gan", "1 trial", gan, 5 if quick else 30),
  ]
  records = []
  for problem, setting, make, steps in configs:
    rows = measure(make, steps, repeats, f"kbeam_rules {problem}, {setting}")
    best = rows["best"]["seconds_per_step"]
    for rule, row in rows.items():
      records.append(
        dict(
          problem=problem,
          setting=setting,
          rule=rule,
          K=K,
          us_per_step=1e6 * row["seconds_per_step"],
          us_more_than_best=1e6 * (row["seconds_per_step"] - best),
          ratio_to_best=row["seconds_per_step"] / best,
          compile_s=row["compile_s"],
          **({"mean_step_scale": row["mean_step_scale"]} if "mean_step_scale" in row else {}),
        )
      )
  records += _flax_paths.measure(20 if quick else 100, repeats)
  meta = {"epsilon": EPSILON, "K": K, "quick": quick, "environment": _common.environment()}
  _common.write_json(out_dir / "kbeam_rules.json", records, meta)
  (out_dir / "kbeam_rules.md").write_text(markdown(records, meta))
  plot(records, out_dir / "kbeam_rules.png")
  return records


def plot(records: list[dict[str, Any]], path: Path) -> None:
  """Time per step of every rule beside ``best``'s, one group of bars per setting."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  records = [r for r in records if "rule" in r]
  settings = list(dict.fromkeys((r["problem"], r["setting"]) for r in records))
  fig, ax = plt.subplots(figsize=(7, 3.5))
  width = 0.8 / len(RULES)
  for i, rule in enumerate(RULES):
    ratios = [
      next(r["ratio_to_best"] for r in records if (r["problem"], r["setting"]) == s and
           r["rule"] == rule)
      for s in settings
    ]  # fmt: skip
    ax.bar([j + i * width for j in range(len(settings))], ratios, width, label=rule)
  ax.set_xticks([j + 0.4 - width / 2 for j in range(len(settings))])
  ax.set_xticklabels([f"{p}\n{s}" for p, s in settings])
  ax.set_yscale("log")
  ax.set_ylabel("time per step / best's")
  ax.axhline(1.0, color="gray", lw=0.8)
  ax.legend(fontsize=8)
  ax.set_title(f"K-beam step time per rule (K = {K})")
  _common.save_figure(fig, path)


def markdown(records: list[dict[str, Any]], meta: dict[str, Any]) -> str:
  flax_rows = [
    [r["path"], f"{r['ms_per_step']:.3f}", f"{r['ratio_to_linen']:.2f}x"]
    for r in records
    if "path" in r
  ]
  records = [r for r in records if "rule" in r]
  rows = [
    [
      r["problem"],
      r["setting"],
      r["rule"],
      f"{r['us_per_step']:.2f}",
      f"{r['us_more_than_best']:+.2f}",
      f"{r['ratio_to_best']:.2f}x",
      f"{r['mean_step_scale']:.2f}" if "mean_step_scale" in r else "",
    ]
    for r in records
  ]
  env = meta["environment"]
  return (
    "\n\n".join(
      [
        f"# K-beam step time per rule (K = {meta['K']}, ε = {meta['epsilon']})",
        _common.markdown_table(
          ["problem", "setting", "rule", "µs / step", "vs best (µs)", "vs best", "kiwiel scale"],
          rows,
        ),
        "Median over repeated runs of a compiled loop, per step; `kiwiel scale` is the mean "
        "accepted line-search scale on the GAN step (1 = the first trial point passed). "
        "Targets: `min_norm` on the scalar 2D problem within 20 µs of `best` (before the "
        f"exact QP: {BEFORE['scalar_2d min_norm']}), `kiwiel` at most 1.5x `best` on the GAN "
        f"step (before: {BEFORE['gan kiwiel']}).",
        f"## The same K-beam step from linen and NNX (GAN generator, K = "
        f"{_flax_paths.NUM_CRITICS} discriminators, rule best)",
        _common.markdown_table(["path", "ms / step", "vs linen"], flax_rows),
        "One call from Python per step, timed in turns, median. `nnx functional` splits the "
        "module once and jits plain arrays; `nnx.jit` walks the "
        "module and optimizer graph on every call, `nnx.cached_partial` once.",
        f"Measured on {env['device']} ({env['backend']}), jax {env['jax']}.",
      ]
    )
    + "\n"
  )


def main(args) -> None:
  """``python -m benchmarks kbeam_rules``; ``--quick``: fewer steps and repeats."""
  run_suite(args.out, quick=args.quick)
