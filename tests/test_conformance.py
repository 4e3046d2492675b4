"""Every solver and every transform: converges under jit on a known game, compiles once,
preserves dtypes, accepts dict/list pytrees and extra arguments."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _cases import SOLVERS, TRANSFORMS, game, init_solver, stacked_beams, u0

import kbeam_jax


def norm(tree):
  return float(jnp.sqrt(sum(jnp.sum(x.astype(jnp.float32) ** 2) for x in jax.tree.leaves(tree))))


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_solver_converges_under_jit(name):
  solver, state = init_solver(name, game)
  run = jax.jit(lambda s: kbeam_jax.run(solver.step, s, 300, 1.0))
  state, trajectory = run(state)
  assert norm(state.u) < 1e-3
  beams = state.beams if hasattr(state, "beams") else state.v
  assert norm(beams) < 1e-3
  assert jax.tree.leaves(trajectory)[0].shape[0] == 300


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_solver_compiles_once(name):
  solver, state = init_solver(name, game)
  step = jax.jit(solver.step)
  state, _ = step(state, 1.0)
  state, _ = step(state, 2.0)
  assert step._cache_size() == 1


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_solver_preserves_dtype(name, dtype):
  solver, state = init_solver(name, game, dtype)
  state, info = jax.jit(solver.step)(state, 1.0)
  leaves = jax.tree.leaves(state.u) + jax.tree.leaves(getattr(state, "beams", None) or state.v)
  assert all(x.dtype == dtype for x in leaves)
  assert all(
    x.dtype == dtype for x in jax.tree.leaves(info) if jnp.issubdtype(x.dtype, jnp.floating)
  )
  assert jax.tree.structure(state.u) == jax.tree.structure(u0())


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_transform_converges_under_jit(name):
  tx = TRANSFORMS[name](stacked_beams())
  params = u0()
  state = tx.init(params)
  update = jax.jit(lambda p, s: tx.update(p, s, p, minimax_fn=game, unused_extra=3))
  for _ in range(300):
    updates, state = update(params, state)
    params = optax.apply_updates(params, updates)
  assert norm(params) < 1e-3
  assert update._cache_size() == 1


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_transform_preserves_dtype_and_state_shapes(name, dtype):
  tx = TRANSFORMS[name](stacked_beams(dtype))
  params = u0(dtype)
  state = tx.init(params)
  updates, new_state = jax.jit(lambda p, s: tx.update(p, s, p, minimax_fn=game))(params, state)
  assert all(x.dtype == dtype for x in jax.tree.leaves(updates))
  assert jax.tree.structure(updates) == jax.tree.structure(params)
  shapes = lambda s: [(x.shape, x.dtype) for x in jax.tree.leaves(s)]
  assert shapes(new_state) == shapes(state)
  np.testing.assert_equal(jax.tree.structure(new_state), jax.tree.structure(state))
