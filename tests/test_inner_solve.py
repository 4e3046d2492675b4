"""The open inner solve: every mode and order of differentiation, any forward solver, roots,
fixed points and proximal problems, status and ``throw``, step sizes from the curvature,
traced step sizes, user-defined linear solvers, and the divergence flags."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kbeam_jax
from kbeam_jax import bilevel


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


# g = ½vᵀAv - sin(Bu)ᵀv + cᵀv: v*(u) = A⁻¹(sin(Bu) - c) in closed form, non-linear in u, so
# second derivatives of F(u) = f(u, v*(u)) are not trivial. (numpy float64 constants: they
# become float64 arrays under the x64 fixture.)
A = np.array([[3.0, 1.0, 0.0], [1.0, 2.0, 0.5], [0.0, 0.5, 1.5]])  # λ in about [1, 3.7]
B = np.array([[1.0, -0.5], [0.3, 0.8], [-0.7, 0.2]])
C = np.array([0.1, -0.2, 0.3])
U = np.array([0.4, -0.3])


def g(u, v):
  return 0.5 * v @ A @ v - jnp.sin(B @ u) @ v + C @ v


def f(u, v):
  return jnp.sum(jnp.cos(v)) + (u @ u) * jnp.sum(v)


def v_star(u):
  return jnp.linalg.solve(A, jnp.sin(B @ u) - C)


def F_exact(u):
  return f(u, v_star(u))


CONVERGED = {  # method -> inner settings at which it has converged on g
  "fmd": (bilevel.FMD(), dict(inner_steps=400, inner_lr=0.3)),
  "rmd": (bilevel.RMD(), dict(inner_steps=400, inner_lr=0.3)),
  "rmd_checkpoint": (bilevel.RMD(checkpoint=True), dict(inner_steps=400, inner_lr=0.3)),
  "cg": (bilevel.CG(20), dict(inner_steps=400, inner_lr=0.3)),
  "cg_plain": (bilevel.CG(20, fallback=False), dict(inner_steps=400, inner_lr=0.3)),
  "neumann": (bilevel.Neumann(400), dict(inner_steps=400, inner_lr=0.3)),
  "approxgrad": (bilevel.ApproxGrad(4000), dict(inner_steps=400, inner_lr=0.3)),
}


def F_of(name):
  method, settings = CONVERGED[name]
  return lambda u: f(u, bilevel.argmin(g, u, jnp.zeros(3), method=method, **settings))


@pytest.mark.parametrize("name", sorted(CONVERGED))
def test_every_mode_and_order_matches_the_closed_form(name):
  F = F_of(name)
  grad = jax.grad(F_exact)(U)
  np.testing.assert_allclose(jax.grad(F)(U), grad, rtol=1e-8)
  np.testing.assert_allclose(jax.jacfwd(F)(U), grad, rtol=1e-8)
  np.testing.assert_allclose(jax.jacrev(F)(U), grad, rtol=1e-8)
  t = jnp.array([0.7, -1.1])
  np.testing.assert_allclose(jax.jvp(F, (U,), (t,))[1], grad @ t, rtol=1e-8)
  _, pullback = jax.vjp(F, U)
  np.testing.assert_allclose(pullback(1.0)[0], grad, rtol=1e-8)
  hessian = jax.hessian(F_exact)(U)
  np.testing.assert_allclose(jax.hessian(F)(U), hessian, rtol=1e-7, atol=1e-10)
  np.testing.assert_allclose(jax.jacrev(jax.jacrev(F))(U), hessian, rtol=1e-7, atol=1e-10)
  gg = jax.grad(lambda u: jax.grad(F)(u) @ t)(U)  # reverse over reverse
  np.testing.assert_allclose(gg, hessian @ t, rtol=1e-7, atol=1e-10)
  # the Jacobian of the answer itself, forward and reverse
  method, settings = CONVERGED[name]
  v = lambda u: bilevel.argmin(g, u, jnp.zeros(3), method=method, **settings)
  jac = jax.jacfwd(v_star)(U)
  np.testing.assert_allclose(jax.jacfwd(v)(U), jac, rtol=1e-8, atol=1e-12)
  np.testing.assert_allclose(jax.jacrev(v)(U), jac, rtol=1e-8, atol=1e-12)


def test_naive_is_a_constant_in_every_mode():
  v = lambda u: bilevel.argmin(
    g, u, jnp.zeros(3), method=bilevel.Naive(), inner_steps=5, inner_lr=0.3
  )
  np.testing.assert_array_equal(jax.jacfwd(v)(U), 0.0)
  np.testing.assert_array_equal(jax.jacrev(v)(U), 0.0)


@pytest.mark.parametrize("name", ["cg", "neumann", "approxgrad", "fmd", "rmd"])
def test_your_own_forward_solver(name):
  method, _ = CONVERGED[name]
  closed = lambda u, v0: v_star(u)
  F = lambda u: f(u, bilevel.argmin(g, u, jnp.zeros(3), method=method, solve=closed))
  np.testing.assert_allclose(jax.grad(F)(U), jax.grad(F_exact)(U), rtol=1e-8)
  np.testing.assert_allclose(jax.jacfwd(F)(U), jax.grad(F_exact)(U), rtol=1e-8)
  v, info = bilevel.argmin(g, U, jnp.zeros(3), method=method, solve=closed, return_info=True)
  assert int(info.inner_steps) == -1 and bool(info.converged) and float(info.grad_norm) < 1e-12
  out = bilevel.hypergradient(f, g, U, jnp.zeros(3), method=method, solve=closed)
  np.testing.assert_allclose(out.grad, jax.grad(F_exact)(U), rtol=1e-8)


def test_a_solve_that_is_a_while_loop_with_a_tolerance():
  def solve(u, v0):  # gradient descent to |∇_v g| < 1e-12, however many steps it takes
    grad = lambda v: jax.grad(g, argnums=1)(u, v)
    return jax.lax.while_loop(
      lambda v: jnp.linalg.norm(grad(v)) > 1e-12, lambda v: v - 0.3 * grad(v), v0
    )

  F = lambda u: f(u, bilevel.argmin(g, u, jnp.zeros(3), method=bilevel.CG(20), solve=solve))
  np.testing.assert_allclose(jax.grad(F)(U), jax.grad(F_exact)(U), rtol=1e-8)
  np.testing.assert_allclose(jax.hessian(F)(U), jax.hessian(F_exact)(U), rtol=1e-7)


def test_solve_excludes_the_loop_settings():
  closed = lambda u, v0: v_star(u)
  with pytest.raises(ValueError, match="solve= replaces the built-in loop"):
    bilevel.argmin(g, U, jnp.zeros(3), method=bilevel.CG(5), solve=closed, inner_steps=3)
  with pytest.raises(TypeError, match="pass inner_steps="):
    bilevel.argmin(g, U, jnp.zeros(3), method=bilevel.CG(5), inner_lr=0.1)
  with pytest.raises(ValueError, match=r"v0 and solve\(u, v0, \*args\) must have the same"):
    bilevel.argmin(g, U, jnp.zeros(3), method=bilevel.CG(5), solve=lambda u, v0: (v0, v0))


def test_lbfgs_and_any_optax_optimizer_drive_the_loop():
  for inner in (optax.lbfgs(), optax.adam(0.1), optax.sgd(0.3, momentum=0.5)):
    v, info = bilevel.argmin(
      g, U, jnp.zeros(3), method=bilevel.CG(20), inner_steps=300, inner=inner, return_info=True
    )
    np.testing.assert_allclose(v, v_star(U), atol=1e-6)
    assert bool(info.converged)
  F = lambda u: f(
    u,
    bilevel.argmin(g, u, jnp.zeros(3), method=bilevel.CG(20), inner_steps=50, inner=optax.lbfgs()),
  )
  np.testing.assert_allclose(jax.grad(F)(U), jax.grad(F_exact)(U), rtol=1e-8)


def test_an_optimizer_the_loop_cannot_drive_is_refused_clearly():
  T = lambda u, v: 0.5 * v + jnp.sin(B @ u)
  with pytest.raises(TypeError, match="could not be driven by fixed_point's built-in loop"):
    bilevel.fixed_point(
      T, U, jnp.zeros(3), method=bilevel.CG(5), inner_steps=5, inner=optax.lbfgs()
    )
  with pytest.raises(TypeError, match=r"call it to build the optimizer, e\.g\. inner=optax"):
    bilevel.argmin(g, U, jnp.zeros(3), method=bilevel.CG(5), inner_steps=5, inner=optax.sgd)


def test_tol_stops_early_and_the_unrolled_methods_refuse_it():
  v, info = bilevel.argmin(
    g,
    U,
    jnp.zeros(3),
    method=bilevel.CG(20),
    inner_steps=1000,
    inner_lr=0.3,
    tol=1e-8,
    return_info=True,
  )
  assert 10 < int(info.inner_steps) < 1000 and float(info.grad_norm) <= 1e-8
  assert bool(info.converged) and not bool(info.diverging)
  F = lambda u: f(
    u,
    bilevel.argmin(
      g, u, jnp.zeros(3), method=bilevel.CG(20), inner_steps=1000, inner_lr=0.3, tol=1e-12
    ),
  )
  np.testing.assert_allclose(jax.grad(F)(U), jax.grad(F_exact)(U), rtol=1e-8)
  for method in (bilevel.RMD(), bilevel.FMD()):
    with pytest.raises(ValueError, match="cannot stop at a tolerance"):
      bilevel.argmin(g, U, jnp.zeros(3), method=method, inner_steps=10, inner_lr=0.3, tol=1e-6)


# A non-symmetric root problem: F(u, v) = Mv + tanh(v) - Bu, with ∂_v F = M + diag(sech²).
M = np.array([[2.0, 1.0, 0.0], [-0.5, 1.5, 0.3], [0.0, -0.4, 1.0]])


def root_F(u, v):
  return M @ v + 0.2 * jnp.tanh(v) - B @ u


@pytest.mark.parametrize(
  "method",
  [bilevel.CG(30), bilevel.Neumann(300), bilevel.ApproxGrad(5000), bilevel.FMD()],
  ids=["cg", "neumann", "approxgrad", "fmd"],
)
def test_root_is_differentiated_with_the_inverse_jacobian(method):
  solve = lambda u: bilevel.root(
    root_F, u, jnp.zeros(3), method=method, inner_steps=400, inner_lr=0.3
  )
  v = solve(U)
  np.testing.assert_allclose(root_F(U, v), 0.0, atol=1e-10)
  J_v = M + 0.2 * jnp.diag(1 - jnp.tanh(v) ** 2)
  expected = jnp.linalg.solve(J_v, B)  # dv/du = (∂_v F)⁻¹ B
  np.testing.assert_allclose(jax.jacfwd(solve)(U), expected, rtol=1e-6)
  np.testing.assert_allclose(jax.jacrev(solve)(U), expected, rtol=1e-6)


@pytest.mark.parametrize(
  "method", [bilevel.CG(30), bilevel.Neumann(100), bilevel.RMD()], ids=["cg", "neumann", "rmd"]
)
def test_fixed_point_is_differentiated_with_i_minus_dt(method):
  T = lambda u, v: 0.5 * jnp.tanh(v) + B @ u  # a contraction
  solve = lambda u: bilevel.fixed_point(T, u, jnp.zeros(3), method=method, inner_steps=200)
  v = solve(U)
  np.testing.assert_allclose(T(U, v), v, atol=1e-12)
  expected = jnp.linalg.solve(jnp.eye(3) - 0.5 * jnp.diag(1 - jnp.tanh(v) ** 2), B)
  np.testing.assert_allclose(jax.jacrev(solve)(U), expected, rtol=1e-8)
  np.testing.assert_allclose(jax.jacfwd(solve)(U), expected, rtol=1e-8)


def lasso_data():
  x = jax.random.normal(jax.random.key(0), (30, 8))
  w = jnp.array([1.0, 0, 0, 2.0, 0, 0, -1.0, 0])
  y = x @ w + 0.1 * jax.random.normal(jax.random.key(1), (30,))
  return x[15:], y[15:], x[:15], y[:15]


def soft_threshold(log_l1, w, step):
  return jnp.sign(w) * jnp.maximum(jnp.abs(w) - step * jnp.exp(log_l1), 0.0)


@pytest.mark.parametrize(
  "method",
  [bilevel.CG(50), bilevel.Neumann(3000), bilevel.ApproxGrad(20000)],
  ids=["cg", "neumann", "approxgrad"],
)
def test_lasso_through_the_proximal_fixed_point_matches_the_closed_form(method):
  x_tr, y_tr, x_val, y_val = lasso_data()
  lower = lambda log_l1, w: 0.5 * jnp.mean((x_tr @ w - y_tr) ** 2)
  solve = lambda log_l1: bilevel.argmin(
    lower,
    log_l1,
    jnp.zeros(8),
    method=method,
    inner_steps=5000,
    inner_lr="auto",
    prox=soft_threshold,
  )
  log_l1 = jnp.log(0.1)
  w = solve(log_l1)
  # On the support S the KKT conditions H_SS w_S - X_Sᵀy/n + λ sign(w_S) = 0 give
  # dw_S/dλ = -H_SS⁻¹ sign(w_S); off the support w stays 0. d/d(log λ) = λ d/dλ.
  S = jnp.abs(w) > 1e-8
  assert 0 < int(S.sum()) < 8
  H = x_tr.T @ x_tr / len(y_tr)
  idx = jnp.where(S)[0]
  dws = -jnp.linalg.solve(H[jnp.ix_(idx, idx)], jnp.sign(w[idx])) * 0.1
  expected = jnp.zeros(8).at[idx].set(dws)
  np.testing.assert_allclose(jax.jacrev(solve)(log_l1), expected, rtol=1e-6, atol=1e-10)
  np.testing.assert_allclose(jax.jacfwd(solve)(log_l1), expected, rtol=1e-6, atol=1e-10)


def test_lasso_matches_jaxopt():
  jaxopt = pytest.importorskip("jaxopt")
  x_tr, y_tr, x_val, y_val = lasso_data()
  outer = lambda w: 0.5 * jnp.mean((x_val @ w - y_val) ** 2)
  lower = lambda log_l1, w: 0.5 * jnp.mean((x_tr @ w - y_tr) ** 2)
  ours = lambda log_l1: outer(
    bilevel.argmin(
      lower,
      log_l1,
      jnp.zeros(8),
      method=bilevel.CG(50),
      inner_steps=5000,
      inner_lr="auto",
      prox=soft_threshold,
    )
  )
  fun = lambda w, log_l1: 0.5 * jnp.mean((x_tr @ w - y_tr) ** 2)
  pg = jaxopt.ProximalGradient(fun=fun, prox=jaxopt.prox.prox_lasso, tol=1e-12, maxiter=5000)
  theirs = lambda log_l1: outer(
    pg.run(jnp.zeros(8), hyperparams_prox=jnp.exp(log_l1), log_l1=log_l1).params
  )
  np.testing.assert_allclose(
    jax.grad(ours)(jnp.log(0.1)), jax.grad(theirs)(jnp.log(0.1)), rtol=1e-7
  )


def test_projected_descent_in_a_box():
  box = lambda v: jnp.clip(v, -0.05, 0.05)
  solve = lambda u: bilevel.argmin(
    g, u, jnp.zeros(3), method=bilevel.CG(20), inner_steps=500, inner_lr=0.3, project_v=box
  )
  v = solve(U)
  assert float(jnp.abs(v).max()) <= 0.05 + 1e-12
  # coordinates at the bound do not move with u; check the rest by finite differences
  t = jnp.array([1.0, 0.5])
  fd = (solve(U + 1e-6 * t) - solve(U - 1e-6 * t)) / 2e-6
  np.testing.assert_allclose(jax.jvp(solve, (U,), (t,))[1], fd, atol=1e-6)


# ----------------------------------------------------------------- status and throw


def issue_problem():
  f = lambda u, v: jnp.sum((v - 1.0) ** 2)
  g = lambda u, v: jnp.sum((v - u) ** 2) / 2  # true hypergradient [4, 2] at u = (3, 2)
  return f, g, jnp.array([3.0, 2.0]), jnp.zeros(2)


def test_cg_never_returns_an_overflowed_zero_and_the_step_is_flagged():
  f, g, u, v0 = issue_problem()
  with jax.enable_x64(False):
    u, v0 = u.astype(jnp.float32), v0.astype(jnp.float32)
    out = bilevel.hypergradient(f, g, u, v0, method=bilevel.CG(5), inner_steps=50, inner_lr=5.0)
    assert float(jnp.abs(out.grad).min()) > 1e20  # the (huge) answer, not 0
    assert bool(out.info.diverging) and not bool(out.info.converged)
    solver = bilevel.solver(f, g, optax.sgd(0.1), bilevel.CG(5), inner_steps=50, inner_lr=5.0)
    _, info = solver.step(solver.init(jax.random.key(0), u, v0))
    assert bool(info.diverging)
    out = bilevel.hypergradient(f, g, u, v0, method=bilevel.CG(5), inner_steps=50, inner_lr=2.5)
    assert bool(out.info.diverging)
    good = bilevel.hypergradient(f, g, u, v0, method=bilevel.CG(5), inner_steps=50, inner_lr=0.5)
    np.testing.assert_allclose(good.grad, [4.0, 2.0], rtol=1e-5)
    assert bool(good.info.converged) and not bool(good.info.diverging)


def test_throw_names_the_cause_and_the_fix_under_jit():
  f, g, u, v0 = issue_problem()
  run = jax.jit(
    lambda u: bilevel.argmin(
      g, u, v0, method=bilevel.CG(5), inner_steps=50, inner_lr=2.5, throw=True
    )
  )
  with pytest.raises(Exception, match=r"inner_lr 2\.5 is above 2/λ_max ≈ 2 .*inner_lr=\"auto\""):
    jax.block_until_ready(run(u))
  with pytest.raises(Exception, match=r"Neumann's solve_lr 3 is above 2/λ_max ≈ 2"):
    jax.block_until_ready(
      bilevel.hypergradient(
        f, g, u, v0, method=bilevel.Neumann(40, 3.0), inner_steps=50, inner_lr=0.5, throw=True
      ).grad
    )
  with pytest.raises(Exception, match=r"did not reach tol=1e-10 within inner_steps=3"):
    jax.block_until_ready(
      bilevel.argmin(
        g, u, v0, method=bilevel.CG(5), inner_steps=3, inner_lr=0.1, tol=1e-10, throw=True
      )
    )
  # no error when the solve is fine, also under vmap
  vs = jax.vmap(
    lambda u: bilevel.argmin(
      g, u, v0, method=bilevel.CG(5), inner_steps=50, inner_lr=0.5, throw=True
    )
  )(jnp.stack([u, 2 * u]))
  np.testing.assert_allclose(vs, jnp.stack([u, 2 * u]), rtol=1e-8)


def test_neumann_with_a_too_large_step_is_flagged():
  f, g, u, v0 = issue_problem()
  out = bilevel.hypergradient(
    f, g, u, v0, method=bilevel.Neumann(40, 3.0), inner_steps=50, inner_lr=0.5
  )
  assert float(out.info.linear_residual) > 1 and bool(out.info.diverging)
  auto = bilevel.hypergradient(
    f, g, u, v0, method=bilevel.Neumann(40), inner_steps=50, inner_lr=0.5
  )
  np.testing.assert_allclose(auto.grad, [4.0, 2.0], rtol=1e-8)
  assert float(auto.info.linear_residual) < 1e-8 and not bool(auto.info.diverging)


def condition_1000():
  eig = jnp.logspace(0, 3, 20)
  Q = jnp.linalg.qr(jax.random.normal(jax.random.key(3), (20, 20)))[0]
  H = Q @ jnp.diag(eig) @ Q.T
  g = lambda u, v: 0.5 * v @ H @ v - u @ v
  f = lambda u, v: 0.5 * jnp.sum((v - 1.0) ** 2)
  u = jax.random.normal(jax.random.key(4), (20,))
  exact = jnp.linalg.solve(H, jnp.linalg.solve(H, u) - 1.0)
  solve = lambda u, v0: jnp.linalg.solve(H, u)
  return f, g, u, solve, exact


def test_auto_steps_on_a_condition_1000_quadratic():
  f, g, u, solve, exact = condition_1000()
  error = lambda m: float(
    jnp.linalg.norm(
      bilevel.hypergradient(f, g, u, jnp.zeros(20), method=m, solve=solve).grad - exact
    )
    / jnp.linalg.norm(exact)
  )
  assert error(bilevel.CG(60)) <= 1e-3
  assert error(bilevel.Neumann(10_000)) <= 1e-3
  errors = [error(bilevel.ApproxGrad(n)) for n in (100, 1000, 10_000)]
  assert all(np.isfinite(errors)) and errors[0] > errors[1] > errors[2], errors
  # the inner loop's auto step converges too, where a hand-picked 1/λ_min would diverge
  v, info = bilevel.argmin(
    g, u, jnp.zeros(20), method=bilevel.CG(5), inner_steps=20_000, inner_lr="auto", return_info=True
  )
  assert bool(info.converged) and not bool(info.diverging)


def test_max_curvature():
  f, g, u, solve, exact = condition_1000()
  np.testing.assert_allclose(
    bilevel.max_curvature(g, u, jnp.zeros(20), power_steps=100), 1000.0, rtol=1e-3
  )
  lam = jax.jit(lambda u: bilevel.max_curvature(g, u, jnp.zeros(20)))(u)
  assert 500 < float(lam) <= 1000.0 * (1 + 1e-9)
  scaled = jax.vmap(
    lambda s: bilevel.max_curvature(lambda u, v: s * g(u, v), u, jnp.zeros(20), power_steps=100)
  )(jnp.array([1.0, 2.0]))
  np.testing.assert_allclose(scaled, [1000.0, 2000.0], rtol=1e-3)


# -------------------------------------------------------------- traced step sizes


@pytest.mark.parametrize("method", [bilevel.RMD(), bilevel.FMD()], ids=["rmd", "fmd"])
def test_the_inner_step_size_is_differentiable(method):
  L = lambda lr: f(U, bilevel.argmin(g, U, jnp.zeros(3), method=method, inner_steps=8, inner_lr=lr))
  fd = (L(0.3 + 1e-6) - L(0.3 - 1e-6)) / 2e-6
  np.testing.assert_allclose(jax.grad(L)(0.3), fd, rtol=1e-6)
  np.testing.assert_allclose(jax.vmap(L)(jnp.array([0.1, 0.3])), [L(0.1), L(0.3)], rtol=1e-12)
  # per-coordinate steps (Meta-SGD), and a schedule over a traced value
  L2 = lambda lrs: f(
    U, bilevel.argmin(g, U, jnp.zeros(3), method=method, inner_steps=8, inner_lr=lrs)
  )
  lrs = jnp.array([0.2, 0.3, 0.4])
  e = jnp.array([0.0, 1.0, 0.0])
  fd = (L2(lrs + 1e-6 * e) - L2(lrs - 1e-6 * e)) / 2e-6
  np.testing.assert_allclose(jax.grad(L2)(lrs)[1], fd, rtol=1e-6)
  L3 = lambda c: f(
    U,
    bilevel.argmin(
      g, U, jnp.zeros(3), method=method, inner_steps=8, inner_lr=lambda t: c / (1.0 + t)
    ),
  )
  fd = (L3(0.5 + 1e-6) - L3(0.5 - 1e-6)) / 2e-6
  np.testing.assert_allclose(jax.jit(jax.grad(L3))(0.5), fd, rtol=1e-6)


def test_traced_step_sizes_are_accepted_and_compile_once(compile_counter):
  v = lambda lr: bilevel.argmin(
    g, U, jnp.zeros(3), method=bilevel.CG(5), inner_steps=30, inner_lr=lr
  )
  np.testing.assert_allclose(v(jnp.asarray(0.3)), v(0.3), rtol=1e-12)
  np.testing.assert_allclose(jax.jit(v)(0.3), v(0.3), rtol=1e-12)
  v(0.2)
  compile_counter.reset()
  v(0.25)  # a new value of the same step size: the same program
  assert compile_counter.count == 0


# ----------------------------------------------------------- methods with behaviour


@dataclasses.dataclass(frozen=True)
class JacobiCG(bilevel.Implicit):
  diagonal: tuple

  def linear_solve(self, matvec, b, x0, *, symmetric):
    M = lambda r: r / jnp.asarray(self.diagonal)
    return jax.scipy.sparse.linalg.cg(matvec, b, x0, M=M, maxiter=50, tol=1e-14)[0]


def test_a_user_linear_solver_in_every_mode():
  method = JacobiCG(tuple(np.diag(np.asarray(A)).tolist()))
  F = lambda u: f(
    u, bilevel.argmin(g, u, jnp.zeros(3), method=method, inner_steps=400, inner_lr=0.3)
  )
  np.testing.assert_allclose(jax.grad(F)(U), jax.grad(F_exact)(U), rtol=1e-8)
  np.testing.assert_allclose(jax.jacfwd(F)(U), jax.grad(F_exact)(U), rtol=1e-8)
  np.testing.assert_allclose(jax.hessian(F)(U), jax.hessian(F_exact)(U), rtol=1e-7)
  solver = bilevel.solver(f, g, optax.sgd(0.1), method, inner_steps=20, inner_lr=0.3)
  state, info = kbeam_jax.run(solver.step, solver.init(jax.random.key(0), U, jnp.zeros(3)), 5)
  assert bool(info.finite.all())


def test_an_unhashable_method_is_refused_with_the_fix():
  @dataclasses.dataclass(frozen=True)
  class Bad(bilevel.Implicit):
    diagonal: jax.Array

    def linear_solve(self, matvec, b, x0, *, symmetric):
      return b

  with pytest.raises(TypeError, match="must be hashable .* keep arrays out of its fields"):
    bilevel.argmin(g, U, jnp.zeros(3), method=Bad(jnp.ones(3)), inner_steps=1, inner_lr=0.1)


# -------------------------------------------------------------- the outer solver


def test_the_solver_warm_starts_the_linear_solve():
  # With u fixed, ApproxGrad(3) run over many outer steps reaches the exact adjoint
  # q = H⁻¹∇_v f, which three descent steps from zero are far from.
  solver = bilevel.solver(f, g, optax.sgd(0.0), bilevel.ApproxGrad(3), inner_steps=50, inner_lr=0.3)
  state = solver.init(jax.random.key(0), U, jnp.zeros(3))
  one, _ = solver.step(state)
  many, info = kbeam_jax.run(solver.step, state, 300)
  v = v_star(U)
  q = jnp.linalg.solve(A, jax.grad(f, argnums=1)(U, v))
  np.testing.assert_allclose(many.adjoint, q, rtol=1e-8)
  assert float(jnp.linalg.norm(one.adjoint - q)) > 1e-3
  assert float(info.linear_residual[-1]) < 1e-10 < float(info.linear_residual[0])


# ------------------------------------------------------------ the penalty method


def test_penalty_flags_an_overflowing_lower_gradient():
  f = lambda u, v: -2.0 * jnp.sum(v**2)
  g = lambda u, v: 0.5 * jnp.sum((v - u) ** 2)
  with jax.enable_x64(False):
    s = bilevel.penalty(
      f, g, optax.sgd(0.01), inner_steps=1, inner_lr=0.1, gamma=1.0, max_gamma=1.0
    )
    state = s.init(jax.random.key(0), jnp.zeros(10), jnp.ones(10))
    _, info = jax.jit(lambda x: kbeam_jax.run(s.step, x, 250))(state)
  assert not np.isfinite(float(info.lower_grad_norm[-1]))
  assert bool(info.diverging[-1])


def test_penalty_flags_the_step_where_its_defaults_become_unstable():
  f = lambda u, v: jnp.sum(u**2) + jnp.sum(v**2)
  g = lambda u, v: jnp.sum((1.0 - u - v) ** 2)
  with jax.enable_x64(False):
    ku, kv = jax.random.split(jax.random.key(0))
    u0, v0 = (jax.random.uniform(k, (10,), minval=-5.0, maxval=5.0) for k in (ku, kv))
    s = bilevel.penalty(f, g, optax.sgd(0.01), inner_steps=5, inner_lr=0.01)
    _, info = jax.jit(lambda x: kbeam_jax.run(s.step, x, 2000))(s.init(jax.random.key(0), u0, v0))
  diverging, stability = np.asarray(info.diverging), np.asarray(info.stability)
  first = int(np.argmax(diverging))
  assert diverging[-1] and diverging.any()
  # ∇²_vv L_γ = 2 + 4γ here: ρ(2 + 4γ) reaches 2 at γ = 49.5, where the flag first fires
  assert stability[first] >= 2 and np.all(stability[:first] < 2)
  np.testing.assert_allclose(
    stability[first], 0.01 * (2 + 4 * float(info.gamma[first - 1])), rtol=2e-2
  )
