"""``kbeam_jax.run``: a static step count records the trajectory; a traced one serves every
count from one compiled program."""

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
