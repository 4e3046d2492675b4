"""jaxopt beside kbeam_jax, in the same process: the peer rows of ``bilevel_scaling``, each
program compiled, then timed in turns (medians), its accuracy measured against a float64
reference. ``None`` rows when jaxopt is not installed (``pip install -e ".[peers]"``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import _common
from kbeam_jax import bilevel

try:
  import jaxopt
except ImportError:
  jaxopt = None


def compare(programs: dict[str, Callable], args: tuple, repeats: int, score: Callable, name: str):
  """Compiles every program for ``args``, runs each once, then times them in turns; returns
  ``{"<k>_seconds": median, "<k>_<name>": score(output)}`` for each program ``k``."""
  compiled = {k: jax.jit(fn).lower(*args).compile() for k, fn in programs.items()}
  for c in compiled.values():
    jax.block_until_ready(c(*args))
  timed = _common.in_turns({k: functools.partial(c, *args) for k, c in compiled.items()}, repeats)
  row = {}
  for k, c in compiled.items():
    row |= {f"{k}_seconds": timed[k][0], f"{k}_{name}": score(c(*args))}
  return row


def _error(ref) -> Callable[[Any], float]:
  ref = np.asarray(ref, np.float64)
  return lambda x: float(np.linalg.norm(np.asarray(x, np.float64) - ref) / np.linalg.norm(ref))


def _wide(tree):
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), tree)


def _peer_inner(g, T: int, inner_lr: float, solve):
  """jaxopt's ``custom_root`` around the same T descent steps on ``g`` (their own derivative
  rule unused), its linear system solved by ``solve``."""
  optimality = lambda v, u, *data: jax.grad(g, argnums=1)(u, v, *data)
  return jaxopt.implicit_diff.custom_root(optimality, solve=solve)(
    lambda v0, u, *data: bilevel.argmin(
      g, u, v0, *data, method=bilevel.Naive(), inner_steps=T, inner_lr=inner_lr
    )
  )


def hypergradient_row(
  problem, T: int, V: int, solve_steps: int, inner_lr: float, repeats: int, kind: str
) -> dict[str, Any] | None:
  """One hypergradient through the same T-step inner loop: jaxopt ``custom_root`` + its CG
  (``solve_steps`` iterations, all of them) against ``bilevel.CG`` (the default, with its
  minimum-norm fallback, and ``fallback=False``), both stopping at ``solve_steps``.
  Errors: against the same implicit hypergradient in float64 with 2,000 CG iterations."""
  if jaxopt is None:
    return None
  f, g, args = problem(kind, V)
  solve = functools.partial(jaxopt.linear_solve.solve_cg, maxiter=solve_steps, tol=0.0)
  inner = _peer_inner(g, T, inner_lr, solve)
  hypergradient = functools.partial(bilevel.hypergradient, f, g, inner_steps=T, inner_lr=inner_lr)
  ours = lambda method: lambda *args: hypergradient(*args, method=method).grad
  programs = {
    "jaxopt": lambda u, v0, *data: jax.grad(lambda u_: f(u_, inner(v0, u_, *data), *data))(u),
    "cg": ours(bilevel.CG(solve_steps)),
    "cg_plain": ours(bilevel.CG(solve_steps, fallback=False)),
  }
  with jax.enable_x64(True):
    reference = jax.jit(ours(bilevel.CG(2000, tol=1e-12)))(*_wide(args))
  row = dict(problem=kind, T=T, V=int(args[1].size))
  return row | compare(programs, args, repeats, _error(reference), "error")


def ridge_objective(l2, w, x, y):
  """jaxopt's example: ``½ mean((Xw - y)²) + ½ l2 |w|²``."""
  return 0.5 * jnp.mean((x @ w - y) ** 2) + 0.5 * l2 * jnp.sum(w**2)


def ridge_closed_form(l2, w0, x, y):
  """``(XᵀX + l2·n·I)⁻¹ Xᵀy``, the minimizer of ``ridge_objective``."""
  del w0
  return jnp.linalg.solve(x.T @ x + l2 * len(y) * jnp.eye(x.shape[1]), x.T @ y)


def ridge_row(repeats: int) -> dict[str, Any] | None:
  """jaxopt's ridge hyperparameter example (closed-form inner solve, ``custom_root``) against
  ``argmin(..., solve=closed_form)``, and our built-in forward solves beside it: 2,000 fixed
  gradient steps (the only option before), and L-BFGS (``inner=optax.lbfgs()``, ``tol``)."""
  if jaxopt is None:
    return None
  # a regression set the size of jaxopt's (scikit-learn's diabetes, 442 × 10), split in half:
  # training for the lower problem, validation for the upper one
  kx, kw, kn = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (442, 10))
  y = x @ jax.random.normal(kw, (10,)) + 0.5 * jax.random.normal(kn, (442,))
  x_tr, y_tr, x_val, y_val = x[:221], y[:221], x[221:], y[221:]
  w0 = jnp.zeros(x_tr.shape[1])
  outer = lambda w: 0.5 * jnp.mean((x_val @ w - y_val) ** 2)
  optimality = lambda w, l2, x, y: jax.grad(ridge_objective, argnums=1)(l2, w, x, y)
  peer_solver = jaxopt.implicit_diff.custom_root(optimality)(
    lambda w0, l2, x, y: ridge_closed_form(l2, w0, x, y)
  )
  argmin = functools.partial(bilevel.argmin, ridge_objective, method=bilevel.CG(20))
  solves = {
    "jaxopt": lambda l2, w0: peer_solver(w0, l2, x_tr, y_tr),
    "ours_closed_form": lambda l2, w0: argmin(l2, w0, x_tr, y_tr, solve=ridge_closed_form),
    "ours_lbfgs": lambda l2, w0: argmin(
      l2, w0, x_tr, y_tr, inner_steps=100, tol=1e-6, inner=optax.lbfgs()
    ),
    "ours_2000_steps": lambda l2, w0: argmin(l2, w0, x_tr, y_tr, inner_steps=2000, inner_lr=0.5),
  }
  programs = {k: jax.grad(lambda l2, w0, s=s: outer(s(l2, w0))) for k, s in solves.items()}
  l2 = jnp.asarray(0.1)
  with jax.enable_x64(True):  # the exact derivative, by autodiff of the closed form
    wide_l2, x, y, xv, yv = _wide((l2, x_tr, y_tr, x_val, y_val))
    val_loss = lambda l2: 0.5 * jnp.mean((xv @ ridge_closed_form(l2, None, x, y) - yv) ** 2)
    exact = jax.grad(val_loss)(wide_l2)
  row = dict(n=int(x_tr.shape[0]), d=int(x_tr.shape[1]))
  return row | compare(programs, (l2, w0), repeats, _error(exact), "error")


def outer_row(
  problem, V: int, T: int, solve_steps: int, inner_lr: float, outer_steps: int,
  upper_lr: float, repeats: int,
) -> dict[str, Any] | None:  # fmt: skip
  """The whole outer loop, ``outer_steps`` steps of SGD on ``u``, on the separable problem:
  jaxopt's idiomatic loop (``custom_root`` around T warm-started descent steps, its CG with
  ``tol`` 1e-4 and at most ``solve_steps`` iterations, from 0 every step) against
  ``bilevel.solver`` with the same inner steps and ``CG(solve_steps, tol=1e-4)``
  warm-started from the previous step's answer. Reports the time of the whole loop and the
  upper loss ``f(u, v*(u))`` it ends at (``v*`` solved to 1e-10 in float64)."""
  if jaxopt is None:
    return None
  f, g, args = problem("separable", V)
  opt = optax.sgd(upper_lr)
  solve = functools.partial(jaxopt.linear_solve.solve_cg, maxiter=solve_steps, tol=1e-4)
  inner = _peer_inner(g, T, inner_lr, solve)

  def peer_loop(u, v, *data):
    def step(carry, _):
      u, v, s = carry
      v = inner(v, u, *data)  # warm start: the previous answer
      grad = jax.grad(lambda u_: f(u_, inner(v, u_, *data), *data))(u)
      updates, s = opt.update(grad, s, u)
      return (optax.apply_updates(u, updates), v, s), None

    return jax.lax.scan(step, (u, v, opt.init(u)), length=outer_steps)[0][0]

  solver = bilevel.solver(
    f, g, opt, bilevel.CG(solve_steps, tol=1e-4), inner_steps=T, inner_lr=inner_lr
  )

  def our_loop(u, v, *data):
    state = solver.init(jax.random.key(0), u, v)
    step = lambda s, _: (solver.step(s, *data)[0], None)
    return jax.lax.scan(step, state, length=outer_steps)[0].u

  @jax.jit
  def wide_loss(u, *data):
    v = bilevel.argmin(
      g, u, jnp.zeros(V, jnp.float64), *data, method=bilevel.Naive(), inner_steps=10_000,
      inner_lr=inner_lr, tol=1e-10,
    )  # fmt: skip
    return f(u, v, *data)

  def loss(u) -> float:
    with jax.enable_x64(True):
      return float(wide_loss(*_wide((u, *args[2:]))))

  row = dict(V=V, T=T, outer_steps=outer_steps, start_loss=loss(args[0]))
  return row | compare({"jaxopt": peer_loop, "ours": our_loop}, args, repeats, loss, "loss")
