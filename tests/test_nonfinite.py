"""Non-finite values are never silent: left-out beams, skipped steps, NaN certificates."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _cases import RULE_NAMES, rules

from kbeam_jax import minimax


def table_game(values, zs):
  """``f(u, v) = values_k + <z_k, u>`` for the beam ``v = e_k``; NaN/inf stay in beam k."""
  values, zs = jnp.asarray(values), jnp.asarray(zs)
  f = lambda u, v: (values + zs @ u)[jnp.argmax(v)]
  return f, jnp.zeros(zs.shape[1]), jnp.eye(len(values))


ZS = [[1.0, 0.0], [-1.0, 0.5], [0.0, -1.0]]


@pytest.mark.parametrize("name", RULE_NAMES)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_nonfinite_beam_is_left_out(name, bad):
  rule = rules(0.5)[name]
  f, u, beams = table_game([bad, 1.0, 0.9], ZS)
  solver = minimax.kbeam(f, optax.sgd(0.1), optax.sgd(0.0), rule=rule)
  state, info = solver.step(solver.init(jax.random.key(0), u, beams, num_beams=3))
  assert int(info.num_nonfinite) == 1 and int(info.best) == 1 and bool(info.update_finite)
  # The step is the one the two finite beams give on their own.
  f2, _, beams2 = table_game([1.0, 0.9], ZS[1:])
  ref, ref_info = minimax.kbeam(f2, optax.sgd(0.1), optax.sgd(0.0), rule=rule).step(
    minimax.kbeam(f2, optax.sgd(0.1), optax.sgd(0.0), rule=rule).init(
      jax.random.key(0), u, beams2, num_beams=2
    )
  )
  if name != "random":  # random draws its weights over 3 entries, not 2
    np.testing.assert_allclose(state.u, ref.u, atol=1e-6)
    np.testing.assert_allclose(info.certificate, ref_info.certificate, atol=1e-6)
  assert np.all(np.isfinite(state.u)) and np.isfinite(info.certificate)


@pytest.mark.parametrize("name", RULE_NAMES)
def test_no_valid_beam_skips_the_step_and_certifies_nothing(name):
  rule = rules(0.5)[name]
  f, u, beams = table_game([np.nan, np.nan], ZS[:2])
  solver = minimax.kbeam(f, optax.adam(0.1), optax.sgd(0.0), rule=rule)
  state0 = solver.init(jax.random.key(0), u + 0.3, beams, num_beams=2)
  state, info = jax.jit(solver.step)(state0)
  assert not bool(info.update_finite) and int(info.num_nonfinite) == 2
  assert np.isnan(info.certificate)  # nothing measured: NaN, never 0
  np.testing.assert_array_equal(state.u, state0.u)
  assert int(state.leader_state[0].count) == 0  # Adam's state did not move either


def test_a_nonfinite_update_is_skipped_and_flagged():
  f = lambda u, v: jnp.sqrt(u) * v  # ∇_u at u = 0 is inf, the value is finite
  solver = minimax.kbeam(f, optax.sgd(0.1), optax.sgd(0.1))
  state, info = solver.step(
    solver.init(jax.random.key(0), jnp.array(0.0), jnp.ones((2,)), num_beams=2)
  )
  assert not bool(info.update_finite) and float(state.u) == 0.0
  assert int(info.num_nonfinite) == 0  # the values were finite


def test_transform_guards_its_own_updates():
  f = lambda u, v: jnp.sum(u * v) * jnp.where(jnp.sum(u) > 0.5, jnp.nan, 1.0)
  tx = minimax.kbeam_sgd(-1.0, optax.sgd(0.0), jnp.ones((2, 2)))  # steps uphill, into the NaN
  u, state = jnp.zeros(2), tx.init(jnp.zeros(2))
  assert np.isnan(optax.tree.get(state, "certificate"))  # nothing measured yet
  for _ in range(3):
    updates, state = tx.update(None, state, u, minimax_fn=f)
    u = optax.apply_updates(u, updates)
  assert np.all(np.isfinite(u)) and float(jnp.sum(u)) > 0.5
  assert not bool(optax.tree.get(state, "last_finite"))
  assert int(optax.tree.get(state, "total_notfinite")) >= 1
  assert int(optax.tree.get(state, "num_nonfinite")) == 2


def test_apply_if_finite_around_kbeam_sgd_no_longer_lets_nan_through():
  f = lambda u, v: jnp.sum(u * v) * jnp.where(jnp.sum(u) > 0.5, jnp.nan, 1.0)
  tx = optax.apply_if_finite(minimax.kbeam_sgd(-1.0, optax.sgd(0.0), jnp.ones((2, 2))), 5)
  u, state = jnp.zeros(2), tx.init(jnp.zeros(2))
  for _ in range(3):
    updates, state = tx.update(jnp.zeros(2), state, u, minimax_fn=f)
    u = optax.apply_updates(u, updates)
  assert np.all(np.isfinite(u))


def test_empty_beams_give_a_clear_error():
  with pytest.raises(ValueError, match="beams must be the K beams stacked on a leading axis"):
    minimax.scale_by_kbeam(optax.sgd(0.1), {})


def test_best_rule_certificate_on_a_nonsmooth_max():
  """``max_v u·v`` over v = ±1 is |u|: at u = 0 the gradient at the best beam has norm 1,
  the ε-certificate is 0 (u is stationary)."""
  f = lambda u, v: u * v
  beams = jnp.array([-1.0, 1.0])
  plain = minimax.kbeam(f, optax.sgd(0.1), optax.sgd(0.0))
  _, info = plain.step(plain.init(jax.random.key(0), jnp.array(0.0), beams, num_beams=2))
  assert float(info.certificate) == 1.0
  certified = minimax.kbeam(f, optax.sgd(0.1), optax.sgd(0.0), certificate_epsilon=0.01)
  state, info = certified.step(
    certified.init(jax.random.key(0), jnp.array(0.0), beams, num_beams=2)
  )
  assert abs(float(info.certificate)) < 1e-6
  assert float(state.u) != 0.0  # still the best rule's step, along one beam's gradient
  tx = minimax.scale_by_kbeam(optax.sgd(0.0), beams, certificate_epsilon=0.01)
  _, tx_state = tx.update(None, tx.init(jnp.array(0.0)), jnp.array(0.0), minimax_fn=f)
  assert abs(float(tx_state.certificate)) < 1e-6


@pytest.mark.parametrize(
  "make", [minimax.simultaneous_gda, minimax.alternating_gda, minimax.extragradient]
)
def test_gda_skips_and_flags_a_nonfinite_step(make):
  f = lambda u, v: jnp.sqrt(u) * v  # ∇_u at u = 0 is inf
  solver = make(f, optax.sgd(0.1), optax.sgd(0.1))
  state0 = solver.init(jax.random.key(0), jnp.array(0.0), jnp.array(1.0))
  state, info = solver.step(state0)
  assert not bool(info.update_finite)
  assert float(state.u) == 0.0 and float(state.v) == 1.0
