"""Flax integration: stacked NNX beams, the linen TrainState adapter, checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen, nnx

import kbeam_jax
from kbeam_jax import minimax, nn


class MLP(nnx.Module):
  def __init__(self, rngs):
    self.a = nnx.Linear(3, 4, rngs=rngs)
    self.b = nnx.Linear(4, 1, rngs=rngs)

  def __call__(self, x):
    return self.b(jnp.tanh(self.a(x)))


def test_stack_modules_builds_independent_beams_and_applies_them_at_once():
  graphdef, beams = nn.stack_modules(MLP, jax.random.key(0), 4)
  assert beams["a"]["kernel"].shape == (4, 3, 4)
  kernels = np.asarray(beams["a"]["kernel"]).reshape(4, -1)
  assert np.linalg.matrix_rank(kernels) == 4  # four different initializations
  x = jax.random.normal(jax.random.key(1), (5, 3))
  out = nn.apply_beams(graphdef, beams, x)
  assert out.shape == (4, 5, 1)
  for k in range(4):  # the same as merging beam k and calling it
    np.testing.assert_allclose(out[k], nnx.merge(graphdef, nn.unstack(beams, k))(x), rtol=1e-6)
  # beam k is the module built from the k-th split key
  ref = nnx.split(MLP(nnx.Rngs(jax.random.split(jax.random.key(0), 4)[2])), nnx.Param)[1]
  np.testing.assert_allclose(nn.unstack(beams, 2)["b"]["kernel"], ref["b"]["kernel"][...])


def test_stack_modules_errors():
  with pytest.raises(ValueError, match="K"):
    nn.stack_modules(MLP, jax.random.key(0), 0)

  class WithStats(nnx.Module):
    def __init__(self, rngs):
      self.norm = nnx.BatchNorm(3, rngs=rngs)

  with pytest.raises(ValueError, match="nnx.Param"):
    nn.stack_modules(WithStats, jax.random.key(0), 2)


def test_stacked_nnx_beams_drive_the_kbeam_solver():
  """A follower module as K beams: the solver's max step improves every beam at once."""
  graphdef, beams = nn.stack_modules(MLP, jax.random.key(0), 3)
  x = jax.random.normal(jax.random.key(1), (16, 3))

  def f(u, v):  # the follower fits u * x[:, :1]; the leader shrinks u
    pred = nnx.merge(graphdef, v)(x)[:, 0]
    return -jnp.mean((pred - u * x[:, 0]) ** 2) + 0.1 * u**2

  solver = minimax.kbeam(f, optax.sgd(0.01), optax.adam(0.02))
  state = solver.init(jax.random.key(2), jnp.array(1.0), beams, K=3)
  state, info = kbeam_jax.run(solver.step, state, 200)
  assert info.values.shape == (200, 3)
  assert bool(jnp.all(info.values[-1] > info.values[0]))


def test_linen_train_state_forwards_extra_arguments():
  model = linen.Dense(1)
  x = jax.random.normal(jax.random.key(0), (8, 2))
  params = model.init(jax.random.key(1), x)
  beams = jax.random.normal(jax.random.key(2), (3, 1))
  f = lambda p, v: jnp.mean((model.apply(p, x)[:, 0] - v[0]) ** 2) - 0.5 * jnp.sum(v**2)
  tx = minimax.kbeam_sgd(0.1, optax.sgd(0.1), beams)
  state = nn.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  # the same steps by hand
  opt_state, p = tx.init(params), params
  for _ in range(3):
    state = state.apply_gradients(grads=params, minimax_fn=f)
    updates, opt_state = tx.update(params, opt_state, p, minimax_fn=f)
    p = optax.apply_updates(p, updates)
  assert int(state.step) == 3
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), state.params, p)
  # a dataclass field is still replaced, as in flax's TrainState
  other = lambda *a: None
  state = state.apply_gradients(grads=params, minimax_fn=f, apply_fn=other)
  assert state.apply_fn is other and int(state.step) == 4
  with pytest.raises(TypeError, match="minimax_fn"):  # the transform's own error
    state.apply_gradients(grads=params)


def test_checkpoint_round_trip_with_keys_and_mismatch(tmp_path):
  state = {"w": jnp.arange(6.0).reshape(2, 3), "n": jnp.int32(4), "key": jax.random.key(3)}
  nn.save_checkpoint(tmp_path / "c", state, history=[[0.5, 1.0]], note="x")
  restored, meta = nn.load_checkpoint(tmp_path / "c", like=state)
  np.testing.assert_array_equal(restored["w"], state["w"])
  assert restored["n"].dtype == jnp.int32
  assert bool(jnp.all(jax.random.key_data(restored["key"]) == jax.random.key_data(state["key"])))
  assert meta == {"history": [[0.5, 1.0]], "note": "x"}
  with pytest.raises(ValueError, match="shape"):
    nn.load_checkpoint(tmp_path / "c", like={**state, "w": jnp.zeros((3, 2))})
  with pytest.raises(ValueError, match="different model"):
    nn.load_checkpoint(tmp_path / "c", like={"w": state["w"]})
