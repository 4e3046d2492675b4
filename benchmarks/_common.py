"""Timing and report helpers shared by the benchmark suites."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np


def compile_fn(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
  """``jax.jit(fn)`` compiled for ``args``, and the seconds that took."""
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  return compiled, time.perf_counter() - start


def time_call(compiled: Callable[..., Any], *args: Any, repeats: int = 3) -> tuple[Any, float]:
  """``(output, median seconds)`` of ``repeats`` calls of a compiled function."""
  times, out = [], None
  for _ in range(max(1, repeats)):
    start = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return out, statistics.median(times)


def compile_and_time(
  fn: Callable[..., Any], *args: Any, repeats: int = 3
) -> tuple[Any, float, float]:
  """Compiles ``jax.jit(fn)`` for ``args``, then times ``repeats`` runs.

  Returns:
    ``(output, compile_seconds, median_run_seconds)``; compilation is not in the median.
  """
  compiled, compile_seconds = compile_fn(fn, *args)
  out, seconds = time_call(compiled, *args, repeats=repeats)
  return out, compile_seconds, seconds


def in_turns(calls: dict[str, Callable[[], Any]], repeats: int, desc: str | None = None):
  """``{name: (median seconds, output)}`` of every (compiled, warmed-up) call, timed in
  turns: ``repeats`` rounds, so that a change of machine load hits every call alike."""
  from tqdm.auto import tqdm

  times, outs = {name: [] for name in calls}, {}
  for _ in tqdm(range(max(repeats, 1)), desc=desc, leave=False, disable=desc is None):
    for name, call in calls.items():
      start = time.perf_counter()
      outs[name] = jax.block_until_ready(call())
      times[name].append(time.perf_counter() - start)
  return {name: (statistics.median(t), outs[name]) for name, t in times.items()}


def environment() -> dict[str, str]:
  """The machine and versions a figure was measured on."""
  device = jax.devices()[0]
  return {
    "jax": jax.__version__,
    "backend": jax.default_backend(),
    "device": getattr(device, "device_kind", str(device)),
    "python": platform.python_version(),
    "machine": platform.machine(),
  }


def write_json(path: Path, records: Sequence[dict[str, Any]], meta: dict[str, Any]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tree = {"meta": meta, "records": list(records)}
  # arrays (and NumPy scalars) as nested lists of Python numbers, dict order kept
  path.write_text(json.dumps(tree, indent=2, default=lambda x: np.asarray(x).tolist()) + "\n")


def publish(
  out: Path, name: str, records: Sequence[dict[str, Any]], meta: dict[str, Any], text: str,
  figure: Any = None,
) -> str:  # fmt: skip
  """The one report of every suite: ``{name}.json`` (``{"meta", "records"}``, the
  environment added to ``meta`` when missing), ``{name}.md`` (``text``) and, when a
  matplotlib ``figure`` is given, ``{name}.png``. Returns ``text``."""
  meta = dict(meta, environment=meta.get("environment") or environment())
  write_json(out / f"{name}.json", records, meta)
  (out / f"{name}.md").write_text(text.rstrip("\n") + "\n")
  if figure is not None:
    save_figure(figure, out / f"{name}.png")
  return text


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def table(records: Sequence[Any], columns: dict[str, Callable[[Any], Any]]) -> str:
  """A Markdown table of ``records``, a row each: ``columns`` maps a header to the cell of
  a record (``{"method": lambda r: r["method"], "JSD": lambda r: f"{r['jsd']:.3f}"}``)."""
  return markdown_table(list(columns), [[cell(r) for cell in columns.values()] for r in records])


def mean_std(mean: float, std: float) -> str:
  return f"{mean:.3f} ± {std:.3f}"


def to_python(tree: Any) -> Any:
  """Arrays to (nested lists of) Python floats/ints, for JSON and checkpoint metadata."""
  return jax.tree.map(lambda x: np.asarray(x).tolist(), tree)


def train_in_chunks(
  chunk_fn: Callable[[Any], tuple[Any, Any]],
  state: Any,
  num_chunks: int,
  *,
  checkpoint: Path | None = None,
  resume: bool = False,
  stop_after: int | None = None,
  desc: str = "train",
  after_chunk: Callable[[Any], dict[str, Any]] | None = None,
  save_every_s: float = 10.0,
) -> tuple[Any, list[Any], dict[str, Any]]:
  """Runs ``state, metrics = chunk_fn(state)`` ``num_chunks`` times with a progress bar.

  ``chunk_fn`` is one compiled program (typically a ``lax.scan`` over a fixed number of
  iterations, all randomness drawn from keys in ``state``), so a run is deterministic and
  can be cut anywhere between chunks. With ``resume=True`` (the suites' ``--resume``) an
  existing checkpoint is loaded and the run continues from it, ending with the numbers of
  an uninterrupted run; after every chunk the state and the metrics so far are saved to
  ``checkpoint`` when ``save_every_s`` seconds have passed since the last save, and always
  when the call ends, also by an exception or Ctrl-C (an orbax save costs about 0.1 s on 2
  CPU cores: after each of the poisoning suite's 400 short chunks that would be about 45 s
  of its 160). Without ``resume`` nothing is read or written.

  Args:
    chunk_fn: ``state -> (state, metrics)``; jit it yourself (compiled once, reused).
    state: the initial state (also the template the checkpoint is read into).
    num_chunks: chunks in the whole run.
    checkpoint: directory for ``kbeam_jax.nn.save_checkpoint`` (orbax; one step kept).
    resume: continue from ``checkpoint`` when it exists, and keep it up to date.
    stop_after: stop after this many chunks of this call (simulates an interrupted run).
    desc: progress-bar label.
    after_chunk: ``state -> dict`` run after every chunk, outside the timing (an
      evaluation); its entries join that chunk's metrics (which must then be a dict).
    save_every_s: least time between two checkpoint saves (0: after every chunk). A run
      killed without warning loses at most this much work.

  Returns:
    ``(state, history, timing)``: the metrics of every chunk done so far (as Python
    lists), and ``{"compile_s", "run_s", "chunks_run"}`` for this call; ``compile_s``
    is the first chunk's time minus the median of the others when the call ran more
    than one chunk.
  """
  from tqdm.auto import tqdm

  from kbeam_jax import nn

  history: list[Any] = []
  if not resume:
    checkpoint = None  # checkpoints only when asked for
  if checkpoint is not None and nn.checkpoint_exists(checkpoint):
    state, meta = nn.load_checkpoint(checkpoint, like=state)
    history = list(meta["history"])
  times = []
  start_chunk = saved = len(history)
  last_save = time.perf_counter()
  try:
    for i in tqdm(range(start_chunk, num_chunks), desc=desc, initial=start_chunk, total=num_chunks):
      if stop_after is not None and i - start_chunk >= stop_after:
        break
      start = time.perf_counter()
      new_state, metrics = chunk_fn(state)
      new_state = jax.block_until_ready(new_state)
      times.append(time.perf_counter() - start)
      if after_chunk is not None:
        metrics = dict(metrics, **after_chunk(new_state))
      history.append(to_python(metrics))
      state = new_state  # state and history advance together
      if checkpoint is not None and time.perf_counter() - last_save >= save_every_s:
        nn.save_checkpoint(checkpoint, state, history=history)
        saved, last_save = len(history), time.perf_counter()
  finally:  # also on Ctrl-C or an error: keep what was computed since the last save
    if checkpoint is not None and len(history) > saved:
      nn.save_checkpoint(checkpoint, state, history=history)
  steady = statistics.median(times[1:]) if len(times) > 1 else (times[0] if times else 0.0)
  timing = {
    "compile_s": max(times[0] - steady, 0.0) if len(times) > 1 else None,
    "chunk_s": steady,
    "run_s": sum(times),
    "chunks_run": len(times),
  }
  return state, history, timing


def keyed_steps(step: Callable[..., tuple[Any, Any]], num_steps: int):
  """``((state, key), *args) -> ((state, key), infos)``: ``num_steps`` of
  ``step(state, k, *args) -> (state, info)`` in one ``lax.scan``, each step with a key of its
  own to draw its batch (``key, k = split(key)``, then ``split(k, num_steps)``). The
  suites' chunk for steps on fresh random batches (``kbeam_jax.run`` hands every step the
  same arguments)."""

  def chunk(carry, *args):
    state, key = carry
    key, k = jax.random.split(key)
    keys = jax.random.split(k, num_steps)
    state, infos = jax.lax.scan(lambda s, k: step(s, k, *args), state, keys)
    return (state, key), infos

  return chunk


def mnist_data(make_data: Callable[..., Any], seed: int, cfg: dict[str, Any], keys: Sequence[str]):
  """A task's split of the MNIST files (``KBEAM_JAX_DATA``): ``make_data(train images, train
  labels, test images, test labels, seed=seed, **options)``, the options ``cfg``'s ``keys``."""
  from kbeam_jax import data

  train, test = data.load_mnist("train"), data.load_mnist("test")
  options = {k: cfg[k] for k in keys}
  return make_data(train.images, train.labels, test.images, test.labels, seed=seed, **options)


def save_figure(fig: Any, path: Path) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120, bbox_inches="tight")
  import matplotlib.pyplot as plt

  plt.close(fig)


def chunk_length(total: int, target: int) -> int:
  """A chunk length near ``target`` that divides ``total`` steps exactly (one compiled chunk
  serves the whole run): ``total / n`` for the largest ``n <= round(total / target)`` that
  divides ``total``. ``chunk_length(8000, 2000) == 2000``, ``chunk_length(701, 500) == 701``.
  """
  n = max(1, round(total / target))
  while total % n:
    n -= 1
  return total // n


def kbeam_rules(epsilon: float) -> dict[str, Any]:
  """Every K-beam rule value under the name the reports print, the ε-rules at ``epsilon``."""
  from kbeam_jax import minimax

  eps_rules = {"random": minimax.Random, "min_norm": minimax.MinNorm, "kiwiel": minimax.Kiwiel}
  return {"best": minimax.Best(), **{name: rule(epsilon) for name, rule in eps_rules.items()}}
