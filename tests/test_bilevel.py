"""Hypergradients against the closed form on random quadratic bilevel problems (float64),
against each other and against finite differences; the penalty method on the synthetic
problems; the optax forms."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

import kbeam_jax
from kbeam_jax import bilevel
from kbeam_jax.tasks import fewshot


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


class Quadratic:
  """``g = ½vᵀAv + uᵀBv + cᵀv``, ``f = ½|u - a|² + ½vᵀCv + uᵀDv + eᵀv`` on pytrees."""

  def __init__(self, seed, U=3, V=4):
    ks = jax.random.split(jax.random.key(seed), 8)
    Q = jnp.linalg.qr(jax.random.normal(ks[0], (V, V)))[0]
    self.A = Q @ jnp.diag(jnp.linspace(1.0, 4.0, V)) @ Q.T  # eigenvalues in [1, 4]
    self.B = jax.random.normal(ks[1], (U, V))
    self.c = jax.random.normal(ks[2], (V,))
    M = jax.random.normal(ks[3], (V, V))
    self.C = M @ M.T / V
    self.D = jax.random.normal(ks[4], (U, V))
    self.a, self.e = jax.random.normal(ks[5], (U,)), jax.random.normal(ks[6], (V,))
    self.u = {"x": jax.random.normal(ks[7], (2,)), "y": [jnp.array([0.3])]}
    self.v0 = [jnp.zeros(2), {"z": jnp.zeros(2)}]

  def g(self, u, v):
    uf, vf = ravel_pytree(u)[0], ravel_pytree(v)[0]
    return 0.5 * vf @ self.A @ vf + uf @ self.B @ vf + self.c @ vf

  def f(self, u, v):
    uf, vf = ravel_pytree(u)[0], ravel_pytree(v)[0]
    return (
      0.5 * jnp.sum((uf - self.a) ** 2) + 0.5 * vf @ self.C @ vf + uf @ self.D @ vf + self.e @ vf
    )

  def closed_form(self, u):
    uf, unravel = ravel_pytree(u)
    v = -jnp.linalg.solve(self.A, self.B.T @ uf + self.c)
    f_u = uf - self.a + self.D @ v
    f_v = self.C @ v + self.D.T @ uf + self.e
    return unravel(f_u - self.B @ jnp.linalg.solve(self.A, f_v))

  def unrolled_value(self, u, T, lr):
    v, _ = bilevel.inner_solve(self.g, u, self.v0, (), T, lr)
    return self.f(u, v)


LR = 0.25  # 1 / λ_max(A)
CONVERGED = {
  "fmd": dict(num_steps=300, inner_lr=LR),
  "rmd": dict(num_steps=300, inner_lr=LR),
  "rmd_checkpoint": dict(num_steps=300, inner_lr=LR, checkpoint=True),
  "approxgrad": dict(num_steps=300, inner_lr=LR, solve_steps=800, solve_lr=1 / 16),
  "cg": dict(num_steps=300, inner_lr=LR, solve_steps=10),
  "neumann": dict(num_steps=300, inner_lr=LR, solve_steps=300, solve_lr=LR),
}


def method(name):
  return getattr(bilevel, name.removesuffix("_checkpoint"))


def flat(tree):
  return ravel_pytree(tree)[0]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", sorted(CONVERGED))
def test_matches_closed_form(name, seed):
  p = Quadratic(seed)
  out = jax.jit(functools.partial(method(name), p.f, p.g, **CONVERGED[name]))(p.u, p.v0)
  expected = flat(p.closed_form(p.u))
  np.testing.assert_allclose(flat(out.grad), expected, rtol=1e-6, atol=1e-9)
  assert jax.tree.structure(out.grad) == jax.tree.structure(p.u)
  assert jax.tree.structure(out.v) == jax.tree.structure(p.v0)


@pytest.mark.parametrize("T", [1, 7, 10])
def test_fmd_and_rmd_agree_to_round_off_for_the_same_T(T):
  p = Quadratic(2)
  fwd = bilevel.fmd(p.f, p.g, p.u, p.v0, num_steps=T, inner_lr=LR)
  rev = bilevel.rmd(p.f, p.g, p.u, p.v0, num_steps=T, inner_lr=LR)
  chk = bilevel.rmd(p.f, p.g, p.u, p.v0, num_steps=T, inner_lr=LR, checkpoint=True)
  np.testing.assert_allclose(flat(fwd.grad), flat(rev.grad), rtol=1e-12, atol=1e-14)
  np.testing.assert_allclose(flat(chk.grad), flat(rev.grad), rtol=1e-12, atol=1e-14)
  # ... and it is the derivative of the unrolled loop: central finite differences.
  uf, unravel = ravel_pytree(p.u)
  h = 1e-6
  fd = [
    (p.unrolled_value(unravel(uf + h * e), T, LR) - p.unrolled_value(unravel(uf - h * e), T, LR))
    / (2 * h)
    for e in jnp.eye(uf.size)
  ]
  np.testing.assert_allclose(flat(rev.grad), fd, rtol=1e-6, atol=1e-8)
  # and with T < ∞ it is not the closed form (the test would not notice a shortcut).
  if T == 1:
    assert not np.allclose(flat(rev.grad), flat(p.closed_form(p.u)), rtol=1e-3)


@pytest.mark.parametrize("name", sorted(CONVERGED))
def test_all_match_finite_differences_when_converged(name):
  p = Quadratic(3)
  out = method(name)(p.f, p.g, p.u, p.v0, **CONVERGED[name])
  uf, unravel = ravel_pytree(p.u)
  value = jax.jit(lambda x: p.unrolled_value(unravel(x), 300, LR))
  h = 1e-6
  fd = [(value(uf + h * e) - value(uf - h * e)) / (2 * h) for e in jnp.eye(uf.size)]
  np.testing.assert_allclose(flat(out.grad), fd, rtol=1e-6, atol=1e-8)


def test_schedule_for_the_inner_step():
  p = Quadratic(4)
  sched = lambda t: LR / (1.0 + 0.01 * t)
  a = bilevel.fmd(p.f, p.g, p.u, p.v0, num_steps=9, inner_lr=sched)
  b = bilevel.rmd(p.f, p.g, p.u, p.v0, num_steps=9, inner_lr=sched, checkpoint=True)
  np.testing.assert_allclose(flat(a.grad), flat(b.grad), rtol=1e-12)


def test_damping_changes_the_solve():
  p = Quadratic(5)
  kw = dict(num_steps=300, inner_lr=LR, solve_steps=10)
  plain = bilevel.cg(p.f, p.g, p.u, p.v0, **kw)
  damped = bilevel.cg(p.f, p.g, p.u, p.v0, damping=1.0, **kw)
  # with σ = 1 the solve is (A + I)⁻¹ ∇_v f
  uf, unravel = ravel_pytree(p.u)
  v = flat(plain.v)
  f_v = p.C @ v + p.D.T @ uf + p.e
  expected = uf - p.a + p.D @ v - p.B @ jnp.linalg.solve(p.A + jnp.eye(4), f_v)
  np.testing.assert_allclose(flat(damped.grad), expected, rtol=1e-8)


def test_cg_stays_finite_when_run_past_convergence():
  # Found on a few-shot meta-batch (float32, ∇²_vv g of rank ≈ 3 plus 1e-3 I): with a zero
  # tolerance CG kept iterating after convergence, its step turned 0/0 and the hypergradient
  # NaN. It must stop at its tolerance and agree with the float64 answer.
  f, g = fewshot.objectives("regression", l2=1e-3)

  with jax.enable_x64(False):  # the same draws for both precisions
    u = fewshot.init_mlp(jax.random.key(0), [1, 40, 40])
    ep = fewshot.sample_sinusoid(jax.random.key(3), num_tasks=25, k_shot=5, num_query=5)

  def hypergradient():
    cast = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, float), tree)
    heads = cast(fewshot.init_heads(25, 40, 1))
    out = bilevel.cg(f, g, cast(u), heads, cast(ep), num_steps=2000, inner_lr=0.5, solve_steps=300)
    return flat(out.grad)

  with jax.enable_x64(False):
    single = hypergradient()
  assert single.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(single)))
  double = hypergradient()
  assert double.dtype == jnp.float64
  np.testing.assert_allclose(single, double, atol=1e-3 * float(jnp.abs(double).max()))
  with pytest.raises(ValueError, match="tol"):
    bilevel.cg(f, g, [], [], num_steps=1, inner_lr=0.1, solve_steps=5, tol=0.0)


# The penalty paper's synthetic problems, u, v in R^10.
def synthetic(name):
  if name == "sum":
    f = lambda u, v: jnp.sum(u**2) + jnp.sum(v**2)
    g = lambda u, v: jnp.sum((1.0 - u - v) ** 2)
    return f, g, 0.5
  f = lambda u, v: jnp.sum(v**2) - jnp.sum((u - v) ** 2)
  g = lambda u, v: jnp.sum((u - v) ** 2)
  return f, g, 0.0


@pytest.mark.parametrize("augmented", [False, True])
@pytest.mark.parametrize("problem", ["sum", "difference"])
def test_penalty_reaches_the_synthetic_solutions(problem, augmented):
  f, g, solution = synthetic(problem)
  ku, kv = jax.random.split(jax.random.key(0))
  u0 = jax.random.uniform(ku, (10,), minval=-5.0, maxval=5.0)
  v0 = jax.random.uniform(kv, (10,), minval=-5.0, maxval=5.0)
  solver = bilevel.penalty(
    f, g, optax.sgd(0.01), optax.sgd(0.01), num_inner=5, augmented=augmented, max_gamma=20.0
  )
  state, info = jax.jit(lambda s: kbeam_jax.run(solver.step, s, 4000))(solver.init(u0, v0))
  # A capped γ leaves an O(1/γ) bias; the multipliers of the augmented variant remove it.
  atol = 1e-4 if augmented else 1e-2
  np.testing.assert_allclose(state.u, solution, atol=atol)
  np.testing.assert_allclose(state.v, solution, atol=atol)
  assert int(state.increases) > 0 and float(state.gamma) > 1.0
  assert float(info.grad_v_g_norm[-1]) < 0.1


def test_penalty_gamma_grows_when_the_gradient_is_small():
  f, g, _ = synthetic("sum")
  solver = bilevel.penalty(
    f,
    g,
    optax.sgd(0.0),
    optax.sgd(0.0),
    gamma=2.0,
    epsilon=1e6,
    gamma_factor=3.0,
    epsilon_factor=0.5,
  )
  state, info = solver.step(solver.init(jnp.zeros(10), jnp.zeros(10)))
  assert float(state.gamma) == 6.0 and float(state.epsilon) == 5e5 and bool(info.increased)


def test_penalty_warmup_adds_steps_on_v_to_the_first_step_only():
  f, g, _ = synthetic("sum")
  u, v = jnp.full(10, 0.2), jnp.zeros(10)
  kw = dict(gamma=5.0, max_gamma=5.0)
  make = lambda T, W: bilevel.penalty(
    f, g, optax.sgd(0.01), optax.sgd(0.02), num_inner=T, warmup_steps=W, **kw
  )
  warm, cold, long = make(3, 40), make(3, 0), make(43, 0)
  s_warm, _ = warm.step(warm.init(u, v))
  s_long, _ = long.step(long.init(u, v))  # T + W steps on v, then one on u
  np.testing.assert_allclose(s_warm.v, s_long.v, rtol=1e-12)
  np.testing.assert_allclose(s_warm.u, s_long.u, rtol=1e-12)
  s_warm2, _ = warm.step(s_warm)
  s_cold2, _ = cold.step(s_warm)  # from the same state the second step is plain
  np.testing.assert_allclose(s_warm2.v, s_cold2.v, rtol=1e-12)
  # the transform form takes the same extra steps on its first update
  tx = bilevel.scale_by_penalty(v, optax.sgd(0.02), num_inner=3, warmup_steps=40, **kw)
  _, tx_state = tx.update(None, tx.init(u), u, upper_fn=f, lower_fn=g)
  np.testing.assert_allclose(tx_state.v, s_long.v, rtol=1e-12)
  with pytest.raises(ValueError, match="warmup_steps must be >= 0"):
    make(3, -1)


TRANSFORMS = {
  "rmd": lambda v: bilevel.scale_by_hypergradient("rmd", v, num_steps=20, inner_lr=LR),
  "fmd": lambda v: bilevel.scale_by_hypergradient("fmd", v, num_steps=20, inner_lr=LR),
  "approxgrad": lambda v: bilevel.scale_by_hypergradient(
    "approxgrad", v, num_steps=20, inner_lr=LR, solve_steps=50, solve_lr=1 / 16
  ),
  "cg": lambda v: bilevel.scale_by_hypergradient("cg", v, num_steps=20, inner_lr=LR, solve_steps=5),
  "neumann": lambda v: bilevel.scale_by_hypergradient(
    "neumann", v, num_steps=20, inner_lr=LR, solve_steps=20, solve_lr=LR
  ),
  "penalty": lambda v: bilevel.scale_by_penalty(v, optax.sgd(0.1), num_inner=5),
}


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_transform_conformance(name, dtype):
  p = Quadratic(6)
  cast = lambda t: jax.tree.map(lambda x: x.astype(dtype), t)
  u, v0 = cast(p.u), cast(p.v0)
  f = lambda a, b: p.f(a, b).astype(dtype)
  g = lambda a, b: p.g(a, b).astype(dtype)
  tx = optax.chain(TRANSFORMS[name](v0), optax.sgd(0.05))
  state = tx.init(u)
  update = jax.jit(lambda g_, s, x: tx.update(g_, s, x, upper_fn=f, lower_fn=g, extra=1))
  for _ in range(3):
    updates, state = update(u, state, u)
    u = optax.apply_updates(u, updates)
  assert update._cache_size() == 1
  assert all(
    x.dtype == dtype for x in jax.tree.leaves((u, state)) if jnp.issubdtype(x.dtype, jnp.floating)
  )
  assert jax.tree.structure(u) == jax.tree.structure(p.u)


@pytest.mark.parametrize("name", sorted(CONVERGED))
def test_transform_descends_to_the_bilevel_solution(name):
  p = Quadratic(7)
  p.D = jnp.zeros_like(p.D)  # F(u) = f(u, v*(u)) is then convex: a minimum exists
  options = dict(CONVERGED[name], num_steps=50)  # warm-started: 50 inner steps per update
  tx = optax.chain(
    bilevel.scale_by_hypergradient(name.removesuffix("_checkpoint"), p.v0, **options),
    optax.sgd(0.2),
  )
  u, state = p.u, tx.init(p.u)
  update = jax.jit(lambda s, x: tx.update(None, s, x, upper_fn=p.f, lower_fn=p.g))
  for _ in range(300):
    updates, state = update(state, u)
    u = optax.apply_updates(u, updates)
  start = np.linalg.norm(flat(p.closed_form(p.u)))
  np.testing.assert_allclose(flat(p.closed_form(u)), 0.0, atol=1e-6 * start)


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
    bilevel.scale_by_hypergradient("rmd", jnp.zeros(3), num_steps=10, inner_lr=0.3), optax.sgd(0.1)
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


def test_bad_input():
  p = Quadratic(9)
  with pytest.raises(ValueError, match=r"num_steps \(T\) must be >= 0, got num_steps \(T\)=-1"):
    bilevel.rmd(p.f, p.g, p.u, p.v0, num_steps=-1, inner_lr=LR)
  with pytest.raises(ValueError, match="upper objective f.* must return a scalar"):
    bilevel.fmd(lambda u, v: flat(v), p.g, p.u, p.v0, num_steps=2, inner_lr=LR)
  with pytest.raises(ValueError, match="lower objective g.* must return a scalar"):
    bilevel.cg(p.f, lambda u, v: flat(v), p.u, p.v0, num_steps=2, inner_lr=LR, solve_steps=2)
  with pytest.raises(ValueError, match="solve_steps must be >= 0"):
    bilevel.neumann(p.f, p.g, p.u, p.v0, num_steps=2, inner_lr=LR, solve_steps=-2, solve_lr=0.1)
  with pytest.raises(ValueError, match="method must be one of"):
    bilevel.scale_by_hypergradient("implicit", p.v0, num_steps=1, inner_lr=LR)
  tx = bilevel.scale_by_hypergradient("rmd", p.v0, num_steps=1, inner_lr=LR)
  with pytest.raises(ValueError, match="grads and params must have the same pytree structure"):
    tx.update({"x": jnp.zeros(2)}, tx.init(p.u), p.u, upper_fn=p.f, lower_fn=p.g)
  with pytest.raises(ValueError, match="gamma must be a number >= 0"):
    bilevel.penalty(p.f, p.g, optax.sgd(0.1), optax.sgd(0.1), gamma=-1.0)
  with pytest.raises(ValueError, match="gamma_factor >= 1"):
    bilevel.scale_by_penalty(p.v0, optax.sgd(0.1), gamma_factor=0.5)
