"""The importance-learning (data denoising) task on tiny synthetic digits."""

import functools

import _tiny_digits
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kbeam_jax
from kbeam_jax import bilevel
from kbeam_jax.tasks import denoising

METHODS = {
  "penalty": functools.partial(bilevel.penalty, gamma=1.0, epsilon=0.1, max_gamma=2.0),
  "approxgrad": functools.partial(bilevel.solver, method=bilevel.ApproxGrad(200, 0.04)),
  "rmd": functools.partial(bilevel.solver, method=bilevel.RMD()),
  "naive": functools.partial(bilevel.solver, method=bilevel.Naive()),
}

L2 = 1e-2  # makes the tiny lower problem strongly convex


# Ten noisy prototype patterns as uint8 28×28 images, labels their prototype.
tiny_digits = functools.partial(_tiny_digits.tiny_digits, noise=60)
# Gradient descent on the lower problem (step 0.1: 0.5 oscillates on these pixels).
solve_lower = functools.partial(_tiny_digits.solve_lower, lr=0.1)


@pytest.fixture(scope="module")
def tiny():
  images, labels = tiny_digits(100, 0)
  test_images, test_labels = tiny_digits(50, 1)
  return denoising.make_data(
    images, labels, test_images, test_labels, num_train=40, num_val=40, noise=0.5, seed=3
  )


def test_data_shapes_and_corruption(tiny):
  assert tiny.x_train.shape == (40, 784) and tiny.x_val.shape == (40, 784)
  assert tiny.x_test.shape == (50, 784) and tiny.x_train.dtype == np.float32
  assert 0.0 <= tiny.x_train.min() and tiny.x_train.max() <= 1.0
  assert tiny.corrupted.sum() == 20  # exactly half
  np.testing.assert_array_equal(tiny.y_train != tiny.y_clean, tiny.corrupted)


def test_data_is_deterministic_given_the_seed():
  images, labels = tiny_digits(100, 0)
  make = lambda seed: denoising.make_data(
    images, labels, images, labels, num_train=30, num_val=30, noise=0.3, seed=seed
  )
  a, b, c = make(5), make(5), make(6)
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(a.y_train, c.y_train)


def test_objectives_values_and_weights(tiny):
  model = denoising.softmax_regression()
  f, g = denoising.objectives(model)
  args = tiny.bilevel_args()
  v = model.init(None)
  # At v = 0 every class has probability 1/10, whatever the weights.
  np.testing.assert_allclose(f(jnp.zeros(40), v, *args), np.log(10.0), rtol=1e-6)
  np.testing.assert_allclose(g(jnp.ones(40), v, *args), np.log(10.0), rtol=1e-6)
  np.testing.assert_allclose(
    denoising.importance_weights(jnp.array([-50.0, 0.0, 50.0])), [0, 0.5, 1]
  )
  # g weighs each point by w_i / Σ w: a point with weight ~0 does not count.
  v = {"W": jax.random.normal(jax.random.key(0), (784, 10)) * 0.01, "b": jnp.zeros(10)}
  a = jnp.where(jnp.arange(40) < 20, 50.0, -50.0)
  sub = (args[0][:20], args[1][:20]) + args[2:]
  np.testing.assert_allclose(g(a, v, *args), g(jnp.zeros(20), v, *sub), rtol=1e-5)


def test_lower_optimum_is_reached(tiny):
  model = denoising.softmax_regression()
  _, g = denoising.objectives(model, l2=L2)
  args = tiny.bilevel_args()
  a = jax.random.normal(jax.random.key(1), (40,))
  v = solve_lower(g, a, model.init(None), args)
  grad = jax.grad(g, argnums=1)(a, v, *args)
  grad0 = jax.grad(g, argnums=1)(a, model.init(None), *args)
  norm = lambda t: float(jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(t))))
  assert norm(grad) < 1e-3 * norm(grad0)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_upper_objective_decreases_and_runs_are_deterministic(tiny, method):
  model = denoising.softmax_regression()
  f, g = denoising.objectives(model, l2=L2)
  args = tiny.bilevel_args()
  a0 = jnp.zeros(40)
  v0 = solve_lower(g, a0, model.init(None), args)
  # Step sizes inside the stability bounds of this data (λ_max(∇²_vv g) ≈ 5 at the lower
  # optimum, ≈ 20 at v = 0): descent ρ < 2/λ, ApproxGrad's solve_lr < 2/λ², the penalty's
  # ρ·γ·λ² < 2. T = 30 warm-started steps keep v near v*(a) while a moves.
  solver = METHODS[method](
    f,
    g,
    optax.adam(0.3),
    inner_steps=30,
    inner_lr=0.02 if method == "penalty" else 0.1,
  )
  trace = lambda s, info: info.value
  run = jax.jit(lambda s: kbeam_jax.run(solver.step, s, 10, *args, trace=trace))
  state, values = run(solver.init(jax.random.key(0), a0, v0))
  state_again, values_again = run(solver.init(jax.random.key(0), a0, v0))
  np.testing.assert_array_equal(values, values_again)
  np.testing.assert_array_equal(state.u, state_again.u)
  assert values.shape == (10,) and state.u.shape == (40,)
  # Compare f at the lower optimum before and after (the iterate v may lag behind).
  before = float(f(a0, v0, *args))
  after = float(f(state.u, solve_lower(g, state.u, v0, args), *args))
  if method == "naive":  # ∇_a f = 0: the implicit term is the whole hypergradient
    np.testing.assert_array_equal(state.u, a0)
  else:
    assert after < before - 0.01, (before, after)
    # the points it trusts most are clean ones more often than chance
    top = np.argsort(-np.asarray(state.u))[:10]
    assert np.mean(~tiny.corrupted[top]) > 0.5


def test_rmd_and_approxgrad_agree_on_the_task():
  """Both estimate the same hypergradient at a converged lower problem."""
  images, labels = tiny_digits(60, 2)
  d = denoising.make_data(
    images, labels, images, labels, num_train=20, num_val=20, noise=0.5, seed=0
  )
  model = denoising.softmax_regression()
  f, g = denoising.objectives(model, l2=L2)
  args = d.bilevel_args()
  a = jax.random.normal(jax.random.key(0), (20,))
  v = solve_lower(g, a, model.init(None), args)
  hg = lambda m: (
    bilevel.hypergradient(f, g, a, v, *args, method=m, inner_steps=1000, inner_lr=0.1).grad
  )
  rmd = hg(bilevel.RMD())
  # descent on ½|Hq - b|² is stable below 2/λ_max(H)² (≈ 0.09 here) and converges at the
  # rate of κ(H)²: many small steps
  ag = hg(bilevel.ApproxGrad(5000, 0.04))
  cosine = jnp.vdot(rmd, ag) / (jnp.linalg.norm(rmd) * jnp.linalg.norm(ag))
  assert float(cosine) > 0.95


def test_detection_and_retraining(tiny):
  det = denoising.detection(np.where(tiny.corrupted, 0.1, 0.99), tiny.corrupted)
  assert det == {"precision": 1.0, "recall": 1.0, "kept": 20}
  model = denoising.softmax_regression()
  acc = denoising.retrained_accuracy(model, tiny, ~tiny.corrupted, num_steps=100, lr=0.05)
  assert acc > 0.8


def test_small_cnn_shapes():
  model = denoising.small_cnn(channels=(2, 3))
  params = model.init(jax.random.key(0))
  assert params["conv2"].shape == (3, 3, 2, 3) and params["W"].shape == (7 * 7 * 3, 10)
  assert model.apply(params, jnp.zeros((5, 784))).shape == (5, 10)


def test_bad_inputs(tiny):
  images, labels = tiny_digits(20, 0)
  with pytest.raises(TypeError, match="uint8"):
    denoising.flatten_images(images.astype(np.float32))
  with pytest.raises(ValueError, match=r"\(N, 28, 28\)"):
    denoising.flatten_images(np.zeros((3, 27, 28), np.uint8))
  make = lambda **kw: denoising.make_data(
    images, labels, images, labels, **dict(dict(num_train=5, num_val=5, noise=0.5, seed=0), **kw)
  )
  with pytest.raises(ValueError, match="noise fraction"):
    make(noise=1.5)
  with pytest.raises(ValueError, match="exceeds the 20 images"):
    make(num_train=15, num_val=10)
  with pytest.raises(ValueError, match="labels must lie in 0..9"):
    denoising.make_data(
      images, labels + 5, images, labels, num_train=5, num_val=5, noise=0.1, seed=0
    )
  with pytest.raises(ValueError, match="l2 must be >= 0"):
    denoising.objectives(denoising.softmax_regression(), l2=-1.0)
  _, g = denoising.objectives(denoising.softmax_regression())
  with pytest.raises(ValueError, match="one entry per training point"):
    g(jnp.zeros(3), denoising.softmax_regression().init(None), *tiny.bilevel_args())
  with pytest.raises(ValueError, match="differ in shape"):
    denoising.detection(np.zeros(3), np.zeros(4, bool))


def test_three_levels_give_the_exact_derivative_of_the_strength(tiny):
  """d/dλ of the level-1 loss through a*(λ) (level 2, implicit by CG) and v*(a, λ) (level
  3, unrolled by RMD: the softmax's bias direction converges too slowly for an implicit
  rule at a finite step count, so level 3 is differentiated as computed): jax.grad and
  the solver's hypergradient against a central difference of the re-solved program,
  float64, small sizes."""
  with jax.enable_x64(True):
    model = denoising.softmax_regression(jnp.float64)
    x = jnp.asarray(tiny.x_train[:20], jnp.float64) * 0.3
    y = jnp.asarray(tiny.y_train[:20])
    xv, yv = jnp.asarray(tiny.x_val[:20], jnp.float64) * 0.3, jnp.asarray(tiny.y_val[:20])
    v0 = model.init(None)
    f, g = denoising.three_level_objectives(
      model, method=bilevel.RMD(), inner_steps=100, inner_lr=0.25, ridge=0.1
    )  # level 3: λ_max(∇²_vv) ≈ 4.1: descent at 0.25 is stable
    args = (x, y, xv[:10], yv[:10], xv[10:], yv[10:], v0)
    a_star = lambda log_l2: bilevel.argmin(
      g,
      log_l2,
      jnp.zeros(20),
      *args,
      method=bilevel.CG(50, tol=1e-12),
      inner_steps=300,
      inner_lr="auto",
    )
    F = lambda log_l2: f(log_l2, a_star(log_l2), *args)
    lam = jnp.asarray(np.log(0.05))
    fd = (F(lam + 1e-4) - F(lam - 1e-4)) / 2e-4
    np.testing.assert_allclose(jax.grad(F)(lam), fd, rtol=1e-4)
    solver = bilevel.solver(
      f, g, optax.sgd(0.0), bilevel.CG(50, tol=1e-12), inner_steps=300, inner_lr="auto"
    )
    _, info = solver.step(solver.init(jax.random.key(0), lam, jnp.zeros(20)), *args)
    np.testing.assert_allclose(info.grad_norm, abs(float(fd)), rtol=1e-4)
