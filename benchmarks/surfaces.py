"""The 2D-surface study of the K-beam paper (Hamm & Noh, ICML 2018, Table 1): error
``|u_T - u*|`` of GDA, alternating, optimistic GDA, extragradient and K-beam (K = 1..10,
every rule); protocols, ``--paper`` and ``--spread`` in docs/pages/benchmarks/surfaces.md.

``python -m benchmarks surfaces [--quick] [--paper] [--protocol clean|authors|both]
[--spread N] [--out results]`` writes ``surfaces.json``, ``surfaces.md`` and (not with
``--paper``) ``surfaces.png``.
"""

from __future__ import annotations

import concurrent.futures
import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import kbeam_jax
from benchmarks import _common, _surfaces_report, numpy_reference
from kbeam_jax import minimax
from kbeam_jax.tasks import surfaces

INIT_RANGE, EPSILON, MAX_K = 0.45, 0.01, 10
RULES = _common.kbeam_rules(EPSILON)  # name -> rule value; Contender.rule names one
PAPER_SURFACES = tuple(surfaces.PUBLISHED)


class Program(NamedTuple):
  """Solvers whose states have one structure, run by one compiled program (a run-time
  branch index): K-beam from all the beams (``K`` active), the others from the first."""

  name: str  # as the timing report calls it
  stacked: bool

  def init(self, solver, key, u0, beams0, K):
    if self.stacked:
      return solver.init(key, u0, beams0, num_beams=beams0.shape[0], num_active=K)
    return solver.init(key, u0, beams0[0])

  def followers(self, state):
    return state.beams if self.stacked else state.v


GDA, OGDA, KBEAM = Program("gda", False), Program("ogda", False), Program("kbeam", True)


class Contender(NamedTuple):
  """One column of the study; ``carried``: the authors' protocol runs it on the beams the
  previous such contender left (K = 2 -> 5 -> 10)."""

  name: str
  program: Program
  build: Callable[..., kbeam_jax.Solver]  # build(f, leader, follower, **options)
  options: tuple[tuple[str, Any], ...] = ()
  K: int = 1
  rule: str | None = None  # a key of RULES
  carried: bool = False

  def branch(self, protocol: Protocol) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    return self.build, self.options + protocol.options.get(self.build, ())


class Protocol(NamedTuple):
  name: str
  num_iters: int
  options: dict[Callable[..., Any], tuple[tuple[str, Any], ...]]  # more, per factory
  carry_beams: bool  # the carried contenders continue on one beam array


PROTOCOLS = {
  "clean": Protocol("clean", 1000, {}, False),
  "authors": Protocol("authors", 999, {minimax.alternating_gda: (("order", "max_first"),)}, True),
}


def methods(paper: bool = False) -> list[Contender]:
  """The study's methods: the paper's six, then optimistic GDA, extragradient, the ε-rules."""

  def kbeam(K, rule="best"):
    name = f"kbeam_{K}" + ("" if rule == "best" else f"_{rule}")
    options = (("rule", RULES[rule]),)
    return Contender(name, KBEAM, minimax.kbeam, options, K, rule, rule == "best" and K > 1)

  gd = [Contender("gd", GDA, minimax.simultaneous_gda)]
  gd += [Contender("alt_gd", GDA, minimax.alternating_gda)]
  if paper:
    return gd + [kbeam(K) for K in (1, 2, 5, 10)]
  gd += [Contender("ogda", OGDA, minimax.optimistic_gda)]
  gd += [Contender("extragradient", GDA, minimax.extragradient)]
  rules = ("best", "random", "min_norm", "kiwiel")
  return gd + [kbeam(K, r) for r in rules for K in ((1, 2, 5, 10) if r == "best" else (2, 5, 10))]


def schedule(count: jax.Array) -> jax.Array:
  return 0.1 / jnp.sqrt(count + 1.0)


def make_solver(f, branch) -> kbeam_jax.Solver:
  build, options = branch
  opt = optax.sgd(schedule)
  return build(f, opt, opt, project_u=surfaces.project, project_v=surfaces.project, **dict(options))


def trial_program(f, program: Program, branches):
  """``(surface, branch, num_iters, K, key, u0, beams0) -> (u_T, followers_T)`` for one
  trial: the solver of ``branches[branch]`` run ``num_iters`` steps by ``kbeam_jax.run``."""
  solvers = [make_solver(f, b) for b in branches]
  steps = [s.step for s in solvers]

  def one_trial(surface, branch, num_iters, K, key, u0, beams0):
    step = lambda state, surface: jax.lax.switch(branch, steps, state, surface)
    state = program.init(solvers[0], key, u0, beams0, K)
    state, _ = kbeam_jax.run(step, state, num_iters, surface)
    return state.u, program.followers(state)

  return one_trial


class Programs:
  """The compiled programs of one study: one per ``Program``."""

  def __init__(self, names: list[str], method_list: list[Contender], protocols: list[Protocol]):
    self.names, self.compiled, self.compile_seconds = names, {}, {}
    self.branches: dict[Program, list[Any]] = {}
    for program, branch in dict.fromkeys(
      (m.program, m.branch(p)) for m in method_list for p in protocols
    ):
      self.branches.setdefault(program, []).append(branch)

  def compile(self, trials: int, seed: int = 0) -> None:
    """Compiles every program and the initial draws in threads (XLA runs outside the GIL)."""
    f = surfaces.select(self.names)
    indices = (jax.ShapeDtypeStruct((), jnp.int32),) * 4  # surface, branch, num_iters, K
    draws = jax.eval_shape(lambda: draw_inits(seed, trials))

    def lower(program):
      fn = jax.vmap(trial_program(f, program, self.branches[program]), (None,) * 4 + (0,) * 3)
      return jax.jit(fn).lower(*indices, *draws).compile()

    with concurrent.futures.ThreadPoolExecutor(len(self.branches) + 1) as pool:
      futures = {p: pool.submit(timed, lower, p) for p in self.branches}
      drawn = pool.submit(timed, draw_inits, seed, trials)
      for program, future in futures.items():
        self.compiled[program], self.compile_seconds[program.name] = future.result()
      self.compile_seconds["draws"] = drawn.result()[1]

  def call(self, surface: str, m: Contender, protocol: Protocol, keys, u0, beams0):
    """Final ``(u, followers)`` of every trial of ``m`` under ``protocol`` on ``surface``."""
    branch = self.branches[m.program].index(m.branch(protocol))
    index = (self.names.index(surface), branch, protocol.num_iters, m.K)
    return self.compiled[m.program](*map(np.int32, index), keys, u0, beams0)

  def run_protocol(self, surface: str, method_list, protocol: Protocol, keys, u0, beams0):
    """``{name: u_T}`` of every method under ``protocol`` (with the authors' carry-over)."""
    out, carried = {}, beams0
    for m in method_list:
      carry = protocol.carry_beams and m.carried
      out[m.name], followers = self.call(
        surface, m, protocol, keys, u0, carried if carry else beams0
      )
      carried = followers if carry else carried
    return jax.block_until_ready(out)


def timed(job: Callable[..., Any], *inputs: Any) -> tuple[Any, float]:
  """``(output, seconds)`` of ``job(*inputs)``, waited for."""
  start = time.perf_counter()
  return jax.block_until_ready(job(*inputs)), time.perf_counter() - start


def draw_inits(seed: int, trials: int, block: int = 0):
  """Keys, ``u0`` and ``MAX_K`` beams of ``trials`` trials; block 0 is the study's draw,
  blocks 1, 2, ... (the long-run means) further draws; one program for every seed, block."""
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


def trajectory_program(names: list[str], protocol: Protocol, contenders: list[Contender]):
  """One compiled program for the plot's paths of trial 0 on any surface: ``{name: (u,
  followers)}`` of every contender (its first K beams), starting points included."""
  f = surfaces.select(names)

  def paths(surface, key, u0, beams0):
    out = []
    for m in contenders:
      solver = make_solver(f, m.branch(protocol))
      pick = lambda state, *_, m=m: (state.u, m.program.followers(state))
      state = m.program.init(solver, key, u0, beams0[: m.K], m.K)
      _, trace = kbeam_jax.run(solver.step, state, protocol.num_iters, surface, trace=pick)
      out.append(jax.tree.map(lambda x0, xs: jnp.concatenate([x0[None], xs]), pick(state), trace))
    return out

  compiled = jax.jit(paths)
  return lambda *args: dict(zip([m.name for m in contenders], compiled(*args), strict=True))


def run_study(
  out_dir: Path, *, trials: int, num_iters: int = 1000, seed: int = 0, repeats: int = 3,
  names: list[str] | None = None, numpy_baseline: bool = True, paper: bool = False,
  protocols: tuple[str, ...] = ("clean",), spread: int = 0,
) -> list[dict[str, Any]]:  # fmt: skip
  """Runs the study (``num_iters``: the clean protocol's updates; ``repeats``: timed runs
  per method, none with ``paper``; ``names``: default all six surfaces, the published four
  with ``paper``; ``spread``: rounded up to whole calls of ``trials``), publishes it, returns
  the records."""
  wall_start = time.perf_counter()
  names = names or list(PAPER_SURFACES if paper else surfaces.SURFACES)
  if spread % trials:
    rounded = -(-spread // trials) * trials
    print(f"surfaces: --spread {spread} rounded up to {rounded}, a multiple of --trials {trials}")
    spread = rounded
  method_list, six = methods(paper), surfaces.PUBLISHED_METHODS
  protos = [PROTOCOLS[p] for p in protocols]
  protos = [p._replace(num_iters=num_iters) if p.name == "clean" else p for p in protos]
  main = protos[0]  # the main table's: `trials` trials, every method
  programs = Programs(names, method_list, protos)
  programs.compile(trials, seed)
  draws = draw_inits(seed, trials)
  finals, seconds = {}, {}
  for name in tqdm(names, desc="surfaces", unit="surface", leave=False):
    finals[name], all_seconds = timed(programs.run_protocol, name, method_list, main, *draws)
    calls = {m.name: functools.partial(programs.call, name, m, main, *draws) for m in method_list}
    per_method = _common.in_turns({} if paper else calls, repeats)
    seconds[name] = {"all": all_seconds} | {m: s for m, (s, _) in per_method.items()}
  jax_seconds = time.perf_counter() - wall_start

  records = []
  for name in names:
    for m in method_list:
      err = errors(name, finals[name][m.name])
      more = {"seconds": seconds[name][m.name]} if m.name in seconds[name] else {}
      records.append(
        dict(surface=name, method=m.name if m.rule is None else f"kbeam_{m.rule}", name=m.name,
             K=m.K, rule=m.rule, epsilon=getattr(RULES.get(m.rule), "epsilon", 0.0),
             protocol=main.name, error_mean=float(err.mean()), error_std=float(err.std()),
             trials=trials, iterations=main.num_iters, **more)
      )  # fmt: skip
  # six_methods_seconds: the paper's six methods per surface, one timed call each (the median
  # of the repeats in the full run; in --paper, the one run of the six)
  timing = dict(
    jax_seconds=jax_seconds, compile_seconds=programs.compile_seconds,
    programs=len(programs.compiled), surfaces_seconds={n: seconds[n]["all"] for n in names},
    six_methods_seconds={n: seconds[n]["all"] if paper else sum(seconds[n][m] for m in six)
                         for n in names},
  )  # fmt: skip
  if numpy_baseline and main.name == "clean":
    timing |= numpy_reference.compare(names, finals, *draws[1:], main.num_iters, errors)
  meta = dict(
    trials=trials, iterations=main.num_iters, seed=seed, epsilon=EPSILON, max_k=MAX_K,
    step="0.1/sqrt(t)", box=surfaces.BOUND, paper=paper, protocols=[p.name for p in protos],
    spread=spread, protocol_tables=long_runs(programs, names, protos, seed, trials, spread),
    compilation_cache=jax.config.jax_compilation_cache_dir, environment=_common.environment(),
    timing=timing,
  )  # fmt: skip
  figure = None
  if not paper:  # trial 0 of GD, Alt-GD (min step first) and K-beam K = 5
    shown = [m for m in methods(paper=True) if m.name in ("gd", "alt_gd", "kbeam_5")]
    traj = trajectory_program(names, PROTOCOLS["clean"]._replace(num_iters=main.num_iters), shown)
    keys, u0, beams0 = draws
    paths = {n: traj(np.int32(i), keys[0], u0[0], beams0[0]) for i, n in enumerate(names)}
    figure = _surfaces_report.plot(paths)
  text = _surfaces_report.markdown(records, meta)
  _common.publish(out_dir, "surfaces", records, meta, text, figure)
  return records


def long_runs(programs, names, protos, seed, trials, spread) -> list[dict[str, Any]]:
  """Per protocol and published surface, the paper's six methods over ``spread`` trials
  (``spread / trials`` calls of the same programs): the long-run mean and the spread of
  the trials-sized means beside the published mean."""
  tables, six = [], surfaces.PUBLISHED_METHODS
  for proto in protos if spread else ():
    for name in [n for n in names if n in PAPER_SURFACES]:
      blocks = []
      for b in tqdm(range(spread // trials), desc=f"{proto.name} {name}", leave=False):
        out = programs.run_protocol(name, methods(True), proto, *draw_inits(seed, trials, b))
        blocks.append({m: errors(name, x) for m, x in out.items()})
      for m, (published, _) in zip(six, surfaces.PUBLISHED[name], strict=True):
        means = np.array([b[m].mean() for b in blocks])
        every = np.concatenate([b[m] for b in blocks])
        tables.append(
          dict(protocol=proto.name, surface=name, name=m, error_mean=float(blocks[0][m].mean()),
               error_std=float(blocks[0][m].std()), long_trials=int(every.size),
               long_error_mean=float(every.mean()), block_trials=trials,
               block_mean_min=float(means.min()), block_mean_median=float(np.median(means)),
               block_mean_max=float(means.max()),
               blocks_at_or_below_published=int(np.sum(means <= published + 5e-4)),
               blocks=int(len(blocks)), published=published)
        )  # fmt: skip
  return tables


def main(args) -> None:
  trials, spread = args.trials, args.spread
  if spread is None:
    spread = 0 if args.paper else (20 * trials if args.quick else 10_000)
  protocols = ("clean", "authors") if args.protocol == "both" else (args.protocol,)
  names = ["seesaw", "anti_saddle"] if args.quick else None
  run_study(args.out, trials=trials, seed=args.seed, repeats=1 if args.quick else 3, names=names,
            paper=args.paper, protocols=protocols, spread=spread)  # fmt: skip
