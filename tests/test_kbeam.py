"""K-beam solver: K = 1 is alternating GDA, vmapped beams equal a loop, the transform
equals the solver, and it runs inside ``nnx.Optimizer``."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _cases import RULE_NAMES, rules
from flax import nnx

from kbeam_jax import minimax
from kbeam_jax.tasks import surfaces


def objective(u, v, scale):
  """A coupled non-quadratic game on dict/list pytrees."""
  a, b = u["a"], u["b"]
  x, y = v[0], v[1]
  return (
    scale * jnp.sum(jnp.tanh(a) * x)
    + jnp.sum(b**2) * jnp.sum(y)
    - 0.5 * jnp.sum(x**2)
    - 0.5 * jnp.sum(y**2)
    + 0.1 * jnp.sum(a**2)
  )


def leader_u():
  return {"a": jnp.array([0.5, -1.0, 0.3]), "b": jnp.array([[0.2, 0.1]])}


def beam_init(key):
  k1, k2 = jax.random.split(key)
  return [jax.random.normal(k1, (3,)), jax.random.normal(k2, (2,))]


def test_k1_equals_alternating_gda_step_for_step():
  leader, follower = optax.adam(0.05), optax.sgd(0.1, momentum=0.5)
  kb = minimax.kbeam(objective, leader, follower)
  gda = minimax.alternating_gda(objective, leader, follower)
  key = jax.random.key(0)
  s_k = kb.init(key, leader_u(), beam_init, num_beams=1)
  v0 = jax.tree.map(lambda x: x[0], s_k.beams)
  s_g = gda.init(key, leader_u(), v0)
  step_k, step_g = jax.jit(kb.step), jax.jit(gda.step)
  for _ in range(25):
    s_k, info = step_k(s_k, 1.5)
    s_g, ginfo = step_g(s_g, 1.5)
    # The same operations in the same order; the two compiled programs may still round
    # differently in a few ulps (XLA fuses the K-beam step's masks and guards differently).
    for x, y in zip(jax.tree.leaves(s_k.u), jax.tree.leaves(s_g.u), strict=True):
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
    for x, y in zip(jax.tree.leaves(s_k.beams), jax.tree.leaves(s_g.v), strict=True):
      np.testing.assert_allclose(x[0], y, rtol=1e-5, atol=1e-7)
    # f itself is evaluated vmapped over one beam: the reported value may differ by an ulp.
    np.testing.assert_allclose(info.values[0], ginfo.value, rtol=1e-6, atol=1e-7)


def reference_step(f, leader, follower, state, *args):
  """One K-beam step with a Python loop over the beams, for comparison."""
  K = jax.tree.leaves(state.beams)[0].shape[0]
  beam = lambda tree, k: jax.tree.map(lambda x: x[k], tree)
  values = [f(state.u, beam(state.beams, k), *args) for k in range(K)]
  best = int(np.argmax(values))
  z = jax.grad(f)(state.u, beam(state.beams, best), *args)
  updates, leader_state = leader.update(z, state.leader_state, state.u)
  u = optax.apply_updates(state.u, updates)
  new_beams, new_states = [], []
  for k in range(K):
    v, s = beam(state.beams, k), beam(state.follower_state, k)
    g = jax.tree.map(jnp.negative, jax.grad(f, argnums=1)(u, v, *args))
    upd, s = follower.update(g, s, v)
    new_beams.append(optax.apply_updates(v, upd))
    new_states.append(s)
  stack = lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
  return state._replace(
    u=u,
    beams=stack(new_beams),
    leader_state=leader_state,
    follower_state=stack(new_states),
    count=state.count + 1,
  )


def test_vmapped_beams_equal_a_loop_over_beams():
  with jax.enable_x64(True):
    leader, follower = optax.sgd(0.05), optax.adam(0.1)
    kb = minimax.kbeam(objective, leader, follower)
    state = kb.init(
      jax.random.key(1),
      jax.tree.map(lambda x: x.astype(jnp.float64), leader_u()),
      beam_init,
      num_beams=4,
    )
    ref = state
    for _ in range(10):
      state, _ = kb.step(state, 2.0)
      ref = reference_step(objective, leader, follower, ref, 2.0)
      for x, y in zip(
        jax.tree.leaves((state.u, state.beams, state.follower_state)),
        jax.tree.leaves((ref.u, ref.beams, ref.follower_state)),
        strict=True,
      ):
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-14)


def test_num_ascent_takes_j_steps_per_beam():
  f = lambda u, v: u * v - 0.5 * v**2  # ∇_v f = u - v
  kb = minimax.kbeam(f, optax.sgd(0.0), optax.sgd(0.5), ascent_steps=3)
  state = kb.init(jax.random.key(0), jnp.array(1.0), jnp.array([0.0, 2.0]), num_beams=2)
  state, _ = kb.step(state)
  # v ← v + 0.5 (1 - v), three times: 0 → 0.875, 2 → 1.125.
  np.testing.assert_allclose(state.beams, [0.875, 1.125], rtol=1e-6)


def test_projections_are_applied():
  f = lambda u, v: u * v
  kb = minimax.kbeam(
    f, optax.sgd(10.0), optax.sgd(10.0), project_u=surfaces.project, project_v=surfaces.project
  )
  state = kb.init(jax.random.key(0), jnp.array(0.1), jnp.array([0.3, -0.2]), num_beams=2)
  state, _ = kb.step(state)
  assert float(state.u) == -0.5
  np.testing.assert_allclose(state.beams, [-0.5, -0.5])


def test_info_reports_all_beams():
  f = lambda u, v: -((u - v) ** 2)
  kb = minimax.kbeam(f, optax.sgd(0.1), optax.sgd(0.1), rule=minimax.MinNorm(0.5))
  state = kb.init(jax.random.key(0), jnp.array(0.0), jnp.array([-1.0, 1.0, 3.0]), num_beams=3)
  _, info = kb.step(state)
  np.testing.assert_allclose(info.values, [-1.0, -1.0, -9.0])
  assert int(info.eps_set_size) == 2
  # z = -2(u - v): (2, -2) in the ε-set; 0 is in their hull.
  np.testing.assert_allclose(info.certificate, 0.0, atol=1e-6)
  assert int(info.best) in (0, 1)


def test_kiwiel_line_search_shrinks_a_too_long_step_and_null_steps():
  f = lambda u, v: (u - v) ** 2 * 0.0 + u**2  # F(u) = u², one beam
  long = minimax.kbeam(f, optax.sgd(4.0), optax.sgd(0.0), rule=minimax.Kiwiel(0.1))
  state = long.init(jax.random.key(0), jnp.array(1.0), jnp.zeros((1,)), num_beams=1)
  state, info = long.step(state)
  # sgd proposes u = 1 - 4·2 = -7; t = 1/4 lands on u = -1 (no decrease), t = 1/8 on 0.
  np.testing.assert_allclose(info.step_scale, 0.125)
  np.testing.assert_allclose(state.u, 0.0, atol=1e-7)
  up = minimax.kbeam(f, optax.sgd(-1.0), optax.sgd(0.0), rule=minimax.Kiwiel(0.1))
  state = up.init(jax.random.key(0), jnp.array(1.0), jnp.zeros((1,)), num_beams=1)
  state, info = up.step(state)  # an ascent proposal is never accepted
  assert float(info.step_scale) == 0.0 and float(state.u) == 1.0


def test_epsilon_schedule_is_used():
  f = lambda u, v: -((u - v) ** 2)
  eps = optax.linear_schedule(10.0, 0.0, 1)
  kb = minimax.kbeam(f, optax.sgd(0.0), optax.sgd(0.0), rule=minimax.MinNorm(eps))
  state = kb.init(jax.random.key(0), jnp.array(0.0), jnp.array([-1.0, 2.0]), num_beams=2)
  state, info = kb.step(state)
  assert int(info.eps_set_size) == 2
  _, info = kb.step(state)
  assert int(info.eps_set_size) == 1


@pytest.mark.parametrize("name", RULE_NAMES)
def test_transform_matches_the_solver(name):
  leader, follower = optax.sgd(0.05), optax.sgd(0.1)
  # Kiwiel: the transform has no line search; the solver's must take the plain step.
  kwargs = dict(rule=rules(0.3)[name])
  solver = minimax.kbeam(objective, leader, follower, **kwargs)
  state = solver.init(jax.random.key(2), leader_u(), beam_init, num_beams=3)
  tx = optax.chain(
    minimax.scale_by_kbeam(follower, state.beams, key=jax.random.key(2), **kwargs), leader
  )
  u, opt_state = leader_u(), tx.init(leader_u())
  update = jax.jit(lambda g, s, p: tx.update(g, s, p, minimax_fn=lambda a, b: objective(a, b, 1.0)))
  for _ in range(8):
    state, info = solver.step(state, 1.0)
    if name == "kiwiel":
      assert float(info.step_scale) == 1.0  # so the solver took the plain step
    updates, opt_state = update(None, opt_state, u)
    u = optax.apply_updates(u, updates)
    for x, y in zip(jax.tree.leaves(u), jax.tree.leaves(state.u), strict=True):
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(optax.tree.get(opt_state, "values"), info.values, rtol=1e-5)


def test_transform_warns_when_a_transform_before_it_is_dropped():
  """Weight decay chained before K-beam would vanish with the ignored grads: a warning says so,
  under jit and vmap too; None, zeros, and decay chained after stay silent."""
  f = lambda u, v: jnp.sum(u * v + u**2)
  beams = jnp.zeros((3, 2))

  def step(tx, grads, u):
    return tx.update(grads, tx.init(u), u, minimax_fn=f)[0]

  before = optax.chain(
    optax.add_decayed_weights(0.1), minimax.scale_by_kbeam(optax.sgd(0.1), beams), optax.sgd(0.1)
  )
  after = optax.chain(
    minimax.scale_by_kbeam(optax.sgd(0.1), beams), optax.add_decayed_weights(0.1), optax.sgd(0.1)
  )
  u = jnp.ones(2)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    jax.block_until_ready(jax.jit(lambda u: step(after, jnp.zeros_like(u), u))(u))
    jax.block_until_ready(step(before, None, u))  # nothing upstream to drop
    jax.block_until_ready(jax.vmap(lambda u: step(after, jnp.zeros_like(u), u))(jnp.ones((2, 2))))
  for run in (
    lambda: step(before, jnp.zeros_like(u), u),
    lambda: jax.jit(lambda u: step(before, jnp.zeros_like(u), u))(u),
    lambda: jax.vmap(lambda u: step(before, jnp.zeros_like(u), u))(jnp.ones((2, 2))),
  ):
    with pytest.warns(UserWarning, match="add_decayed_weights"):
      jax.block_until_ready(run())
      jax.effects_barrier()


class Leader(nnx.Module):
  def __init__(self, rngs):
    self.linear = nnx.Linear(2, 2, rngs=rngs)

  def __call__(self, x):
    return self.linear(x)


def test_transform_inside_nnx_optimizer():
  x = jnp.array([[1.0, 0.5], [-0.3, 2.0]])
  model = Leader(nnx.Rngs(0))
  graphdef, params0 = nnx.split(model, nnx.Param)
  params0 = nnx.as_pure(params0)  # plain arrays: the optimizer below updates model in place

  def minimax_fn(params, v):
    out = nnx.merge(graphdef, params)(x)
    return jnp.mean(out @ v) + 0.5 * jnp.mean(out**2) - 0.5 * jnp.sum(v**2)

  beams = jax.random.normal(jax.random.key(3), (4, 2))
  tx = minimax.kbeam_sgd(0.1, optax.sgd(0.1), beams)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  grads = nnx.grad(lambda m: 0.0 * jnp.mean(m(x)))(model)  # zeros: ignored by the transform
  for _ in range(5):
    optimizer.update(model, grads, minimax_fn=minimax_fn)

  # The same five updates on the pure parameter arrays, outside nnx.
  params = params0
  opt_state = tx.init(params)
  for _ in range(5):
    updates, opt_state = tx.update(None, opt_state, params, minimax_fn=minimax_fn)
    params = optax.apply_updates(params, updates)
  np.testing.assert_allclose(model.linear.kernel[...], params["linear"]["kernel"], rtol=1e-6)
  np.testing.assert_allclose(
    nnx.as_pure(optax.tree.get(optimizer.opt_state, "values")),
    optax.tree.get(opt_state, "values"),
    rtol=1e-6,
  )
  assert int(nnx.as_pure(optax.tree.get(optimizer.opt_state, "count"))) == 5


@pytest.mark.parametrize("rule", [minimax.Best(), minimax.MinNorm(0.3), minimax.Kiwiel(0.3)])
def test_num_active_equals_fewer_stacked_beams(rule):
  """K_max = 5 stacked beams with 2 active: the same steps as K = 2; the other beams stay."""
  solver = minimax.kbeam(objective, optax.sgd(0.05), optax.sgd(0.1), rule=rule)
  five = solver.init(jax.random.key(3), leader_u(), beam_init, num_beams=5, num_active=2)
  two = solver.init(
    jax.random.key(3), leader_u(), jax.tree.map(lambda x: x[:2], five.beams), num_beams=2
  )
  two = two._replace(key=five.key)
  step = jax.jit(solver.step)
  for _ in range(6):
    five, info5 = step(five, 1.0)
    two, info2 = step(two, 1.0)
    np.testing.assert_allclose(info5.certificate, info2.certificate, rtol=1e-5, atol=1e-6)
  for x, y in zip(jax.tree.leaves(five.u), jax.tree.leaves(two.u), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  for x, y, x0 in zip(
    jax.tree.leaves(five.beams),
    jax.tree.leaves(two.beams),
    jax.tree.leaves(solver.init(jax.random.key(3), leader_u(), beam_init, num_beams=5).beams),
    strict=True,
  ):
    np.testing.assert_allclose(x[:2], y, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(x[2:], x0[2:])  # inactive beams never move


def test_one_program_for_every_beam_count():
  solver = minimax.kbeam(objective, optax.sgd(0.05), optax.sgd(0.1), rule=minimax.MinNorm(0.3))

  @jax.jit
  def final_u(n):
    state = solver.init(jax.random.key(0), leader_u(), beam_init, num_beams=4, num_active=n)
    return jax.lax.fori_loop(0, 3, lambda _, s: solver.step(s, 1.0)[0], state).u

  finals = [final_u(n) for n in range(1, 5)]
  assert final_u._cache_size() == 1
  assert not np.allclose(finals[0]["a"], finals[3]["a"])  # the beam count mattered


def test_num_active_out_of_range():
  solver = minimax.kbeam(objective, optax.sgd(0.05), optax.sgd(0.1))
  for bad in (0, 4, 1.5, True):
    with pytest.raises(ValueError, match="num_active .* from 1 to K=3"):
      solver.init(jax.random.key(0), leader_u(), beam_init, num_beams=3, num_active=bad)
  with pytest.raises(ValueError, match="num_active"):
    minimax.scale_by_kbeam(optax.sgd(0.1), jnp.zeros((3, 2)), num_active=5)


def test_alternating_gda_max_first_by_hand():
  f = lambda u, v: u * v - 0.5 * v**2  # ∇_u f = v, ∇_v f = u - v
  solver = minimax.alternating_gda(f, optax.sgd(0.5), optax.sgd(0.5), order="max_first")
  state, info = solver.step(solver.init(jax.random.key(0), jnp.array(1.0), jnp.array(0.0)))
  # v ← 0 + 0.5 (1 - 0) = 0.5, then u ← 1 - 0.5 · 0.5 = 0.75; min first would leave u at 1.
  np.testing.assert_allclose([state.u, state.v], [0.75, 0.5])
  np.testing.assert_allclose(info.value, 0.0)
  with pytest.raises(ValueError, match="order must be"):
    minimax.alternating_gda(f, optax.sgd(0.5), optax.sgd(0.5), order="v_first")
