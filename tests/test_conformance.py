"""Every solver and every transform, minimax and bilevel (the penalty method included):
converges under jit on a known problem, compiles once, keeps its state's structure,
shapes and dtypes (float32, float64, bfloat16), accepts dict/list pytrees
and extra arguments."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _cases import (
  BILEVEL_METHODS,
  SOLVERS,
  TRANSFORMS,
  bilevel_solver,
  bilevel_transform,
  game,
  init_solver,
  lower,
  stacked_beams,
  u0,
  upper,
  v0,
)
from jax.flatten_util import ravel_pytree

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


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_solver_runs_in_bfloat16(name):
  solver, state = init_solver(name, game, jnp.bfloat16)
  state, info = jax.jit(lambda s: kbeam_jax.run(solver.step, s, 100, 1.0))(state)
  beams = state.beams if hasattr(state, "beams") else state.v
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves((state.u, beams)))
  floats = [x for x in jax.tree.leaves(info) if jnp.issubdtype(x.dtype, jnp.floating)]
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in floats)
  # bfloat16 keeps about 3 significant digits: the saddle point at 0 is still found
  assert norm(state.u) < 0.05 and norm(beams) < 0.05


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_transform_runs_in_bfloat16(name):
  tx = TRANSFORMS[name](stacked_beams(jnp.bfloat16))
  params = u0(jnp.bfloat16)
  state = tx.init(params)
  update = jax.jit(lambda p, s: tx.update(p, s, p, minimax_fn=game))
  for _ in range(150):
    updates, state = update(params, state)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(updates))
    params = optax.apply_updates(params, updates)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
  assert norm(params) < 0.05


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


# --- bilevel solvers and transforms --------------------------------------------------------


def bilevel_solution(name, scale=1.0):
  return 0.0 if name == "naive" else scale / (1.0 + scale**2)


@pytest.mark.parametrize("name", sorted(BILEVEL_METHODS))
def test_bilevel_solver_converges_under_jit_with_extra_args(name):
  solver = bilevel_solver(name)
  state = solver.init(jax.random.key(0), u0(), v0())
  run = jax.jit(lambda s: kbeam_jax.run(solver.step, s, 400, 2.0))  # scale = 2 as an arg
  state, trajectory = run(state)
  expected = bilevel_solution(name, 2.0)
  np.testing.assert_allclose(ravel_pytree(state.u)[0], expected, atol=2e-3)
  assert jax.tree.structure(state.u) == jax.tree.structure(u0())
  assert jax.tree.leaves(trajectory)[0].shape[0] == 400


@pytest.mark.parametrize("name", sorted(BILEVEL_METHODS))
def test_bilevel_solver_compiles_once_and_keeps_its_state_shapes(name):
  solver = bilevel_solver(name)
  state = solver.init(jax.random.key(0), u0(), v0())
  step = jax.jit(solver.step)
  new, _ = step(state, 1.0)
  new, _ = step(new, 2.0)
  assert step._cache_size() == 1
  shapes = lambda s: [(x.shape, x.dtype) for x in jax.tree.leaves(s)]
  assert shapes(new) == shapes(state)
  assert jax.tree.structure(new) == jax.tree.structure(state)


@pytest.mark.parametrize("name", sorted(BILEVEL_METHODS))
def test_bilevel_solver_preserves_dtype(name, dtype):
  solver = bilevel_solver(name)
  state = solver.init(jax.random.key(0), u0(dtype), v0(dtype))
  state, info = jax.jit(solver.step)(state)
  assert all(x.dtype == dtype for x in jax.tree.leaves((state.u, state.v)))
  floats = [x for x in jax.tree.leaves(info) if jnp.issubdtype(x.dtype, jnp.floating)]
  assert all(x.dtype == dtype for x in floats)


@pytest.mark.parametrize("name", sorted(BILEVEL_METHODS))
def test_bilevel_solver_runs_in_bfloat16(name):
  solver = bilevel_solver(name)
  state = solver.init(jax.random.key(0), u0(jnp.bfloat16), v0(jnp.bfloat16))
  state, info = jax.jit(lambda s: kbeam_jax.run(solver.step, s, 50))(state)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves((state.u, state.v)))
  assert bool(info.finite.all())
  # bfloat16 keeps about 3 significant digits: the iterate still heads for the solution
  np.testing.assert_allclose(
    ravel_pytree(state.u)[0].astype(jnp.float32), bilevel_solution(name), atol=0.1
  )


@pytest.mark.parametrize("name", sorted(BILEVEL_METHODS))
def test_bilevel_transform_converges_compiles_once_and_keeps_state_shapes(name):
  tx = bilevel_transform(name, v0())
  params, state = u0(), tx.init(u0())
  update = jax.jit(
    lambda p, s: tx.update(None, s, p, upper_fn=upper, lower_fn=lower, unused_extra=3)
  )
  shapes = lambda s: [(x.shape, x.dtype) for x in jax.tree.leaves(s)]
  for _ in range(400):
    updates, new_state = update(params, state)
    assert shapes(new_state) == shapes(state)
    params, state = optax.apply_updates(params, updates), new_state
  assert update._cache_size() == 1
  np.testing.assert_allclose(ravel_pytree(params)[0], bilevel_solution(name), atol=2e-3)


@pytest.mark.parametrize("name", sorted(BILEVEL_METHODS))
def test_bilevel_transform_preserves_dtype(name, dtype):
  tx = bilevel_transform(name, v0(dtype))
  params = u0(dtype)
  updates, state = jax.jit(lambda p, s: tx.update(p, s, p, upper_fn=upper, lower_fn=lower))(
    params, tx.init(params)
  )
  assert all(x.dtype == dtype for x in jax.tree.leaves(updates))
  assert jax.tree.structure(updates) == jax.tree.structure(params)
  floats = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
  assert all(x.dtype == dtype for x in floats)
