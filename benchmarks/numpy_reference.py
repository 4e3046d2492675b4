"""The 2D-surface study as a researcher would first write it: NumPy, one trial at a time.

The baseline the JAX study is timed against. Gradients are written by hand, each trial
runs its own Python loop over iterations and, for K-beam, over beams. Same algorithm
as ``kbeam_jax.minimax`` with ``optax.sgd`` and step ``0.1/sqrt(t)``: GD, Alt-GD and
K-beam with the ``best`` rule (min step at the best beam, then every beam one ascent step
at the new u), every iterate clipped to the box ``[-0.5, 0.5]``. ``compare`` runs it on the
study's draws and measures its time and its distance from the study's answers.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

BOUND = 0.5

# (f, df/du, df/dv) of every surface, by hand.
SURFACES = {
  "saddle": (
    lambda u, v: 5.0 * (u * u - v * v),
    lambda u, v: 10.0 * u,
    lambda u, v: -10.0 * v,
  ),
  "rotated_saddle": (
    lambda u, v: u * u - v * v + 2.0 * u * v,
    lambda u, v: 2.0 * u + 2.0 * v,
    lambda u, v: -2.0 * v + 2.0 * u,
  ),
  "seesaw": (
    lambda u, v: -v * math.sin(math.pi * u),
    lambda u, v: -v * math.pi * math.cos(math.pi * u),
    lambda u, v: -math.sin(math.pi * u),
  ),
  "anti_saddle": (
    lambda u, v: -u * u + v * v + 2.0 * u * v,
    lambda u, v: -2.0 * u + 2.0 * v,
    lambda u, v: 2.0 * v + 2.0 * u,
  ),
  "monkey_saddle": (
    lambda u, v: u**3 - 3.0 * u * v * v,
    lambda u, v: 3.0 * u * u - 3.0 * v * v,
    lambda u, v: -6.0 * u * v,
  ),
  "concave_in_u": (
    lambda u, v: -0.5 * u * u + 2.0 * u * v - v * v,
    lambda u, v: -u + 2.0 * v,
    lambda u, v: 2.0 * u - 2.0 * v,
  ),
}


def clip(x: float) -> float:
  return min(max(x, -BOUND), BOUND)


def step_size(t: int) -> float:
  """``0.1 / sqrt(t)`` at iteration ``t = 1, 2, ...``."""
  return 0.1 / math.sqrt(t)


def gd(surface: str, u: float, v: float, num_iters: int, alternating: bool) -> float:
  """Final ``u`` of simultaneous (or alternating) gradient descent-ascent."""
  _, du, dv = SURFACES[surface]
  for t in range(1, num_iters + 1):
    rho = step_size(t)
    gu, gv = du(u, v), dv(u, v)
    u = clip(u - rho * gu)
    if alternating:
      gv = dv(u, v)
    v = clip(v + rho * gv)
  return u


def kbeam(surface: str, u: float, beams: list[float], num_iters: int) -> float:
  """Final ``u`` of K-beam minimax with the best-beam rule."""
  f, du, dv = SURFACES[surface]
  beams = list(beams)
  for t in range(1, num_iters + 1):
    rho = step_size(t)
    values = [f(u, v) for v in beams]
    best = int(np.argmax(values))
    u = clip(u - rho * du(u, beams[best]))
    for k in range(len(beams)):
      beams[k] = clip(beams[k] + rho * dv(u, beams[k]))
  return u


def study(
  surface: str, u0: np.ndarray, beams0: np.ndarray, num_iters: int, ks: tuple[int, ...]
) -> dict[str, np.ndarray]:
  """Final ``u`` of every trial for GD, Alt-GD and K-beam with each K in ``ks``.

  ``u0`` has shape ``(trials,)`` and ``beams0`` ``(trials, max(ks))``; GD and Alt-GD start
  from the first beam, K-beam from the first K.
  """
  out = {
    "gd": np.array(
      [gd(surface, u, b[0], num_iters, False) for u, b in zip(u0, beams0, strict=True)]
    ),
    "alt_gd": np.array(
      [gd(surface, u, b[0], num_iters, True) for u, b in zip(u0, beams0, strict=True)]
    ),
  }
  for K in ks:
    out[f"kbeam_{K}"] = np.array(
      [kbeam(surface, u, list(b[:K]), num_iters) for u, b in zip(u0, beams0, strict=True)]
    )
  return out


def compare(names, finals, u0, beams0, num_iters: int, errors) -> dict[str, Any]:
  """This loop on the JAX study's draws (protocol 'clean'): its time per surface, its mean
  error (``errors(surface, u)``) per method, and its largest distance from the JAX study's
  final ``u`` (``finals[surface][method]``) over GD, Alt-GD and K-beam K = 1, 2, 5, 10."""
  ks = (1, 2, 5, 10)
  methods = ["gd", "alt_gd"] + [f"kbeam_{K}" for K in ks]
  u0, beams0 = np.asarray(u0, np.float64), np.asarray(beams0, np.float64)
  out: dict[str, Any] = dict(numpy_seconds={}, max_abs_diff_u={}, numpy_error_means={})
  for name in names:
    start = time.perf_counter()
    ref = study(name, u0, beams0, num_iters, ks)
    out["numpy_seconds"][name] = time.perf_counter() - start
    diffs = [np.max(np.abs(ref[m] - np.asarray(finals[name][m], np.float64))) for m in methods]
    out["max_abs_diff_u"][name] = float(max(diffs))
    out["numpy_error_means"][name] = {m: float(errors(name, ref[m]).mean()) for m in methods}
  return dict(out, numpy_protocol="clean")
