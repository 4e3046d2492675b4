"""The 2D-surface study of the K-beam paper (Hamm & Noh, ICML 2018, Table 1).

``python -m benchmarks surfaces [--quick | --paper] [--protocol clean|authors|both]
[--spread N] [--out results]``

Box ``|u|, |v| <= 0.5`` (projected after every step), step ``0.1/sqrt(t)`` for both
players (``optax.sgd`` with a schedule), 100 trials, ``u0`` and the beams uniform in
``[-0.45, 0.45]``; GD and Alt-GD start from the first beam. Error ``|u_T - u*|``.

Compiled once per experiment: one program per family of methods serves every surface
(``surfaces.select``: the surface is a run-time index), every method of the family (a
run-time branch index: GD / Alt-GD / extragradient; the K-beam rules) and every beam
count (K-beam runs ``MAX_K`` stacked beams with ``num_active = K``), and the iteration
count is a run-time bound. Trials run vmapped, ``trials`` per call; more trials (the
long-run means) reuse the same program block by block.

Protocols (``--protocol``):

* ``clean``: 1000 updates; Alt-GD takes its min step first (then it is K-beam with
  K = 1); every method starts from the same fresh draws.
* ``authors``: what the authors' own 2D code does: 999 updates; Alt-GD takes its max
  step first; K = 2, 5, 10 run in that order on one beam array that each updates in
  place, so K = 5 starts its first two beams where K = 2 left them and K = 10 its first
  five where K = 5 left them (K = 1 starts fresh).

The full run adds optimistic GDA, extragradient, the ε-rules (ε = 0.01) and two more
surfaces, times every method alone (median of repeats), and plots trial 0. ``--paper``
runs only the paper's six methods on the four published surfaces at 100 trials, without
the repeats and the plot, and reports the whole wall time (compilation included) next to
``benchmarks/numpy_reference.py`` timed in the same run on the same draws. ``--spread N``
adds, per protocol, the mean over N trials (N / trials calls of the same program) and
the spread of the trials-sized means (default: 10,000 in the full run, none in
``--paper``).

Writes ``surfaces.json``, ``surfaces.md`` and (not with ``--paper``) ``surfaces.png``.
"""

from __future__ import annotations

import concurrent.futures
import functools
import statistics
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
MAX_K = 10
RULES = _common.kbeam_rules(EPSILON)  # name -> rule value; Contender.rule names one
GDA_BRANCHES = ("gd", "alt_gd", "alt_gd_max_first", "extragradient")
PAPER_SURFACES = tuple(surfaces.PUBLISHED)
# The authors' NumPy code, 100 trials, measured on this machine (not here).
AUTHORS_SECONDS_PER_SURFACE = 118.0


class Contender(NamedTuple):
  """One column of the study: a solver family (a branch of one compiled program), its beam
  count and its K-beam rule."""

  name: str
  family: str  # "gd", "alt_gd", "ogda", "extragradient" or "kbeam"
  K: int
  rule: str = "best"  # a key of RULES


class Protocol(NamedTuple):
  name: str
  num_iters: int
  alt_gd_branch: str  # "alt_gd" (min step first) or "alt_gd_max_first"
  carry_beams: bool  # K = 2 -> 5 -> 10 continue on one beam array


PROTOCOLS = {
  "clean": Protocol("clean", 1000, "alt_gd", False),
  "authors": Protocol("authors", 999, "alt_gd_max_first", True),
}


def methods(paper: bool = False) -> list[Contender]:
  """The study's methods: the paper's six, then optimistic GDA, extragradient, the ε-rules."""
  out = [Contender("gd", "gd", 1), Contender("alt_gd", "alt_gd", 1)]
  out += [Contender(f"kbeam_{K}", "kbeam", K) for K in (1, 2, 5, 10)]
  if paper:
    return out
  out[2:2] = [Contender("ogda", "ogda", 1), Contender("extragradient", "extragradient", 1)]
  for rule in ("random", "min_norm", "kiwiel"):
    out += [Contender(f"kbeam_{K}_{rule}", "kbeam", K, rule) for K in (2, 5, 10)]
  return out


def schedule(count: jax.Array) -> jax.Array:
  """``0.1 / sqrt(t)`` at iteration ``t = count + 1``."""
  return 0.1 / jnp.sqrt(count + 1.0)


def _box():
  return dict(project_u=surfaces.project, project_v=surfaces.project)


def gda_trial(f, branches: tuple[str, ...]):
  """``(surface, branch, num_iters, key, u0, v0) -> (u_T, v_T)`` for one trial."""
  opt = optax.sgd(schedule)
  makers = {
    "gd": lambda: minimax.simultaneous_gda(f, opt, opt, **_box()),
    "alt_gd": lambda: minimax.alternating_gda(f, opt, opt, **_box()),
    "alt_gd_max_first": lambda: minimax.alternating_gda(f, opt, opt, order="max_first", **_box()),
    "extragradient": lambda: minimax.extragradient(f, opt, opt, **_box()),
    "ogda": lambda: minimax.optimistic_gda(f, opt, opt, **_box()),
  }
  solvers = [makers[b]() for b in branches]
  steps = [s.step for s in solvers]

  def one_trial(surface, branch, num_iters, key, u0, v0):
    step = lambda state, surface: jax.lax.switch(branch, steps, state, surface)
    state, _ = kbeam_jax.run(step, solvers[0].init(key, u0, v0), num_iters, surface)
    return state.u, state.v

  return one_trial


def kbeam_trial(f, rules: tuple[str, ...]):
  """``(surface, rule, num_iters, K, key, u0, beams0) -> (u_T, beams_T)``: ``MAX_K``
  stacked beams of which the first K take part."""
  opt = optax.sgd(schedule)
  solvers = [minimax.kbeam(f, opt, opt, rule=RULES[r], **_box()) for r in rules]
  steps = [s.step for s in solvers]

  def one_trial(surface, rule, num_iters, K, key, u0, beams0):
    step = lambda state, surface: jax.lax.switch(rule, steps, state, surface)
    state = solvers[0].init(key, u0, beams0, num_beams=MAX_K, num_active=K)
    state, _ = kbeam_jax.run(step, state, num_iters, surface)
    return state.u, state.beams

  return one_trial


def under(method: Contender, protocol: Protocol) -> Contender:
  """``method`` as ``protocol`` runs it (Alt-GD in the protocol's order)."""
  if method.family == "alt_gd":
    return method._replace(family=protocol.alt_gd_branch)
  return method


class Programs:
  """The compiled programs of one study: one per family, for all its surfaces and methods."""

  def __init__(self, names: list[str], method_list: list[Contender], protocols: list[Protocol]):
    self.names = names
    f = surfaces.select(names)
    families = {m.family for m in method_list}
    wanted = families & {"gd", "extragradient"}
    if "alt_gd" in families:
      wanted |= {p.alt_gd_branch for p in protocols}
    self.gda_branches = tuple(b for b in GDA_BRANCHES if b in wanted)
    self.rules = tuple(
      r for r in RULES if r in {m.rule for m in method_list if m.family == "kbeam"}
    )
    scalar = lambda dtype=jnp.int32: jax.ShapeDtypeStruct((), dtype)
    self.trial_fns, self.shapes = {}, {}
    if self.gda_branches:
      self.trial_fns["gda"] = (gda_trial(f, self.gda_branches), (None,) * 3 + (0,) * 3)
    if "ogda" in families:
      self.trial_fns["ogda"] = (gda_trial(f, ("ogda",)), (None,) * 3 + (0,) * 3)
    if self.rules:
      self.trial_fns["kbeam"] = (kbeam_trial(f, self.rules), (None,) * 4 + (0,) * 3)
    self._scalar = scalar
    self.compiled: dict[str, Any] = {}
    self.compile_seconds: dict[str, float] = {}

  def compile(self, trials: int, seed: int = 0) -> None:
    """Compiles every family's program for ``trials`` trials per call, and the initial
    draws, in parallel threads (XLA compiles outside the GIL)."""
    key = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), trials))
    vec = jax.ShapeDtypeStruct((trials,), jnp.float32)

    def build(family):
      fn, in_axes = self.trial_fns[family]
      if family == "kbeam":
        beams = jax.ShapeDtypeStruct((trials, MAX_K), jnp.float32)
        args = (self._scalar(),) * 4 + (key, vec, beams)
      else:
        args = (self._scalar(),) * 3 + (key, vec, vec)
      start = time.perf_counter()
      compiled = jax.jit(jax.vmap(fn, in_axes=in_axes)).lower(*args).compile()
      return compiled, time.perf_counter() - start

    def draws():
      start = time.perf_counter()
      jax.block_until_ready(draw_inits(seed, trials))
      return None, time.perf_counter() - start

    jobs = {family: (build, family) for family in self.trial_fns}
    with concurrent.futures.ThreadPoolExecutor(len(jobs) + 1) as pool:
      futures = {f: pool.submit(fn, f) for f, (fn, _) in jobs.items()}
      futures["draws"] = pool.submit(draws)
      for family, future in futures.items():
        compiled, seconds = future.result()
        if compiled is not None:
          self.compiled[family] = compiled
        self.compile_seconds[family] = seconds

  def call(self, surface: str, method: Contender, num_iters: int, keys, u0, beams0):
    """Final ``(u, followers)`` of every trial of ``method`` on ``surface``."""
    s = np.int32(self.names.index(surface))
    n = np.int32(num_iters)
    if method.family == "kbeam":
      rule = np.int32(self.rules.index(method.rule))
      return self.compiled["kbeam"](s, rule, n, np.int32(method.K), keys, u0, beams0)
    if method.family == "ogda":
      return self.compiled["ogda"](s, np.int32(0), n, keys, u0, beams0[:, 0])
    branch = np.int32(self.gda_branches.index(method.family))
    return self.compiled["gda"](s, branch, n, keys, u0, beams0[:, 0])

  def run_protocol(self, surface: str, method_list, protocol: Protocol, keys, u0, beams0):
    """``{name: u_T}`` of every method under ``protocol`` (the authors' carry-over and
    Alt-GD order included)."""
    out, carried = {}, beams0
    for m in method_list:
      m = under(m, protocol)
      start = beams0
      if protocol.carry_beams and m.family == "kbeam" and m.rule == "best" and m.K > 1:
        start = carried
      u, followers = self.call(surface, m, protocol.num_iters, keys, u0, start)
      if protocol.carry_beams and m.family == "kbeam" and m.rule == "best" and m.K > 1:
        carried = followers
      out[m.name] = u
    return jax.block_until_ready(out)


def draw_inits(seed: int, trials: int, block: int = 0):
  """Keys, ``u0`` and ``MAX_K`` beams of ``trials`` trials; block 0 is the study's draw,
  blocks 1, 2, ... (the long-run means) are independent further draws. One compiled
  program for every seed and block."""
  return _draw(np.int32(seed), np.int32(block), trials)


@functools.partial(jax.jit, static_argnums=2)
def _draw(seed, block, trials):
  key = jax.random.key(seed)
  key = jax.lax.cond(block == 0, lambda: key, lambda: jax.random.fold_in(key, block))
  k_u, k_v, k_run = jax.random.split(key, 3)
  u0 = jax.random.uniform(k_u, (trials,), minval=-INIT_RANGE, maxval=INIT_RANGE)
  beams0 = jax.random.uniform(k_v, (trials, MAX_K), minval=-INIT_RANGE, maxval=INIT_RANGE)
  return jax.random.split(k_run, trials), u0, beams0


def errors(surface: str, u: Any) -> np.ndarray:
  return np.abs(np.asarray(u, np.float64) - surfaces.get(surface).u_star)


def trajectory_program(names: list[str], num_iters: int, K: int = 5):
  """One compiled program for the plot's paths of trial 0 on any surface: GD and Alt-GD
  ``(u, v)``, K-beam ``(u, beams)``, starting points included."""
  f = surfaces.select(names)
  opt = optax.sgd(schedule)
  gd = minimax.simultaneous_gda(f, opt, opt, **_box())
  alt = minimax.alternating_gda(f, opt, opt, **_box())
  kb = minimax.kbeam(f, opt, opt, **_box())

  def paths(surface, key, u0, beams0):
    def path(solver, state, pick):
      def body(s, _):
        s = solver.step(s, surface)[0]
        return s, pick(s)

      _, trace = jax.lax.scan(body, state, length=num_iters)
      return jax.tree.map(lambda x0, xs: jnp.concatenate([x0[None], xs]), pick(state), trace)

    uv = lambda s: (s.u, s.v)
    return {
      "gd": path(gd, gd.init(key, u0, beams0[0]), uv),
      "alt_gd": path(alt, alt.init(key, u0, beams0[0]), uv),
      f"kbeam_{K}": path(kb, kb.init(key, u0, beams0[:K], K), lambda s: (s.u, s.beams)),
    }

  return jax.jit(paths)


def run_study(
  out_dir: Path,
  *,
  trials: int,
  num_iters: int = 1000,
  seed: int = 0,
  repeats: int = 3,
  names: list[str] | None = None,
  numpy_baseline: bool = True,
  paper: bool = False,
  protocols: tuple[str, ...] = ("clean",),
  spread: int = 0,
) -> list[dict[str, Any]]:
  """Runs the study, writes the reports, returns the records.

  Args:
    out_dir: output folder.
    trials: trials per call (and of the main tables).
    num_iters: updates of the clean protocol (the authors' protocol has its own, 999).
    seed: seed of the initial draws.
    repeats: timed runs per method (full mode; ``--paper`` times its one run).
    names: surfaces (default: all six; ``paper``: the four published ones).
    numpy_baseline: time ``numpy_reference`` on the same draws.
    paper: only the paper's six methods, no per-method repeats, no plot.
    protocols: ``"clean"`` and/or ``"authors"``, each with its own table.
    spread: trials of the long-run means and of the spread of trials-sized means (a
      multiple of ``trials``; 0: none).
  """
  wall_start = time.perf_counter()
  names = names or list(PAPER_SURFACES if paper else surfaces.SURFACES)
  if spread % trials:
    raise ValueError(f"spread={spread} must be a multiple of trials={trials}.")
  method_list = methods(paper)
  protos = [
    PROTOCOLS[p]._replace(num_iters=num_iters) if p == "clean" else PROTOCOLS[p] for p in protocols
  ]
  programs = Programs(names, method_list, protos)
  programs.compile(trials, seed)
  keys, u0, beams0 = draw_inits(seed, trials)

  # The main table: the first protocol, `trials` trials, every method.
  main = protos[0]
  finals, per_method = {}, {}
  for name in tqdm(names, desc="surfaces", unit="surface", leave=False):
    start = time.perf_counter()
    finals[name] = programs.run_protocol(name, method_list, main, keys, u0, beams0)
    per_method[name] = {"all": time.perf_counter() - start}
    if not paper:
      for m in method_list:
        times = []
        for _ in range(max(1, repeats)):
          t = time.perf_counter()
          call = programs.call(name, under(m, main), main.num_iters, keys, u0, beams0)
          jax.block_until_ready(call)
          times.append(time.perf_counter() - t)
        per_method[name][m.name] = statistics.median(times)
  jax_seconds = time.perf_counter() - wall_start

  # The protocols' tables over many trials: the same programs, block by block.
  long_run = {}
  if spread:
    paper_methods = methods(paper=True)
    for proto in protos:
      for name in [n for n in names if n in PAPER_SURFACES]:
        blocks = []
        for b in tqdm(range(spread // trials), desc=f"{proto.name} {name}", leave=False):
          k, u, v = draw_inits(seed, trials, b)
          out = programs.run_protocol(name, paper_methods, proto, k, u, v)
          blocks.append({m: errors(name, x) for m, x in out.items()})
        long_run[(proto.name, name)] = blocks

  records = []
  for name in names:
    for m in method_list:
      err = errors(name, finals[name][m.name])
      r = dict(
        surface=name,
        method=m.family if m.family != "kbeam" else f"kbeam_{m.rule}",
        name=m.name,
        K=m.K,
        rule=m.rule if m.family == "kbeam" else None,
        epsilon=getattr(RULES[m.rule], "epsilon", 0.0) if m.family == "kbeam" else 0.0,
        protocol=main.name,
        error_mean=float(err.mean()),
        error_std=float(err.std()),
        trials=trials,
        iterations=main.num_iters,
      )
      if m.name in per_method[name]:
        r["seconds"] = per_method[name][m.name]
      records.append(r)
  protocol_records = []
  for (proto, name), blocks in long_run.items():
    for i, m in enumerate(surfaces.PUBLISHED_METHODS):
      block_means = np.array([b[m].mean() for b in blocks])
      every = np.concatenate([b[m] for b in blocks])
      published = surfaces.PUBLISHED[name][i][0]
      protocol_records.append(
        dict(
          protocol=proto,
          surface=name,
          name=m,
          error_mean=float(blocks[0][m].mean()),
          error_std=float(blocks[0][m].std()),
          long_trials=int(every.size),
          long_error_mean=float(every.mean()),
          block_trials=trials,
          block_mean_min=float(block_means.min()),
          block_mean_median=float(np.median(block_means)),
          block_mean_max=float(block_means.max()),
          blocks_at_or_below_published=int(np.sum(block_means <= published + 5e-4)),
          blocks=int(len(blocks)),
          published=published,
        )
      )

  timing = dict(
    jax_seconds=jax_seconds,
    compile_seconds=programs.compile_seconds,
    programs=len(programs.compiled),
    surfaces_seconds={n: per_method[n]["all"] for n in names},
    # The paper's six methods' run time per surface: one timed call each (the median of the
    # repeats in the full run; in --paper, the one run of the six).
    six_methods_seconds={
      n: per_method[n]["all"]
      if paper
      else sum(per_method[n][m] for m in surfaces.PUBLISHED_METHODS)
      for n in names
    },
  )
  if numpy_baseline and main.name == "clean":
    ks = (1, 2, 5, 10)
    subset = ["gd", "alt_gd"] + [f"kbeam_{K}" for K in ks]
    u64, b64 = np.asarray(u0, np.float64), np.asarray(beams0, np.float64)
    timing["numpy_seconds"], timing["max_abs_diff_u"], timing["numpy_error_means"] = {}, {}, {}
    for name in names:
      start = time.perf_counter()
      ref = numpy_reference.study(name, u64, b64, main.num_iters, ks)
      timing["numpy_seconds"][name] = time.perf_counter() - start
      timing["max_abs_diff_u"][name] = max(
        float(np.max(np.abs(ref[n] - np.asarray(finals[name][n], np.float64)))) for n in subset
      )
      timing["numpy_error_means"][name] = {n: float(errors(name, ref[n]).mean()) for n in subset}
    timing["numpy_protocol"] = main.name

  meta = dict(
    trials=trials,
    iterations=main.num_iters,
    seed=seed,
    epsilon=EPSILON,
    max_k=MAX_K,
    step="0.1/sqrt(t)",
    box=surfaces.BOUND,
    paper=paper,
    protocols=[p.name for p in protos],
    spread=spread,
    protocol_tables=protocol_records,
    compilation_cache=jax.config.jax_compilation_cache_dir,
    environment=_common.environment(),
    timing=timing,
  )
  _common.write_json(out_dir / "surfaces.json", records, meta)
  (out_dir / "surfaces.md").write_text(markdown(records, meta))
  if not paper:
    traj = trajectory_program(names, main.num_iters)
    plot(
      {n: traj(np.int32(i), keys[0], u0[0], beams0[0]) for i, n in enumerate(names)},
      out_dir / "surfaces.png",
    )
  return records


def _published_cell(surface: str, method: str) -> str:
  pub = surfaces.PUBLISHED.get(surface)
  if not pub or method not in surfaces.PUBLISHED_METHODS:
    return "-"
  return _common.mean_std(*pub[surfaces.PUBLISHED_METHODS.index(method)])


def markdown(records: list[dict[str, Any]], meta: dict[str, Any]) -> str:
  by = {(r["surface"], r["name"]): r for r in records}
  names = list(dict.fromkeys(r["surface"] for r in records))
  lines = [
    "# 2D minimax surfaces: error |u_T - u*| (mean ± std over "
    f"{meta['trials']} trials, {meta['iterations']} updates, protocol "
    f"'{meta['protocols'][0]}')",
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
    for m in surfaces.PUBLISHED_METHODS:
      r = by[(s, m)]
      row += [_common.mean_std(r["error_mean"], r["error_std"]), _published_cell(s, m)]
    rows.append(row)
  lines += [_common.markdown_table(header, rows), ""]

  extra = [
    m for m in dict.fromkeys(r["name"] for r in records) if m not in surfaces.PUBLISHED_METHODS
  ]
  if extra:
    lines += [f"## Other methods (ε = {meta['epsilon']} for the ε-rules)", ""]
    rows = [
      [s] + [_common.mean_std(by[(s, m)]["error_mean"], by[(s, m)]["error_std"]) for m in extra]
      for s in names
    ]
    lines += [_common.markdown_table(["surface"] + extra, rows), ""]

  for proto in meta["protocols"]:
    table = [r for r in meta["protocol_tables"] if r["protocol"] == proto]
    if not table:
      continue
    n = table[0]["long_trials"]
    lines += [
      f"## Protocol '{proto}': {n:,}-trial means and the spread of "
      f"{table[0]['block_trials']}-trial means",
      "",
      f"Each cell: mean over {n:,} trials / the {table[0]['blocks']} means of "
      f"{table[0]['block_trials']} trials (min, median, max) / how many of those means are "
      "at or below the published mean / published.",
      "",
    ]
    rows = []
    for r in table:
      rows.append(
        [
          r["surface"],
          r["name"],
          f"{r['long_error_mean']:.3f}",
          f"{r['block_mean_min']:.3f} / {r['block_mean_median']:.3f} / {r['block_mean_max']:.3f}",
          f"{r['blocks_at_or_below_published']} of {r['blocks']}",
          f"{r['published']:.3f}",
        ]
      )
    lines += [
      _common.markdown_table(
        [
          "surface",
          "method",
          f"{n:,}-trial mean",
          "block means min / median / max",
          "blocks <= published",
          "published",
        ],
        rows,
      ),
      "",
    ]

  t = meta["timing"]
  lines += [
    "## Wall time",
    "",
    f"JAX: {t['jax_seconds']:.2f} s for {len(names)} surfaces × "
    f"{len(dict.fromkeys(r['name'] for r in records))} methods × {meta['trials']} trials, "
    f"compilation of {t['programs']} programs included ("
    + ", ".join(f"{k} {v:.2f} s" for k, v in t["compile_seconds"].items())
    + f"; compilation cache: {meta['compilation_cache'] or 'off'})"
    + ("" if meta["paper"] else ", per-method timing repeats included")
    + ".",
    "",
  ]
  if "numpy_seconds" in t:
    total_np = sum(t["numpy_seconds"].values())
    rows = [
      [
        s,
        f"{t['numpy_seconds'][s]:.2f}",
        f"{t['six_methods_seconds'][s]:.4f}",
        f"{t['max_abs_diff_u'][s]:.1e}",
      ]
      for s in names
    ]
    lines += [
      _common.markdown_table(
        ["surface", "numpy (s)", "jax, six methods, compiled (s)", "max |u_numpy - u_jax|"],
        rows,
      ),
      "",
      f"`benchmarks/numpy_reference.py` (per-trial NumPy loop, float64, same draws, "
      f"protocol '{t['numpy_protocol']}', GD, Alt-GD, K-beam K = 1, 2, 5, 10): "
      f"{total_np:.1f} s; "
      + (
        f"the JAX study, everything above included: {t['jax_seconds']:.2f} s "
        f"({total_np / t['jax_seconds']:.1f}x faster end to end). The authors' own NumPy code "
        f"took about {AUTHORS_SECONDS_PER_SURFACE:.0f} s per surface on this machine "
        "(measured once, not in this run): "
        f"{AUTHORS_SECONDS_PER_SURFACE * len(names):.0f} s for {len(names)} surfaces, "
        f"{AUTHORS_SECONDS_PER_SURFACE * len(names) / t['jax_seconds']:.0f}x this run."
        if meta["paper"]
        else "the six methods' JAX run times are in the table; `--paper` times the six "
        "methods end to end, compilation included."
      ),
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
  """``python -m benchmarks surfaces``: the full study, ``--paper`` or ``--quick``."""
  protocol = getattr(args, "protocol", "clean")
  protocols = ("clean", "authors") if protocol == "both" else (protocol,)
  paper = getattr(args, "paper", False)
  trials = args.trials or (10 if args.quick else 100)
  spread = getattr(args, "spread", None)
  if spread is None:
    spread = 0 if paper else (20 * trials if args.quick else 10_000)
  if spread % trials:  # whole calls of the trials-sized program
    rounded = -(-spread // trials) * trials
    print(f"surfaces: --spread {spread} rounded up to {rounded}, a multiple of --trials {trials}")
    spread = rounded
  run_study(
    args.out,
    trials=trials,
    num_iters=1000,
    seed=args.seed,
    repeats=1 if args.quick else 3,
    names=["seesaw", "anti_saddle"] if args.quick else None,
    paper=paper,
    protocols=protocols,
    spread=spread,
  )
