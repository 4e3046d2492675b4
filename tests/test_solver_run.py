"""``kbeam_jax.run``: a static step count records the trajectory; a traced one serves every
count from one compiled program."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kbeam_jax
from kbeam_jax import minimax

SOLVER = minimax.alternating_gda(lambda u, v: u * v - 0.5 * v**2, optax.sgd(0.1), optax.sgd(0.1))
STATE = SOLVER.init(jax.random.key(0), jnp.array(1.0), jnp.array(0.5))


def test_traced_step_count_equals_the_static_one(compile_counter):
  run = jax.jit(lambda s, n: kbeam_jax.run(SOLVER.step, s, n))
  for n in (0, 3, 7):
    traced, trajectory = run(STATE, jnp.int32(n))
    static, infos = kbeam_jax.run(SOLVER.step, STATE, n)
    assert trajectory is None and len(jax.tree.leaves(infos)[0]) == n
    np.testing.assert_allclose(traced.u, static.u, rtol=1e-6)
  compile_counter.reset()
  run(STATE, jnp.int32(11))
  assert compile_counter.count == 0  # one program for every count


def test_traced_step_count_refuses_a_trace_and_a_non_scalar():
  with pytest.raises(ValueError, match="records no trajectory"):
    kbeam_jax.run(SOLVER.step, STATE, jnp.int32(3), trace=lambda s, i: s.u)
  with pytest.raises(TypeError, match=r"scalar integer, got an array of int32\[2\]"):
    kbeam_jax.run(SOLVER.step, STATE, jnp.array([1, 2]))
  with pytest.raises(TypeError, match="scalar integer"):
    kbeam_jax.run(SOLVER.step, STATE, jnp.array(2.0))


def _nan_beyond_half(u, v):
  return jnp.where(u > 0.5, jnp.nan, -(u**2) + v**2 + 2 * u * v)


def _run_from(u0, num_steps=5):
  solver = minimax.kbeam(_nan_beyond_half, optax.sgd(0.5), optax.sgd(0.05))
  state = solver.init(jax.random.key(0), u0, jnp.zeros(3), num_beams=3)
  trace = None if isinstance(num_steps, jax.Array) else (lambda s, info: None)
  return kbeam_jax.run(solver.step, state, num_steps, trace=trace)[0].u


def _solver_warnings(record):
  return [str(w.message) for w in record if issubclass(w.category, kbeam_jax.SolverWarning)]


def test_vmapped_runs_warn_once_from_one_callback():
  """Under vmap the run's warning stays one host callback for the whole batch
  (``jax.debug.callback`` alone unrolls into one per run), and the one warning counts the
  flagged runs."""
  fn = jax.jit(jax.vmap(_run_from))
  u0 = jnp.array([0.0, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0])
  assert fn.lower(u0).as_text().count("callback") == 1
  with pytest.warns(kbeam_jax.SolverWarning) as record:
    jax.block_until_ready(fn(u0))
  assert len(_solver_warnings(record)) == 1
  assert "up to 5 of 5 steps in 3 of 8 vmapped runs were skipped" in _solver_warnings(record)[0]


def test_nested_vmaps_and_a_vmapped_step_count_warn_once():
  fn = jax.jit(jax.vmap(jax.vmap(_run_from)))
  u0 = jnp.array([[0.0, 1.0, 0.0, 0.0], [2.0, 0.0, 0.0, 3.0]])
  assert fn.lower(u0).as_text().count("callback") == 1
  with pytest.warns(kbeam_jax.SolverWarning) as record:
    jax.block_until_ready(fn(u0))
  messages = _solver_warnings(record)
  assert len(messages) == 1 and "in 3 of 8 vmapped runs" in messages[0]
  steps = jax.jit(jax.vmap(_run_from))
  with pytest.warns(kbeam_jax.SolverWarning, match="up to 7 of 2–7 steps in 2 of 2") as record:
    jax.block_until_ready(steps(jnp.array([1.0, 2.0]), jnp.array([2, 7])))
  assert len(_solver_warnings(record)) == 1


def test_a_differentiated_flagged_run_warns_once():
  with pytest.warns(kbeam_jax.SolverWarning, match="5 of 5 steps were skipped") as record:
    jax.block_until_ready(jax.grad(lambda u: jnp.sum(_run_from(u)))(jnp.float32(1.0)))
  assert len(_solver_warnings(record)) == 1


def test_clean_runs_make_no_host_call(monkeypatch):
  """A clean run calls nothing on the host (the callback sits behind a ``lax.cond``)."""
  from kbeam_jax import _solver

  calls = []
  monkeypatch.setattr(_solver, "_warn", lambda *a: calls.append(a))
  with warnings.catch_warnings():
    warnings.simplefilter("error", kbeam_jax.SolverWarning)
    jax.block_until_ready(jax.jit(jax.vmap(jax.vmap(_run_from)))(jnp.zeros((2, 3))))
    assert not calls
    jax.block_until_ready(jax.jit(jax.vmap(_run_from))(jnp.array([0.0, 1.0])))
  assert len(calls) == 1


def test_warn_false_leaves_the_callback_out():
  """``warn=False``: no host callback in the program (so JAX's persistent cache can keep
  it), no warning, the same final state."""
  solver = minimax.kbeam(_nan_beyond_half, optax.sgd(0.5), optax.sgd(0.05))
  state = solver.init(jax.random.key(0), jnp.float32(1.0), jnp.zeros(3), num_beams=3)
  quiet = jax.jit(lambda s: kbeam_jax.run(solver.step, s, 5, warn=False)[0].u)
  assert "callback" not in quiet.lower(state).as_text()
  with warnings.catch_warnings():
    warnings.simplefilter("error", kbeam_jax.SolverWarning)
    u = quiet(state)
  with pytest.warns(kbeam_jax.SolverWarning, match="5 of 5 steps were skipped"):
    assert float(jax.jit(lambda s: kbeam_jax.run(solver.step, s, 5)[0].u)(state)) == float(u)
  with pytest.raises(TypeError, match="warn must be True or False"):
    kbeam_jax.run(solver.step, state, 5, warn="no")


def test_run_inside_shard_map_with_vma_checks():
  """The flag counts are scan outputs, not a carry started from a constant: a carry must
  vary over the same mesh axes in and out under ``shard_map(check_vma=True)``."""
  from jax.sharding import PartitionSpec as P

  mesh = jax.make_mesh((1,), ("d",))
  solver = minimax.alternating_gda(
    lambda u, v: -(u**2) + v**2 + 2 * u * v, optax.sgd(0.1), optax.sgd(0.1)
  )

  def per_shard(u0):
    state = solver.init(jax.random.key(0), u0[0], 0.0 * u0[0])
    return kbeam_jax.run(solver.step, state, 5, trace=lambda s, info: None)[0].u[None]

  fn = jax.shard_map(per_shard, mesh=mesh, in_specs=P("d"), out_specs=P("d"), check_vma=True)
  x = jax.device_put(jnp.array([0.1]), jax.NamedSharding(mesh, P("d")))
  alone = solver.init(jax.random.key(0), jnp.float32(0.1), jnp.float32(0.0))
  np.testing.assert_allclose(
    jax.jit(fn)(x)[0], kbeam_jax.run(solver.step, alone, 5, trace=lambda s, info: None)[0].u
  )
