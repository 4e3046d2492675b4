"""The outer solvers (every hypergradient method, and the penalty method), their
projections and flags, and the optax forms built on the same cores."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _bilevel_cases import CONVERGED, LR, Quadratic, flat
from _cases import hypergradient_forms, penalty_forms
from flax import nnx

import kbeam_jax
from kbeam_jax import bilevel


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


# The penalty paper's synthetic problems, u, v in R^10.
def synthetic(name):
  if name == "sum":
    f = lambda u, v: jnp.sum(u**2) + jnp.sum(v**2)
    g = lambda u, v: jnp.sum((1.0 - u - v) ** 2)
    return f, g, 0.5
  f = lambda u, v: jnp.sum(v**2) - jnp.sum((u - v) ** 2)
  g = lambda u, v: jnp.sum((u - v) ** 2)
  return f, g, 0.0


def start(seed=0):
  ku, kv = jax.random.split(jax.random.key(seed))
  return (
    jax.random.uniform(ku, (10,), minval=-5.0, maxval=5.0),
    jax.random.uniform(kv, (10,), minval=-5.0, maxval=5.0),
  )


METHODS = {  # hypergradient methods
  "naive": bilevel.Naive(),
  "fmd": bilevel.FMD(),
  "rmd": bilevel.RMD(),
  "cg": bilevel.CG(5),
  "approxgrad": bilevel.ApproxGrad(20, 0.2),
  "neumann": bilevel.Neumann(20, 0.4),
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_solver_reaches_the_sum_problem_solution(name):
  f, g, solution = synthetic("sum")
  u0, v0 = start()
  solver = bilevel.solver(f, g, optax.sgd(0.05), METHODS[name], inner_steps=5, inner_lr=0.4)
  state = solver.init(jax.random.key(0), u0, v0)
  state, info = jax.jit(lambda s: kbeam_jax.run(solver.step, s, 1000))(state)
  if name == "naive":  # ∇_u f alone drives u to 0, not to the bilevel solution
    np.testing.assert_allclose(state.u, 0.0, atol=1e-3)
    return
  # The unrolled methods differentiate 5 steps, |dv_5/du + 1| = 0.2⁵: a bias of about 1e-4.
  atol = 1e-3 if name in ("fmd", "rmd") else 1e-6
  np.testing.assert_allclose(state.u, solution, atol=atol)
  np.testing.assert_allclose(state.v, solution, atol=atol)
  assert bool(info.finite.all()) and float(info.lower_grad_norm[-1]) < 1e-3
  assert int(state.count) == 1000


@pytest.mark.parametrize("augmented", [False, True])
@pytest.mark.parametrize("problem", ["sum", "difference"])
def test_penalty_reaches_the_synthetic_solutions(problem, augmented):
  f, g, solution = synthetic(problem)
  u0, v0 = start()
  solver = bilevel.penalty(
    f, g, optax.sgd(0.01), inner_steps=5, inner_lr=0.01, augmented=augmented, max_gamma=20.0
  )
  state = solver.init(jax.random.key(0), u0, v0)
  state, info = jax.jit(lambda s: kbeam_jax.run(solver.step, s, 4000))(state)
  # A capped γ leaves an O(1/γ) bias; the multipliers of the augmented variant remove it.
  atol = 1e-4 if augmented else 1e-2
  np.testing.assert_allclose(state.u, solution, atol=atol)
  np.testing.assert_allclose(state.v, solution, atol=atol)
  assert int(state.lower.increases) > 0 and float(state.lower.gamma) > 1.0
  assert float(info.lower_grad_norm[-1]) < 0.1
  assert not bool(info.diverging.any())


def test_penalty_gamma_grows_when_the_gradient_is_small():
  f, g, _ = synthetic("sum")
  solver = bilevel.penalty(
    f,
    g,
    optax.sgd(0.0),
    inner_steps=1,
    inner_lr=1e-9,
    gamma=2.0,
    epsilon=1e6,
    gamma_factor=3.0,
    epsilon_factor=0.5,
  )
  state, info = solver.step(solver.init(jax.random.key(0), jnp.zeros(10), jnp.zeros(10)))
  assert float(state.lower.gamma) == 6.0 and float(state.lower.epsilon) == 5e5
  assert bool(info.increased) and float(info.gamma) == 6.0


def test_penalty_gradient_is_the_penalized_gradient_by_hand():
  # L = f + (γ/2)|∇_v g|² on the sum problem: ∇_v g = -2(1 - u - v), so
  # ∇_u L = 2u + γ·4(u + v - 1) (the same for v), checked after zero steps on v.
  f, g, _ = synthetic("sum")
  tx = bilevel.scale_by_penalty(jnp.full(10, 0.2), inner_steps=0, inner_lr=0.1, gamma=3.0)
  u = jnp.full(10, 0.4)
  grad, _ = tx.update(None, tx.init(u), u, upper_fn=f, lower_fn=g)
  np.testing.assert_allclose(grad, 2 * 0.4 + 3.0 * 4 * (0.4 + 0.2 - 1.0), rtol=1e-12)


def test_penalty_warmup_adds_steps_on_v_to_the_first_step_only():
  f, g, _ = synthetic("sum")
  key, u, v = jax.random.key(0), jnp.full(10, 0.2), jnp.zeros(10)
  kw = dict(gamma=5.0, max_gamma=5.0)
  make = lambda T, W: bilevel.penalty(
    f, g, optax.sgd(0.01), inner_steps=T, inner_lr=0.02, warmup_steps=W, **kw
  )
  warm, cold, long = make(3, 40), make(3, 0), make(43, 0)
  s_warm, _ = warm.step(warm.init(key, u, v))
  s_long, _ = long.step(long.init(key, u, v))  # T + W steps on v, then one on u
  np.testing.assert_allclose(s_warm.v, s_long.v, rtol=1e-12)
  np.testing.assert_allclose(s_warm.u, s_long.u, rtol=1e-12)
  s_warm2, _ = warm.step(s_warm)
  s_cold2, _ = cold.step(s_warm)  # from the same state the second step is plain
  np.testing.assert_allclose(s_warm2.v, s_cold2.v, rtol=1e-12)
  # the transform takes the same extra steps on its first update
  tx = bilevel.scale_by_penalty(v, inner_steps=3, inner_lr=0.02, warmup_steps=40, **kw)
  _, tx_state = tx.update(None, tx.init(u), u, upper_fn=f, lower_fn=g)
  np.testing.assert_allclose(tx_state.v, s_long.v, rtol=1e-12)


def test_penalty_reports_divergence_when_the_penalized_objective_is_unbounded():
  # f = 2|u|² - |v|², g = ½|v - u|²: L_γ = f + (γ/2)|v - u|² is bounded below in (u, v) only
  # for γ > 2. The schedule never raises γ while v runs away, so the info must say so.
  f = lambda u, v: 2 * jnp.sum(u**2) - jnp.sum(v**2)
  g = lambda u, v: 0.5 * jnp.sum((v - u) ** 2)
  u0, v0 = jnp.ones(3), jnp.full(3, 1.5)

  def run(gamma):
    solver = bilevel.penalty(f, g, optax.sgd(0.01), inner_steps=5, inner_lr=0.01, gamma=gamma)
    state = solver.init(jax.random.key(0), u0, v0)
    return jax.jit(lambda s: kbeam_jax.run(solver.step, s, 300))(state)

  state, info = run(1.0)
  assert bool(info.diverging[-1]) and float(jnp.abs(state.v).max()) > 100.0
  assert float(state.lower.gamma) < 2.0  # the schedule never got past the threshold
  assert not bool(info.diverging[: bilevel.PenaltySchedule().divergence_steps - 1].any())
  state, info = run(4.0)  # γ_0 above the threshold: the bilevel guide's advice
  assert not bool(info.diverging.any()) and float(jnp.abs(state.v).max()) < 10.0


@pytest.mark.parametrize("name", ["cg", "penalty"])
def test_projections_keep_both_levels_in_the_box(name):
  f, g, _ = synthetic("difference")
  u0, v0 = start(1)
  box = lambda x: jnp.clip(x, -0.5, 0.5)
  make = FORMS[name][0]
  solver = make(f, g, optax.sgd(0.05), inner_steps=5, inner_lr=0.01, project_u=box, project_v=box)
  state = solver.init(jax.random.key(0), box(u0), box(v0))
  state, _ = jax.jit(lambda s: kbeam_jax.run(solver.step, s, 50))(state)
  assert float(jnp.abs(state.u).max()) <= 0.5 and float(jnp.abs(state.v).max()) <= 0.5
  bad = make(f, g, optax.sgd(0.1), inner_steps=1, inner_lr=0.1, project_u=lambda x: x[:5])
  with pytest.raises(ValueError, match=r"project_u must return u with the same shapes"):
    bad.step(bad.init(jax.random.key(0), u0, v0))


def test_solver_flags_a_diverged_inner_solve():
  f = lambda u, v: jnp.sum((v - 1.0) ** 2)
  g = lambda u, v: 0.5 * jnp.sum((v - u) ** 2)
  solver = bilevel.solver(f, g, optax.sgd(0.1), bilevel.CG(5), inner_steps=200, inner_lr=3.0)
  with jax.enable_x64(False):
    _, info = solver.step(solver.init(jax.random.key(0), jnp.ones(2), jnp.zeros(2)))
  assert not bool(info.finite) and bool(info.diverging) and not bool(info.converged)


TRANSFORM_METHODS = {
  "naive": (hypergradient_forms(bilevel.Naive()), {}),
  "fmd": (hypergradient_forms(bilevel.FMD()), {}),
  "rmd": (hypergradient_forms(bilevel.RMD()), {}),
  "approxgrad": (hypergradient_forms(bilevel.ApproxGrad(50, 1 / 16)), {}),
  "cg": (hypergradient_forms(bilevel.CG(5)), {}),
  "neumann": (hypergradient_forms(bilevel.Neumann(20, LR)), {}),
  "penalty": (penalty_forms(max_gamma=10.0), dict(inner=optax.sgd(0.1))),
}
FORMS = {"cg": hypergradient_forms(bilevel.CG(5)), "penalty": penalty_forms(max_gamma=20.0)}


@pytest.mark.parametrize("name", sorted(TRANSFORM_METHODS))
def test_transform_steps_equal_solver_steps(name):
  p = Quadratic(6)
  (make_solver, make_transform), kw = TRANSFORM_METHODS[name]
  kw = dict(inner_steps=20, **kw) if kw else dict(inner_steps=20, inner_lr=LR)
  upper = optax.sgd(0.05)
  solver = make_solver(p.f, p.g, upper, **kw)
  state = solver.init(jax.random.key(0), p.u, p.v0)
  tx = optax.chain(make_transform(p.v0, **kw), upper)
  u, tx_state = p.u, tx.init(p.u)
  for _ in range(3):
    state, _ = solver.step(state)
    updates, tx_state = tx.update(None, tx_state, u, upper_fn=p.f, lower_fn=p.g)
    u = optax.apply_updates(u, updates)
  np.testing.assert_allclose(flat(u), flat(state.u), rtol=1e-12)
  assert bool(optax.tree.get(tx_state, "finite"))


@pytest.mark.parametrize("name", sorted(TRANSFORM_METHODS))
def test_transform_conformance(name, dtype):
  p = Quadratic(6)
  (_, make_transform), kw = TRANSFORM_METHODS[name]
  kw = dict(inner_steps=20, **kw) if kw else dict(inner_steps=20, inner_lr=LR)
  cast = lambda t: jax.tree.map(lambda x: x.astype(dtype), t)
  u, v0 = cast(p.u), cast(p.v0)
  f = lambda a, b: p.f(a, b).astype(dtype)
  g = lambda a, b: p.g(a, b).astype(dtype)
  tx = optax.chain(make_transform(v0, **kw), optax.sgd(0.05))
  state = tx.init(u)
  update = jax.jit(lambda g_, s, x: tx.update(g_, s, x, upper_fn=f, lower_fn=g, extra=1))
  for _ in range(3):
    updates, new_state = update(u, state, u)
    u = optax.apply_updates(u, updates)
    shapes = lambda s: [(x.shape, x.dtype) for x in jax.tree.leaves(s)]
    assert shapes(new_state) == shapes(state)
    state = new_state
  assert update._cache_size() == 1
  assert all(
    x.dtype == dtype for x in jax.tree.leaves((u, state)) if jnp.issubdtype(x.dtype, jnp.floating)
  )
  assert jax.tree.structure(u) == jax.tree.structure(p.u)


@pytest.mark.parametrize("name", sorted(CONVERGED))
def test_transform_descends_to_the_bilevel_solution(name):
  p = Quadratic(7)
  p.D = jnp.zeros_like(p.D)  # F(u) = f(u, v*(u)) is then convex: a minimum exists
  method, settings = CONVERGED[name]
  tx = optax.chain(
    bilevel.scale_by_hypergradient(method, p.v0, **dict(settings, inner_steps=50)),
    optax.sgd(0.2),
  )
  u, state = p.u, tx.init(p.u)
  update = jax.jit(lambda s, x: tx.update(None, s, x, upper_fn=p.f, lower_fn=p.g))
  for _ in range(300):
    updates, state = update(state, u)
    u = optax.apply_updates(u, updates)
  start_norm = np.linalg.norm(flat(p.closed_form(p.u)))
  np.testing.assert_allclose(flat(p.closed_form(u)), 0.0, atol=1e-6 * start_norm)


class Hyper(nnx.Module):
  """An upper-level 'model': a per-feature scale applied to the inner regression data."""

  def __init__(self):
    self.scale = nnx.Param(jnp.ones(3))


def test_hypergradient_transform_inside_nnx_optimizer():
  x = jax.random.normal(jax.random.key(8), (5, 3))
  y = x @ jnp.array([1.0, -2.0, 0.5])
  model = Hyper()
  graphdef, params0 = nnx.split(model, nnx.Param)
  params0 = nnx.as_pure(params0)  # plain arrays: the optimizer below updates model in place

  def lower_fn(params, w):  # ridge regression on scaled features
    s = nnx.merge(graphdef, params).scale[...]
    return 0.5 * jnp.mean((x * s[None, :] @ w - y) ** 2) + 0.05 * jnp.sum(w**2)

  def upper_fn(params, w):
    return 0.5 * jnp.mean((x @ w - y) ** 2)

  tx = optax.chain(
    bilevel.scale_by_hypergradient(bilevel.RMD(), jnp.zeros(3), inner_steps=10, inner_lr=0.3),
    optax.sgd(0.1),
  )
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  for _ in range(4):
    optimizer.update(
      model, nnx.grad(lambda m: jnp.sum(m.scale[...]))(model), upper_fn=upper_fn, lower_fn=lower_fn
    )
  params = params0
  state = tx.init(params)
  for _ in range(4):
    updates, state = tx.update(None, state, params, upper_fn=upper_fn, lower_fn=lower_fn)
    params = optax.apply_updates(params, updates)
  np.testing.assert_allclose(model.scale[...], params["scale"], rtol=1e-10)
  assert not np.allclose(params["scale"], 1.0)


def test_mixed_precision_penalty():
  # u in float32, v in bfloat16: the penalty's weight ν + γ∇_v g takes v's dtype.
  f, g, _ = synthetic("sum")
  with jax.enable_x64(False):
    solver = bilevel.penalty(f, g, optax.sgd(0.01), inner_steps=2, inner_lr=0.01)
    state = solver.init(jax.random.key(0), jnp.zeros(10), jnp.zeros(10, jnp.bfloat16))
    state, info = jax.jit(solver.step)(state)
    assert state.v.dtype == jnp.bfloat16 and state.u.dtype == jnp.float32
    assert bool(info.finite)


def test_bad_input():
  p = Quadratic(9)
  with pytest.raises(TypeError, match="method must be a hypergradient method value"):
    bilevel.scale_by_hypergradient("implicit", p.v0, inner_steps=1, inner_lr=LR)
  with pytest.raises(ValueError, match="inner_steps must be >= 0"):
    bilevel.scale_by_hypergradient(bilevel.RMD(), p.v0, inner_steps=-1, inner_lr=LR)
  tx = bilevel.scale_by_hypergradient(bilevel.RMD(), p.v0, inner_steps=1, inner_lr=LR)
  with pytest.raises(ValueError, match="grads and params must have the same pytree structure"):
    tx.update({"x": jnp.zeros(2)}, tx.init(p.u), p.u, upper_fn=p.f, lower_fn=p.g)
  with pytest.raises(ValueError, match="need params"):
    tx.update(None, tx.init(p.u), None, upper_fn=p.f, lower_fn=p.g)
  with pytest.raises(TypeError, match="upper_fn"):
    tx.update(None, tx.init(p.u), p.u, lower_fn=p.g)
  with pytest.raises(ValueError, match=r"penalty\.gamma must be a finite number > 0"):
    bilevel.penalty(p.f, p.g, optax.sgd(0.1), inner_lr=0.1, gamma=-1.0)
  with pytest.raises(ValueError, match=r"penalty\.gamma_factor must be >= 1"):
    bilevel.scale_by_penalty(p.v0, inner_lr=0.1, gamma_factor=0.5)
  with pytest.raises(TypeError, match="unexpected keyword"):
    bilevel.penalty(p.f, p.g, optax.sgd(0.1), inner_lr=0.1, gama=2.0)
  solver = bilevel.solver(p.f, p.g, optax.sgd(0.1), bilevel.CG(2), inner_steps=1, inner_lr=0.1)
  with pytest.raises(TypeError, match="v must hold floating-point arrays"):
    solver.init(jax.random.key(0), p.u, jnp.arange(3))


def test_penalty_schedule_by_hand():
  # After zero steps on v, at (u, v) = (0.4, 0.2) on the sum problem: ∇_v g = -2(1 - u - v)
  # = -0.8, ∇_u L = ∇_v L = 2·0.4 + γ·4·(-0.4) (for u; 2·0.2 + ... for v).
  f, g, _ = synthetic("sum")
  u, v = jnp.full(10, 0.4), jnp.full(10, 0.2)

  def one_step(**options):
    tx = bilevel.scale_by_penalty(v, inner_steps=0, inner_lr=0.1, **options)
    state = tx.init(u)
    grad, state = tx.update(None, state, u, upper_fn=f, lower_fn=g)
    return grad, state.lower

  gamma = 2.0
  sq = 10 * ((0.8 + gamma * 4 * -0.4) ** 2 + (0.4 + gamma * 4 * -0.4) ** 2)
  # |∇L|² >= ε²: the schedule stays
  _, lower = one_step(gamma=gamma, epsilon=0.9 * np.sqrt(sq), augmented=True)
  assert float(lower.gamma) == gamma and int(lower.increases) == 0
  np.testing.assert_allclose(lower.nu, 0.0)
  # |∇L|² < ε²: γ ← min(c_γ γ, γ_max) (capped here), ε ← c_ε ε, ν ← ν + γ ∇_v g
  _, lower = one_step(
    gamma=gamma, epsilon=1.1 * np.sqrt(sq), gamma_factor=3.0, max_gamma=5.0, augmented=True
  )
  assert float(lower.gamma) == 5.0 and int(lower.increases) == 1
  np.testing.assert_allclose(lower.epsilon, 0.9 * 1.1 * np.sqrt(sq), rtol=1e-12)
  np.testing.assert_allclose(lower.nu, gamma * -0.8, rtol=1e-12)


def test_penalty_lower_weight_adds_g_to_the_steps_on_v():
  # One plain step on v: v ← v - ρ(∇_v L + λ∇_v g); λ = 1 moves v by an extra -ρ∇_v g.
  f, g, _ = synthetic("sum")
  u, v = jnp.full(10, 0.4), jnp.full(10, 0.2)
  run = lambda lam: bilevel.scale_by_penalty(
    v, inner_steps=1, inner_lr=0.01, gamma=2.0, lower_weight=lam
  )
  states = []
  for lam in (0.0, 1.0):
    tx = run(lam)
    states.append(tx.update(None, tx.init(u), u, upper_fn=f, lower_fn=g)[1])
  np.testing.assert_allclose(states[1].v - states[0].v, -0.01 * -0.8, rtol=1e-12)


def test_penalty_restart_recipe_starts_the_lower_level_afresh():
  # Re-init with the same upper state: the warm-up and the divergence baseline apply again.
  f, g, _ = synthetic("sum")
  solver = bilevel.penalty(f, g, optax.sgd(0.01), inner_steps=1, inner_lr=0.01, warmup_steps=5)
  key, u, v = jax.random.key(0), jnp.full(10, 0.2), jnp.zeros(10)
  state, _ = solver.step(solver.init(key, u, v))
  restarted = solver.init(key, state.u, v)._replace(
    upper_state=state.upper_state, count=state.count
  )
  again, _ = solver.step(restarted)
  fresh, _ = solver.step(solver.init(key, state.u, v))
  np.testing.assert_allclose(again.v, fresh.v, rtol=1e-12)
  assert np.isfinite(float(again.lower.first_lower_grad_norm))
