"""``argmin`` and ``hypergradient`` with every method: against the closed form on random
quadratic problems (float64), against each other and against finite differences, under
``jit``, ``vmap``, ``jax.checkpoint`` and inside a Flax NNX loss; CG on singular and
non-finite systems; one compile for repeated calls; the method values' validation."""

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _bilevel_cases import CONVERGED, LR, Quadratic, flat
from flax import nnx
from jax.flatten_util import ravel_pytree

import kbeam_jax
from kbeam_jax import bilevel
from kbeam_jax.tasks import fewshot


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


def solve(p, name, **overrides):
  method, settings = CONVERGED[name]
  return method, dict(settings, **overrides)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", sorted(CONVERGED))
def test_hypergradient_matches_closed_form(name, seed):
  p = Quadratic(seed)
  method, settings = solve(p, name)
  out = bilevel.hypergradient(p.f, p.g, p.u, p.v0, method=method, **settings)
  np.testing.assert_allclose(flat(out.grad), flat(p.closed_form(p.u)), rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(flat(out.v), p.v_star(p.u), rtol=1e-9)
  assert jax.tree.structure(out.grad) == jax.tree.structure(p.u)
  assert jax.tree.structure(out.v) == jax.tree.structure(p.v0)


@pytest.mark.parametrize("name", sorted(CONVERGED))
def test_grad_through_argmin_is_the_hypergradient(name):
  p = Quadratic(2)
  method, settings = solve(p, name)
  argmin = functools.partial(bilevel.argmin, method=method, **settings)
  grad = jax.grad(lambda u: p.f(u, argmin(p.g, u, p.v0)))(p.u)
  out = bilevel.hypergradient(p.f, p.g, p.u, p.v0, method=method, **settings)
  np.testing.assert_allclose(flat(grad), flat(out.grad), rtol=1e-12, atol=1e-14)
  np.testing.assert_allclose(flat(grad), flat(p.closed_form(p.u)), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", sorted(CONVERGED))
def test_argmin_under_vmap_and_jit(name):
  p = Quadratic(3)
  method, settings = solve(p, name)
  us = jax.tree.map(lambda x: jnp.stack([x, -2.0 * x, x + 1.0]), p.u)

  @jax.jit
  @jax.vmap
  def grads(u):
    return jax.grad(lambda u: p.f(u, bilevel.argmin(p.g, u, p.v0, method=method, **settings)))(u)

  out = grads(us)
  for i in range(3):
    u_i = jax.tree.map(lambda x, i=i: x[i], us)
    got = flat(jax.tree.map(lambda x, i=i: x[i], out))
    np.testing.assert_allclose(got, flat(p.closed_form(u_i)), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", sorted(CONVERGED))
def test_argmin_is_differentiable_in_args(name):
  # g(u, v, c) = ½vᵀAv + uᵀBv + cᵀv: v* = -A⁻¹(Bᵀu + c), so d f(u, v*)/dc = -A⁻¹ ∇_v f.
  p = Quadratic(4)
  method, settings = solve(p, name)
  g = lambda u, v, c: p.g(u, v) + c @ flat(v)
  c = jnp.array([0.5, -1.0, 0.2, 0.3])
  F = lambda c: p.f(p.u, bilevel.argmin(g, p.u, p.v0, c, method=method, **settings))
  v = -jnp.linalg.solve(p.A, p.B.T @ flat(p.u) + p.c + c)
  f_v = p.C @ v + p.D.T @ flat(p.u) + p.e
  np.testing.assert_allclose(jax.grad(F)(c), -jnp.linalg.solve(p.A, f_v), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", ["fmd", "rmd", "cg", "approxgrad"])
def test_argmin_composes_with_checkpoint_and_integer_args(name):
  p = Quadratic(5)
  method, settings = solve(p, name)
  g = lambda u, v, c, n: p.g(u, v) + c @ flat(v) * n  # n: an integer argument
  c, n = jnp.ones(4), jnp.int32(1)

  @jax.checkpoint
  def F(u, c):
    return p.f(u, bilevel.argmin(g, u, p.v0, c, n, method=method, **settings))

  gu, gc = jax.grad(F, argnums=(0, 1))(p.u, c)
  gu_plain, gc_plain = jax.grad(F.__wrapped__, argnums=(0, 1))(p.u, c)
  np.testing.assert_allclose(flat(gu), flat(gu_plain), rtol=1e-12)
  np.testing.assert_allclose(gc, gc_plain, rtol=1e-12)


def ridge_loss(log_l2, w, x, y):
  """The lower problem of ``Ridge``: training loss + L2 (module level: one compile)."""
  return 0.5 * jnp.mean((x @ w - y) ** 2) + 0.5 * jnp.exp(log_l2) * jnp.sum(w**2)


class Ridge(nnx.Module):
  """Learns the log L2 coefficient of a ridge regression by hypergradient."""

  def __init__(self):
    self.log_l2 = nnx.Param(jnp.array(0.0))

  def __call__(self, x_tr, y_tr, x_val, y_val):
    w = bilevel.argmin(
      ridge_loss,
      self.log_l2[...],
      jnp.zeros(x_tr.shape[1]),
      x_tr,
      y_tr,
      method=bilevel.CG(20),
      inner_steps=200,
      inner_lr=0.2,
    )
    return 0.5 * jnp.mean((x_val @ w - y_val) ** 2)


def test_argmin_inside_a_flax_nnx_loss():
  kx, kw, kn = jax.random.split(jax.random.key(6), 3)
  x = jax.random.normal(kx, (40, 5))
  y = x @ jax.random.normal(kw, (5,)) + 0.5 * jax.random.normal(kn, (40,))
  data = (x[:20], y[:20], x[20:], y[20:])
  model = Ridge()
  grad = nnx.grad(lambda m: m(*data))(model).log_l2[...]

  def closed(log_l2):  # the exact ridge solution, differentiated by autodiff
    lam = jnp.exp(log_l2)
    w = jnp.linalg.solve(x[:20].T @ x[:20] / 20 + lam * jnp.eye(5), x[:20].T @ y[:20] / 20)
    return 0.5 * jnp.mean((x[20:] @ w - y[20:]) ** 2)

  np.testing.assert_allclose(grad, jax.grad(closed)(0.0), rtol=1e-6)
  optimizer = nnx.Optimizer(model, optax.sgd(1.0), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer):
    loss, grads = nnx.value_and_grad(lambda m: m(*data))(model)
    optimizer.update(model, grads)
    return loss

  before = float(model(*data))
  for _ in range(20):
    train_step(model, optimizer)
  assert float(model(*data)) < before
  assert abs(float(jax.grad(closed)(model.log_l2[...]))) < 0.5 * abs(float(grad))


@pytest.mark.parametrize("T", [1, 7, 10])
def test_fmd_and_rmd_agree_to_round_off_for_the_same_T(T):
  p = Quadratic(2)
  run = lambda m: bilevel.hypergradient(p.f, p.g, p.u, p.v0, method=m, inner_steps=T, inner_lr=LR)
  fwd, rev, chk = run(bilevel.FMD()), run(bilevel.RMD()), run(bilevel.RMD(checkpoint=True))
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
  # with T < ∞ it is not the closed form (the test would notice a shortcut).
  if T == 1:
    assert not np.allclose(flat(rev.grad), flat(p.closed_form(p.u)), rtol=1e-3)


def test_unrolled_methods_differentiate_through_v0():
  # MAML's pattern: the inner loop starts at u itself.
  p = Quadratic(3)
  u = flat(p.u)[:3] * 0.0 + jnp.array([0.1, -0.2, 0.3])
  g = lambda u, v: 0.5 * jnp.sum((v - 1.0) ** 2)
  f = lambda u, v: jnp.sum(v**2)
  for m in (bilevel.FMD(), bilevel.RMD()):
    F = lambda u, m=m: f(u, bilevel.argmin(g, u, u, method=m, inner_steps=3, inner_lr=0.5))
    np.testing.assert_allclose(jax.grad(F)(u), 2 * (0.125 * u + 0.875) * 0.125, rtol=1e-12)


@pytest.mark.parametrize("name", sorted(CONVERGED))
def test_all_match_finite_differences_when_converged(name):
  p = Quadratic(3)
  method, settings = solve(p, name)
  out = bilevel.hypergradient(p.f, p.g, p.u, p.v0, method=method, **settings)
  uf, unravel = ravel_pytree(p.u)
  value = jax.jit(lambda x: p.unrolled_value(unravel(x), 300, LR))
  h = 1e-6
  fd = [(value(uf + h * e) - value(uf - h * e)) / (2 * h) for e in jnp.eye(uf.size)]
  np.testing.assert_allclose(flat(out.grad), fd, rtol=1e-6, atol=1e-8)


def test_schedule_and_optax_inner_optimizer():
  p = Quadratic(4)
  sched = lambda t: LR / (1.0 + 0.01 * t)
  run = lambda m, **kw: bilevel.hypergradient(p.f, p.g, p.u, p.v0, method=m, **kw).grad
  a = run(bilevel.FMD(), inner_steps=9, inner_lr=sched)
  b = run(bilevel.RMD(checkpoint=True), inner_steps=9, inner_lr=sched)
  np.testing.assert_allclose(flat(a), flat(b), rtol=1e-12)
  # Any optax optimizer as the inner loop: unrolled methods agree with each other, the
  # implicit ones reach the closed form once it has converged.
  adam = optax.adam(0.05)
  a = run(bilevel.FMD(), inner_steps=20, inner=adam)
  b = run(bilevel.RMD(), inner_steps=20, inner=adam)
  np.testing.assert_allclose(flat(a), flat(b), rtol=1e-10)
  c = run(bilevel.CG(10), inner_steps=3000, inner=adam)
  np.testing.assert_allclose(flat(c), flat(p.closed_form(p.u)), rtol=1e-5)


def test_damping_changes_the_solve():
  p = Quadratic(5)
  kw = dict(inner_steps=300, inner_lr=LR)
  damped = bilevel.hypergradient(p.f, p.g, p.u, p.v0, method=bilevel.CG(10, damping=1.0), **kw)
  uf = flat(p.u)
  v = flat(damped.v)
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
    out = bilevel.hypergradient(
      f, g, cast(u), heads, cast(ep), method=bilevel.CG(300), inner_steps=2000, inner_lr=0.5
    )
    return flat(out.grad)

  with jax.enable_x64(False):
    single = hypergradient()
  assert single.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(single)))
  double = hypergradient()
  assert double.dtype == jnp.float64
  np.testing.assert_allclose(single, double, atol=1e-3 * float(jnp.abs(double).max()))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_cg_on_a_singular_hessian_gives_the_minimum_norm_answer(dtype):
  # ∇²_vv g = 2AᵀA = diag(2, .5, 0) and ∇_v f has a component in its null space: plain CG
  # used to return NaN. v*(u) = {v : v_1 = u_1, v_2 = u_2}; descent from v0 keeps v_3 = 1,
  # so f(u, v_T) = u_1² + u_2² + 1 and the hypergradient is (2u_1, 2u_2, 0).
  A = jnp.array([[1.0, 0.0, 0.0], [0.0, 0.5, 0.0]], dtype)
  f = lambda u, v: jnp.sum(v**2)
  g = lambda u, v: jnp.sum((A @ (u - v)) ** 2)
  u, v0 = jnp.array([1.0, 2.0, 3.0], dtype), jnp.array([0.0, 0.0, 1.0], dtype)
  out = bilevel.hypergradient(f, g, u, v0, method=bilevel.CG(10), inner_steps=200, inner_lr=0.5)
  np.testing.assert_allclose(out.grad, [2.0, 4.0, 0.0], rtol=1e-5, atol=1e-6)
  # the pseudo-inverse formula, by hand
  H, B = 2 * A.T @ A, -2 * A.T @ A
  q = jnp.linalg.pinv(H) @ (2 * out.v)
  np.testing.assert_allclose(out.grad, -B @ q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(CONVERGED))
def test_a_diverged_inner_solve_gives_a_non_finite_hypergradient(name):
  # ρ = 3 on g = ½|v - u|²: v_t - u = (-2)^t (v_0 - u) overflows. f does not depend on u,
  # so ∇_u f = 0: a solve that skipped a non-finite right-hand side returned exactly 0.
  method, _ = CONVERGED[name]
  f = lambda u, v: jnp.sum((v - 1.0) ** 2)
  g = lambda u, v: 0.5 * jnp.sum((v - u) ** 2)
  with jax.enable_x64(False):
    out = bilevel.hypergradient(
      f, g, jnp.array([3.0, 1.0]), jnp.zeros(2), method=method, inner_steps=200, inner_lr=3.0
    )
    assert not bool(jnp.all(jnp.isfinite(out.grad)))


@pytest.mark.parametrize("name", sorted(CONVERGED))
def test_repeated_eager_calls_compile_once(name, compile_counter):
  p = Quadratic(8)
  method, settings = solve(p, name, inner_steps=20)
  bilevel.hypergradient(p.f, p.g, p.u, p.v0, method=method, **settings)
  bilevel.argmin(p.g, p.u, p.v0, method=method, **settings)
  u2 = jax.tree.map(lambda x: x + 1.0, p.u)
  compile_counter.reset()
  bilevel.hypergradient(p.f, p.g, u2, p.v0, method=method, **settings)
  bilevel.argmin(p.g, u2, p.v0, method=method, **settings)
  assert compile_counter.count == 0
  # a method value equal to the first is the same compiled program
  bilevel.hypergradient(p.f, p.g, p.u, p.v0, method=dataclasses.replace(method), **settings)
  assert compile_counter.count == 0


def test_method_values_are_immutable_hashable_and_validated():
  assert bilevel.CG(10) == bilevel.CG(10) and hash(bilevel.CG(10)) == hash(bilevel.CG(10))
  with pytest.raises(dataclasses.FrozenInstanceError):
    bilevel.CG(10).tol = 0.1
  bad = [
    (lambda: bilevel.CG(0), r"CG\.solve_steps must be an int >= 1, got solve_steps=0"),
    (lambda: bilevel.CG(10, tol=0.0), r"CG\.tol must be a finite number > 0"),
    (lambda: bilevel.CG(10, damping=float("nan")), r"CG\.damping must be a finite number >= 0"),
    (lambda: bilevel.ApproxGrad(10, -0.5), r"ApproxGrad\.solve_lr must be a finite number > 0"),
    (lambda: bilevel.ApproxGrad(2.5, 0.1), r"ApproxGrad\.solve_steps must be an int"),
    (lambda: bilevel.Neumann(10, float("inf")), r"Neumann\.solve_lr must be a finite number"),
    (lambda: bilevel.RMD(checkpoint=1), r"RMD\.checkpoint must be a bool"),
    (lambda: bilevel.PenaltySchedule(gamma=0.0), r"penalty\.gamma must be a finite number > 0"),
    (lambda: bilevel.PenaltySchedule(gamma=float("nan")), r"penalty\.gamma must be a finite"),
    (lambda: bilevel.PenaltySchedule(gamma=2.0, max_gamma=1.0), r"penalty\.max_gamma must be >="),
    (lambda: bilevel.PenaltySchedule(max_gamma=float("nan")), r"penalty\.max_gamma must be >="),
    (lambda: bilevel.PenaltySchedule(gamma_factor=0.5), r"penalty\.gamma_factor must be >= 1"),
    (lambda: bilevel.PenaltySchedule(gamma_factor=float("inf")), r"penalty\.gamma_factor must"),
    (lambda: bilevel.PenaltySchedule(epsilon_factor=0.0), r"penalty\.epsilon_factor must be in"),
    (lambda: bilevel.PenaltySchedule(lower_weight=-1.0), r"penalty\.lower_weight must be a fin"),
    (lambda: bilevel.PenaltySchedule(warmup_steps=-1), r"penalty\.warmup_steps must be an int"),
    (lambda: bilevel.Neumann(10, "fast"), r"Neumann\.solve_lr must be a finite number > 0 or"),
  ]
  for make, message in bad:
    with pytest.raises(ValueError, match=message):
      make()


def test_bad_input():
  p = Quadratic(9)
  cg = bilevel.CG(5)
  hg = functools.partial(bilevel.hypergradient, p.f, p.g, p.u, p.v0)
  with pytest.raises(ValueError, match="inner_steps must be >= 0, got inner_steps=-1"):
    hg(method=cg, inner_steps=-1, inner_lr=LR)
  with pytest.raises(ValueError, match="upper objective f.* must return a scalar"):
    bilevel.hypergradient(
      lambda u, v: flat(v), p.g, p.u, p.v0, method=cg, inner_steps=2, inner_lr=LR
    )
  with pytest.raises(ValueError, match="lower objective g.* must return a scalar"):
    bilevel.argmin(lambda u, v: flat(v), p.u, p.v0, method=cg, inner_steps=2, inner_lr=LR)
  with pytest.raises(TypeError, match=r"not the class: write bilevel\.CG\(\.\.\.\)"):
    hg(method=bilevel.CG, inner_steps=2, inner_lr=LR)
  with pytest.raises(TypeError, match="method must be a hypergradient method value"):
    hg(method="cg", inner_steps=2, inner_lr=LR)
  with pytest.raises(TypeError, match=r"penalty method is its own solver: bilevel\.penalty"):
    hg(method=bilevel.PenaltySchedule(), inner_steps=2, inner_lr=LR)
  with pytest.raises(ValueError, match="exactly one of inner_lr= .* got neither"):
    hg(method=cg, inner_steps=2)
  with pytest.raises(ValueError, match="exactly one of inner_lr= .* got both"):
    hg(method=cg, inner_steps=2, inner_lr=LR, inner=optax.sgd(LR))
  for lr in (float("nan"), -0.1, 0.0, jnp.asarray(-1.0)):
    with pytest.raises(ValueError, match="inner_lr must be finite and > 0"):
      hg(method=cg, inner_steps=2, inner_lr=lr)
  with pytest.raises(TypeError, match="inner_lr must be a number > 0"):
    hg(method=cg, inner_steps=2, inner_lr=True)
  with pytest.raises(ValueError, match="schedule must give finite values > 0 .* at step 3"):
    hg(method=cg, inner_steps=5, inner_lr=lambda t: 0.3 - 0.1 * t)
  with pytest.raises(TypeError, match="inner must be an optax.GradientTransformation"):
    hg(method=cg, inner_steps=2, inner=0.1)
  with pytest.raises(TypeError, match="u must hold floating-point arrays"):
    bilevel.argmin(p.g, jnp.arange(3), p.v0, method=cg, inner_steps=2, inner_lr=LR)


@pytest.mark.parametrize("name", sorted(CONVERGED))
def test_a_lower_variable_that_f_ignores(name):
  # f reads only the first leaf of v: the cotangent of the other is a symbolic zero.
  p = Quadratic(10)
  method, settings = CONVERGED[name]
  f = lambda u, v: jnp.sum(v[0] ** 2) + flat(u) @ flat(u)
  out = bilevel.hypergradient(f, p.g, p.u, p.v0, method=method, **settings)
  uf = flat(p.u)
  v = p.v_star(p.u)
  f_v = jnp.concatenate([2 * v[:2], jnp.zeros(2)])
  expected = 2 * uf - p.B @ jnp.linalg.solve(p.A, f_v)
  np.testing.assert_allclose(flat(out.grad), expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", ["fmd", "rmd", "cg", "approxgrad", "neumann"])
def test_a_hyperparameter_that_g_closes_over_is_differentiated(name):
  # g closes over lam (no *args): v* = u / (1 + lam), f = (v - 1)²,
  # dF/dlam = 2(v* - 1)·(-u / (1 + lam)²).
  method, settings = CONVERGED[name]
  settings = dict(settings, inner_lr=0.4)
  u = jnp.array([2.0])

  def F(lam):
    g = lambda u, v: 0.5 * jnp.sum((v - u) ** 2) + 0.5 * lam * jnp.sum(v**2)
    v = bilevel.argmin(g, u, jnp.zeros(1), method=method, **settings)
    return jnp.sum((v - 1.0) ** 2)

  lam = 0.5
  v_star = 2.0 / (1 + lam)
  np.testing.assert_allclose(
    jax.grad(F)(lam), 2 * (v_star - 1) * (-2.0 / (1 + lam) ** 2), rtol=1e-6
  )


@pytest.mark.parametrize("name", ["fmd", "cg", "neumann"])
def test_mixed_dtypes(name):
  # u in float32, v in float64: the derivative comes back in u's dtype and is right.
  p = Quadratic(11)
  method, settings = CONVERGED[name]
  u32 = jax.tree.map(lambda x: x.astype(jnp.float32), p.u)
  out = bilevel.hypergradient(p.f, p.g, u32, p.v0, method=method, **settings)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(out.grad))
  assert all(x.dtype == jnp.float64 for x in jax.tree.leaves(out.v))
  np.testing.assert_allclose(flat(out.grad), flat(p.closed_form(u32)), rtol=1e-5)


def test_cg_on_an_indefinite_hessian():
  # A non-convex lower problem at v_T: ∇²_vv g = diag(2, -0.5, 1). The implicit formula
  # still holds (H is invertible); plain CG meets negative curvature and must not be used.
  d = jnp.array([2.0, -0.5, 1.0])
  g = lambda u, v: 0.5 * jnp.sum(d * v**2) - u @ v
  f = lambda u, v: 0.5 * jnp.sum((v - 1.0) ** 2)
  u, v_star = jnp.array([1.0, 2.0, 3.0]), jnp.array([1.0, 2.0, 3.0]) / d
  method = bilevel.CG(20)
  grad = jax.grad(
    lambda u: f(u, bilevel.argmin(g, u, v_star, method=method, inner_steps=0, inner_lr=0.1))
  )(u)
  np.testing.assert_allclose(grad, (v_star - 1.0) / d, rtol=1e-6)
  # the same under vmap (the fallback is a loop of zero iterations where it is not needed)
  us = jnp.stack([u, 2 * u])
  grads = jax.vmap(
    jax.grad(
      lambda u: f(u, bilevel.argmin(g, u, u / d, method=method, inner_steps=0, inner_lr=0.1))
    )
  )(us)
  np.testing.assert_allclose(grads, (us / d[None] - 1.0) / d[None], rtol=1e-6)


def convex_or_concave_lower(sign):
  """``g = sign·(½vᵀAv - uᵀv)``, ``A`` SPD: either way ``∇_v g = 0`` at ``v = A⁻¹u`` (the
  closed form, as solve=), but for ``sign = -1`` that is g's maximum, not a minimum."""
  A = jnp.array([[2.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 3.0]])
  g = lambda u, v: sign * (0.5 * v @ A @ v - u @ v)
  f = lambda u, v: 0.5 * jnp.sum((v - 1.0) ** 2)
  return A, f, g, lambda u, v0: jnp.linalg.solve(A, u)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_cg_flags_a_lower_hessian_that_is_not_positive_definite(sign):
  A, f, g, solve = convex_or_concave_lower(sign)
  u = jnp.array([1.0, 2.0, 3.0])
  out = bilevel.hypergradient(f, g, u, jnp.zeros(3), method=bilevel.CG(10), solve=solve)
  # dv/du = A⁻¹ for both signs: CG still solves the system, and says what it met
  np.testing.assert_allclose(out.grad, jnp.linalg.solve(A, out.v - 1.0), rtol=1e-6)
  assert out.info.negative_curvature.dtype == jnp.bool_
  assert bool(out.info.negative_curvature) == (sign < 0)
  # the methods that do not look report False
  other = bilevel.hypergradient(f, g, u, jnp.zeros(3), method=bilevel.Neumann(5), solve=solve)
  assert not bool(other.info.negative_curvature)
  # the optax form keeps the flag a bool in its state
  tx = bilevel.scale_by_hypergradient(bilevel.CG(10), jnp.zeros(3), solve=solve)
  _, state = tx.update(None, tx.init(u), u, upper_fn=f, lower_fn=g)
  assert state.info.negative_curvature.dtype == jnp.bool_
  assert bool(state.info.negative_curvature) == (sign < 0)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_run_warns_once_when_cg_meets_negative_curvature(sign):
  _, f, g, solve = convex_or_concave_lower(sign)
  s = bilevel.solver(f, g, optax.sgd(0.1), bilevel.CG(10), solve=solve)
  state = s.init(jax.random.key(0), jnp.array([1.0, 2.0, 3.0]), jnp.zeros(3))
  if sign > 0:
    with warnings.catch_warnings():
      warnings.simplefilter("error", kbeam_jax.SolverWarning)
      jax.block_until_ready(kbeam_jax.run(s.step, state, 4))  # a convex lower problem: silent
    return
  with pytest.warns(kbeam_jax.SolverWarning, match="4 of 4 steps met negative curvature") as rec:
    _, trajectory = jax.block_until_ready(kbeam_jax.run(s.step, state, 4))
  assert len([w for w in rec if issubclass(w.category, kbeam_jax.SolverWarning)]) == 1
  assert bool(jnp.all(trajectory.negative_curvature))
  assert not bool(jnp.any(trajectory.diverging))  # the inner solve itself is fine


def test_a_bare_method_base_class_is_rejected():
  p = Quadratic(12)
  for bare in (bilevel.Method(), bilevel.Implicit()):
    with pytest.raises(TypeError, match="method must be a hypergradient method value"):
      bilevel.hypergradient(p.f, p.g, p.u, p.v0, method=bare, inner_steps=1, inner_lr=LR)


def test_cg_without_its_fallback_is_plain_cg():
  # The singular example: plain CG is wrong there; CG(fallback=False) is plain CG.
  A = jnp.array([[1.0, 0.0, 0.0], [0.0, 0.5, 0.0]])
  f = lambda u, v: jnp.sum(v**2)
  g = lambda u, v: jnp.sum((A @ (u - v)) ** 2)
  u, v0 = jnp.array([1.0, 2.0, 3.0]), jnp.array([0.0, 0.0, 1.0])
  kw = dict(inner_steps=200, inner_lr=0.5)
  plain = bilevel.hypergradient(f, g, u, v0, method=bilevel.CG(10, fallback=False), **kw)
  assert not np.allclose(plain.grad, [2.0, 4.0, 0.0], atol=1e-3)
  with pytest.raises(ValueError, match=r"CG\.fallback must be a bool"):
    bilevel.CG(10, fallback="yes")
