"""The 2D minimax test surfaces of the K-beam paper, on the box ``|u|, |v| <= 0.5``.

Each surface is ``f(u, v)`` with scalar players; ``u_star`` is the leader's part of the
minimax point, ``argmin_u max_{|v| <= 0.5} f(u, v)``, against which the study measures
``|u_T - u*|``.

=================  =======================  ======  ============================
name               f(u, v)                  u*      saddle point?
=================  =======================  ======  ============================
saddle             5(u² - v²)               0       yes, (0, 0)
rotated_saddle     u² - v² + 2uv            0       yes, (0, 0)
seesaw             -v sin(πu)               0       yes, (0, 0); argmax_v jumps at 0
anti_saddle        -u² + v² + 2uv           0       no: minimax points (0, ±0.5)
monkey_saddle      u³ - 3uv²                0       no: max_v F(u) = u³ or u³ - 3u/4
concave_in_u       -u²/2 + 2uv - v²         0       no: f is concave in u (and v)
=================  =======================  ======  ============================

The first four are the paper's table; the last two are further classic surfaces without
a saddle point (the monkey saddle, and the slides' example that is concave in both players).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

BOUND = 0.5


class Surface(NamedTuple):
  """A 2D minimax problem ``min_u max_v f(u, v)`` on the box ``|u|, |v| <= BOUND``."""

  name: str
  f: Callable[[jax.Array, jax.Array], jax.Array]
  u_star: float
  has_saddle: bool
  formula: str


def _saddle(u, v):
  return 5.0 * (u**2 - v**2)


def _rotated_saddle(u, v):
  return u**2 - v**2 + 2.0 * u * v


def _seesaw(u, v):
  return -v * jnp.sin(jnp.pi * u)


def _anti_saddle(u, v):
  return -(u**2) + v**2 + 2.0 * u * v


def _monkey_saddle(u, v):
  return u**3 - 3.0 * u * v**2


def _concave_in_u(u, v):
  return -0.5 * u**2 + 2.0 * u * v - v**2


SURFACES: dict[str, Surface] = {
  s.name: s
  for s in (
    Surface("saddle", _saddle, 0.0, True, "5(u² - v²)"),
    Surface("rotated_saddle", _rotated_saddle, 0.0, True, "u² - v² + 2uv"),
    Surface("seesaw", _seesaw, 0.0, True, "-v sin(πu)"),
    Surface("anti_saddle", _anti_saddle, 0.0, False, "-u² + v² + 2uv"),
    Surface("monkey_saddle", _monkey_saddle, 0.0, False, "u³ - 3uv²"),
    Surface("concave_in_u", _concave_in_u, 0.0, False, "-u²/2 + 2uv - v²"),
  )
}

# Error |u_T - u*| (mean, std over 100 trials) of Hamm & Noh (ICML 2018), Table 1,
# in the order GD, Alt-GD, K-beam K = 1, 2, 5, 10.
PUBLISHED: dict[str, list[tuple[float, float]]] = {
  "saddle": [(0.0, 0.0)] * 6,
  "rotated_saddle": [(0.0, 0.0)] * 6,
  "seesaw": [
    (0.235, 0.127),
    (0.220, 0.119),
    (0.208, 0.113),
    (0.016, 0.060),
    (0.002, 0.001),
    (0.002, 0.001),
  ],
  "anti_saddle": [
    (0.500, 0.000),
    (0.500, 0.000),
    (0.500, 0.000),
    (0.301, 0.244),
    (0.046, 0.143),
    (0.006, 0.050),
  ],
}
PUBLISHED_METHODS = ("gd", "alt_gd", "kbeam_1", "kbeam_2", "kbeam_5", "kbeam_10")


def get(name: str) -> Surface:
  """The surface called ``name``; raises a ``KeyError`` that lists the known names.

  Examples:
    >>> import jax.numpy as jnp
    >>> from kbeam_jax.tasks import surfaces
    >>> s = surfaces.get("anti_saddle")
    >>> float(s.f(jnp.array(0.0), jnp.array(0.5)))
    0.25
  """
  if name not in SURFACES:
    raise KeyError(f"unknown surface {name!r}; known surfaces: {sorted(SURFACES)}.")
  return SURFACES[name]


def project(x: jax.Array) -> jax.Array:
  """Projection onto the box ``[-BOUND, BOUND]``."""
  return jnp.clip(x, -BOUND, BOUND)


def max_value(surface: Surface, u: jax.Array, num_grid: int = 2001) -> jax.Array:
  """``max_{|v| <= BOUND} f(u, v)`` by a dense grid over ``v`` (for plots and checks).

  Examples:
    >>> import jax.numpy as jnp
    >>> from kbeam_jax.tasks import surfaces
    >>> round(float(surfaces.max_value(surfaces.get("seesaw"), jnp.array(0.5))), 4)
    0.5
  """
  v = jnp.linspace(-BOUND, BOUND, num_grid, dtype=jnp.result_type(u, float))
  return jnp.max(jax.vmap(lambda vv: surface.f(u, vv))(v))


def select(names: Sequence[str]) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
  """One objective ``f(u, v, i)`` for several surfaces: surface ``names[i]``, ``i`` a
  (traced) integer, through ``lax.switch``.

  A study over surfaces then compiles one program and picks the surface at run time.

  Examples:
    >>> import jax.numpy as jnp
    >>> from kbeam_jax.tasks import surfaces
    >>> f = surfaces.select(["saddle", "anti_saddle"])
    >>> float(f(jnp.array(0.0), jnp.array(0.5), 1))
    0.25
  """
  fs = [get(name).f for name in names]
  return lambda u, v, i: jax.lax.switch(i, fs, u, v)
