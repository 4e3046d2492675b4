"""The surfaces suite's NumPy baseline, as a researcher would first write it: gradients by
hand, a Python loop per trial over iterations (and beams); GD, Alt-GD and K-beam (best),
step ``0.1/sqrt(t)``, iterates clipped to the box."""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

BOUND = 0.5
SURFACES = {  # name: (f, df/du, df/dv), by hand
  "saddle": (lambda u, v: 5.0 * (u * u - v * v), lambda u, v: 10.0 * u, lambda u, v: -10.0 * v),
  "rotated_saddle": (lambda u, v: u * u - v * v + 2.0 * u * v, lambda u, v: 2.0 * u + 2.0 * v,
                     lambda u, v: -2.0 * v + 2.0 * u),
  "seesaw": (lambda u, v: -v * math.sin(math.pi * u),
             lambda u, v: -v * math.pi * math.cos(math.pi * u),
             lambda u, v: -math.sin(math.pi * u)),
  "anti_saddle": (lambda u, v: -u * u + v * v + 2.0 * u * v, lambda u, v: -2.0 * u + 2.0 * v,
                  lambda u, v: 2.0 * v + 2.0 * u),
  "monkey_saddle": (lambda u, v: u**3 - 3.0 * u * v * v, lambda u, v: 3.0 * u * u - 3.0 * v * v,
                    lambda u, v: -6.0 * u * v),
  "concave_in_u": (lambda u, v: -0.5 * u * u + 2.0 * u * v - v * v, lambda u, v: -u + 2.0 * v,
                   lambda u, v: 2.0 * u - 2.0 * v),
}  # fmt: skip


def clip(x: float) -> float:
  return min(max(x, -BOUND), BOUND)


def gd(surface: str, u: float, v: float, num_iters: int, alternating: bool) -> float:
  """Final ``u`` of simultaneous (or alternating) gradient descent-ascent."""
  _, du, dv = SURFACES[surface]
  for t in range(1, num_iters + 1):
    rho = 0.1 / math.sqrt(t)
    gu, gv = du(u, v), dv(u, v)
    u = clip(u - rho * gu)
    if alternating:
      gv = dv(u, v)
    v = clip(v + rho * gv)
  return u


def kbeam(surface: str, u: float, beams: list[float], num_iters: int) -> float:
  """Final ``u`` of K-beam minimax with the best-beam rule: the min step at the best beam,
  then every beam one ascent step at the new ``u``."""
  f, du, dv = SURFACES[surface]
  beams = list(beams)
  for t in range(1, num_iters + 1):
    rho = 0.1 / math.sqrt(t)
    best = int(np.argmax([f(u, v) for v in beams]))
    u = clip(u - rho * du(u, beams[best]))
    beams = [clip(v + rho * dv(u, v)) for v in beams]
  return u


def compare(names, finals, u0, beams0, num_iters: int, errors) -> dict[str, Any]:
  """This loop on the JAX study's draws (protocol 'clean'): its time per surface, its mean
  error (``errors(surface, u)``) per method, and its largest distance from the JAX study's
  final ``u`` (``finals[surface][method]``) over GD, Alt-GD and K-beam K = 1, 2, 5, 10."""
  ks = (1, 2, 5, 10)
  methods = ["gd", "alt_gd"] + [f"kbeam_{K}" for K in ks]
  trials = list(zip(np.asarray(u0, np.float64), np.asarray(beams0, np.float64), strict=True))
  out: dict[str, Any] = dict(numpy_seconds={}, max_abs_diff_u={}, numpy_error_means={})
  for name in names:  # GD and Alt-GD from the first beam, K-beam from the first K
    start = time.perf_counter()
    ref = {m: np.array([gd(name, u, b[0], num_iters, m == "alt_gd") for u, b in trials])
           for m in methods[:2]}  # fmt: skip
    for K in ks:
      ref[f"kbeam_{K}"] = np.array([kbeam(name, u, b[:K], num_iters) for u, b in trials])
    out["numpy_seconds"][name] = time.perf_counter() - start
    diffs = [np.max(np.abs(ref[m] - np.asarray(finals[name][m], np.float64))) for m in methods]
    out["max_abs_diff_u"][name] = float(max(diffs))
    out["numpy_error_means"][name] = {m: float(errors(name, ref[m]).mean()) for m in methods}
  return dict(out, numpy_protocol="clean")
