"""N-player games: every solver's step against a dense-Jacobian reference on a small random
game (float64), gradient play against the minimax GDA solvers on zero-sum games,
convergence to closed-form Nash points, the Stackelberg leader, and bad input."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import kbeam_jax
from kbeam_jax import bilevel, games, minimax


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


def random_game(seed=0):
  """Three players (a dict of two vectors, a scalar, a 2-vector), non-quadratic losses."""
  rng = np.random.default_rng(seed)
  W = [rng.normal(size=(6, 6)) for _ in range(3)]
  c = [rng.normal(size=6) for _ in range(3)]

  def flat(players):
    return jnp.concatenate([ravel_pytree(p)[0] for p in players])

  def loss(i):
    def L(players, scale=1.0):
      x = flat(players)
      return scale * (x @ W[i] @ x / 6 + c[i] @ jnp.sin(x) + 0.1 * jnp.sum(x**4) / (i + 1))

    return L

  players = (
    {"a": jnp.array([0.3, -0.2]), "b": jnp.array([0.1])},
    jnp.array(0.4),
    jnp.array([-0.5, 0.2]),
  )
  return [loss(i) for i in range(3)], players


def dense(losses, players):
  """``ξ``, ``H``, the player blocks and the cross gradients, all dense, by autodiff."""
  x0, unravel = ravel_pytree(players)
  sizes = [ravel_pytree(p)[0].size for p in players]
  blocks = np.split(np.arange(x0.size), np.cumsum(sizes)[:-1])

  def xi(x):
    ps = unravel(x)
    out = []
    for i, L in enumerate(losses):
      g = jax.grad(L)(ps)
      out.append(ravel_pytree(g)[0][blocks[i]])
    return jnp.concatenate(out)

  H = jax.jacfwd(xi)(x0)
  G = [ravel_pytree(jax.grad(L)(unravel(x0)))[0] for L in losses]  # ∇L_i w.r.t. all
  H_o = H.copy()
  for b in blocks:
    H_o = H_o.at[jnp.ix_(b, b)].set(0.0)
  return x0, unravel, xi(x0), H, H_o, G, blocks


def reference_direction(name, losses, players, **kw):
  x0, unravel, xi, H, H_o, G, blocks = dense(losses, players)
  if name == "consensus":
    return xi + kw["gamma"] * H.T @ xi
  if name == "sga":
    at = 0.5 * (H.T - H) @ xi
    ht = H.T @ xi
    sign = jnp.sign((xi @ ht) * (at @ ht) / xi.size + 0.1)
    return xi + kw["lam"] * sign * at
  alpha = kw.get("lookahead_lr", 0.0)
  xi0 = xi - alpha * H_o @ xi
  chi = jnp.zeros_like(xi)
  for i, bi in enumerate(blocks):
    for j, bj in enumerate(blocks):
      if j != i:
        chi = chi.at[bi].add(H[jnp.ix_(bj, bi)].T @ G[i][bj])
  if name == "lookahead":
    return xi0
  if name == "lola":
    return xi0 - alpha * chi
  if name == "sos":
    dot = -alpha * chi @ xi0
    p1 = 1.0 if dot >= 0 else min(1.0, float(-0.5 * (xi0 @ xi0) / dot))
    p2 = float(xi @ xi) if float(jnp.linalg.norm(xi)) < 0.1 else 1.0
    return xi0 - min(p1, p2) * alpha * chi
  if name == "cgd":
    return jnp.linalg.solve(jnp.eye(xi.size) + kw["lr"] * H_o, xi)
  raise KeyError(name)


SOLVERS = {
  "consensus": (games.consensus, dict(gamma=0.7)),
  "sga": (games.sga, dict(lam=0.8)),
  "lookahead": (games.lookahead, dict(lookahead_lr=0.3)),
  "lola": (games.lola, dict(lookahead_lr=0.3)),
  "sos": (games.sos, dict(lookahead_lr=0.3)),
  "cgd": (functools.partial(games.cgd, solve_steps=40, tol=1e-13), {}),
}


@pytest.mark.parametrize("name", sorted(SOLVERS))
@pytest.mark.parametrize("seed", [0, 1])
def test_one_step_matches_the_dense_jacobian_reference(name, seed):
  losses, players = random_game(seed)
  make, kw = SOLVERS[name]
  lr = 0.05
  solver = make(losses, lr, **kw)
  state, info = jax.jit(solver.step)(solver.init(players))
  d = reference_direction(name, losses, players, lr=lr, **kw)
  x0 = ravel_pytree(players)[0]
  np.testing.assert_allclose(ravel_pytree(state.players)[0], x0 - lr * d, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(info.losses, [L(players) for L in losses], rtol=1e-12)
  assert jax.tree.structure(state.players) == jax.tree.structure(players)


def test_gradient_play_matches_the_reference_and_alternates():
  losses, players = random_game(2)
  _, _, xi, *_ = dense(losses, players)
  solver = games.gradient_play(losses, optax.sgd(0.05))
  state, info = solver.step(solver.init(players))
  np.testing.assert_allclose(
    ravel_pytree(state.players)[0], ravel_pytree(players)[0] - 0.05 * xi, rtol=1e-12
  )
  np.testing.assert_allclose(info.grad_norms[1], abs(float(xi[3])), rtol=1e-12)
  # in turn: player 1's gradient is taken after player 0 has moved
  alt = games.gradient_play(losses, [optax.sgd(0.05)] * 3, alternating=True)
  state, _ = alt.step(alt.init(players))
  moved = (state.players[0], players[1], players[2])
  g1 = jax.grad(lambda p: losses[1]((moved[0], p, moved[2])))(players[1])
  np.testing.assert_allclose(state.players[1], players[1] - 0.05 * g1, rtol=1e-12)


def saddle(u, v):
  return jnp.sum(u**2) * 0.5 + u @ v - 0.3 * jnp.sum(v**2) + 0.1 * jnp.sum(jnp.sin(u * v))


@pytest.mark.parametrize("alternating", [False, True])
@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_zero_sum_gradient_play_steps_exactly_like_gda(alternating, opt):
  make = {"sgd": lambda: optax.sgd(0.1), "adam": lambda: optax.adam(0.05)}[opt]
  u, v = jnp.array([0.5, -1.0]), jnp.array([0.3, 0.8])
  gda = (minimax.alternating_gda if alternating else minimax.simultaneous_gda)(
    saddle, make(), make()
  )
  play = games.gradient_play(
    [lambda p: saddle(*p), lambda p: -saddle(*p)], [make(), make()], alternating=alternating
  )
  s1, _ = kbeam_jax.run(gda.step, gda.init(jax.random.key(0), u, v), 50)
  s2, info = kbeam_jax.run(play.step, play.init((u, v)), 50)
  # The same steps; the gradient of -f and the negated gradient of f may differ in the
  # last bit (XLA fuses the two programs differently), so compare to round-off in float64.
  np.testing.assert_allclose(s1.u, s2.players[0], rtol=1e-13, atol=1e-15)
  np.testing.assert_allclose(s1.v, s2.players[1], rtol=1e-13, atol=1e-15)
  assert info.losses.shape == (50, 2)


def quadratic_game(n, seed=3):
  """``L_i = ½θᵀQ_iθ + b_iᵀθ`` with player i owning coordinate i: Nash solves ``Mθ = -b``,
  ``M_i = (Q_i)_i``; built so that simultaneous gradient descent is stable at it."""
  rng = np.random.default_rng(seed)
  Qs, bs = [], []
  for i in range(n):
    Q = rng.normal(size=(n, n)) * 0.3
    Q = Q + Q.T
    Q[i, i] = 2.0 + i
    Qs.append(Q)
    bs.append(rng.normal(size=n))
  M = np.stack([Qs[i][i] for i in range(n)])
  nash = np.linalg.solve(M, -np.stack([bs[i][i] for i in range(n)]))
  losses = [
    (lambda p, Q=Q, b=b: 0.5 * jnp.stack(p) @ Q @ jnp.stack(p) + b @ jnp.stack(p))
    for Q, b in zip(Qs, bs, strict=True)
  ]
  return losses, nash


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize(
  "name", ["gradient_play", "consensus", "sga", "lookahead", "lola", "sos", "cgd"]
)
def test_quadratic_games_reach_their_nash_point(n, name):
  losses, nash = quadratic_game(n)
  make = {
    "gradient_play": lambda: games.gradient_play(losses, optax.sgd(0.1)),
    "consensus": lambda: games.consensus(losses, 0.1, gamma=0.1),
    "sga": lambda: games.sga(losses, 0.1),
    "lookahead": lambda: games.lookahead(losses, 0.1, 0.1),
    "lola": lambda: games.lola(losses, 0.1, 0.1),
    "sos": lambda: games.sos(losses, 0.1, 0.1),
    "cgd": lambda: games.cgd(losses, 0.1),
  }[name]
  solver = make()
  state, info = jax.jit(lambda s: kbeam_jax.run(solver.step, s, 600))(
    solver.init(tuple(jnp.array(1.0) for _ in range(n)))
  )
  if name == "lola":  # LOLA's shaping moves its fixed points away from Nash (Letcher et al.)
    assert float(info.grad_norms[-1].max()) < 0.5
    return
  np.testing.assert_allclose(jnp.stack(state.players), nash, atol=1e-6)


def matching_pennies():
  M = jnp.array([[1.0, -1.0], [-1.0, 1.0]])

  def L0(p):
    x = jnp.stack([jax.nn.sigmoid(p[0]), 1 - jax.nn.sigmoid(p[0])])
    y = jnp.stack([jax.nn.sigmoid(p[1]), 1 - jax.nn.sigmoid(p[1])])
    return x @ M @ y

  return [L0, lambda p: -L0(p)]


def test_matching_pennies():
  losses = matching_pennies()
  start = (jnp.array(1.0), jnp.array(-0.5))
  dist = lambda s: float(jnp.linalg.norm(jnp.stack(s.players)))
  for solver, converges in [
    (games.gradient_play(losses, optax.sgd(1.0)), False),
    (games.sga(losses, 1.0), True),
    (games.consensus(losses, 1.0, gamma=1.0), True),
    (games.sos(losses, 1.0, 1.0), True),
  ]:
    state, _ = jax.jit(lambda s, solver=solver: kbeam_jax.run(solver.step, s, 1000))(
      solver.init(start)
    )
    assert (dist(state) < 1e-3) == converges, (solver, dist(state))


def test_jit_vmap_and_dtypes():
  losses, _ = quadratic_game(2)
  solver = games.sga(losses, 0.1)
  starts = (jnp.linspace(-1.0, 1.0, 5), jnp.linspace(1.0, -1.0, 5))
  run = jax.jit(jax.vmap(lambda a, b: kbeam_jax.run(solver.step, solver.init((a, b)), 300)[0]))
  out = run(*starts)
  assert out.players[0].shape == (5,)
  for dtype in (jnp.float32, jnp.bfloat16, jnp.float64):
    state, info = jax.jit(solver.step)(solver.init((jnp.array(1.0, dtype), jnp.array(1.0, dtype))))
    assert all(p.dtype == dtype for p in state.players)
    assert bool(jnp.all(jnp.isfinite(info.losses)))


def stackelberg_game():
  """General sum: the follower plays v*(u) = u/2; the leader's Stackelberg point, where it
  accounts for that, differs from Nash, and its loss there is lower."""
  L0 = lambda p: 0.5 * (p[0] - 1.0) ** 2 + p[0] * p[1]
  L1 = lambda p: (p[1] - 0.5 * p[0]) ** 2
  # Nash: ∂_u L0 = u - 1 + v = 0, v = u/2 -> u = 2/3. Stackelberg: L0(u, u/2) =
  # ½(u - 1)² + u²/2, minimized at u = 1/2.
  return L0, L1, 2 / 3, 0.5


@pytest.mark.parametrize(
  "method", [bilevel.CG(5), bilevel.RMD(), bilevel.Neumann(50)], ids=["cg", "rmd", "neumann"]
)
def test_stackelberg_leader_reaches_its_point(method):
  L0, L1, nash, leader = stackelberg_game()
  solver = games.stackelberg(L0, L1, optax.sgd(0.2), method, inner_steps=30, inner_lr=0.25)
  state, info = jax.jit(lambda s: kbeam_jax.run(solver.step, s, 300))(
    solver.init((jnp.array(0.0), jnp.array(0.0)))
  )
  u, v = state.players
  np.testing.assert_allclose(u, leader, atol=1e-6)
  np.testing.assert_allclose(v, 0.5 * leader, atol=1e-6)
  assert float(L0((u, v))) < float(L0((jnp.array(nash), jnp.array(nash / 2))))
  assert info.losses.shape == (300, 2) and not bool(info.status.diverging.any())


def test_bad_input():
  losses, _ = quadratic_game(2)
  with pytest.raises(TypeError, match="losses must be a sequence of N >= 1 functions"):
    games.sga(losses[0], 0.1)
  with pytest.raises(TypeError, match=r"losses\[1\] must be a function"):
    games.sga([losses[0], 3.0], 0.1)
  solver = games.sga(losses, 0.1)
  with pytest.raises(ValueError, match="players must be a tuple of 2 pytrees"):
    solver.init((jnp.array(1.0),))
  with pytest.raises(TypeError, match=r"players\[1\] must hold floating-point arrays"):
    solver.init((jnp.array(1.0), jnp.array(1)))
  bad = games.consensus([lambda p: jnp.stack(p), losses[1]], 0.1, gamma=1.0)
  with pytest.raises(ValueError, match=r"losses\[0\]\(players\) must return a scalar"):
    bad.step(bad.init((jnp.array(1.0), jnp.array(1.0))))
  with pytest.raises(TypeError, match="call it to build|must be an optax.GradientTransformation"):
    games.gradient_play(losses, [optax.sgd, optax.sgd])
  with pytest.raises(ValueError, match="a must be in"):
    games.sos(losses, 0.1, 0.1, a=1.5)
  with pytest.raises(ValueError, match="gamma must be a number >= 0"):
    games.consensus(losses, 0.1, gamma=-1.0)


def test_the_benchmark_reports_what_it_measured():
  from benchmarks import games as suite

  tr = np.array([[1.0, 1.0, 1.0], [0.5, 1e-4, 1.0], [1e-4, 1e-5, 2.0]])  # (steps, runs)
  out = suite.summarize(tr, 1e-3)
  assert out["share"] == 2 / 3 and out["final_median"] == 1e-4 and out["steps_needed"] == 2.5
  case = suite.tandem()._replace(steps=60)
  trajectory, seconds = suite.run_case(case, case.solvers["lola"], 8, 0, 1)
  assert trajectory.shape == (60, 8) and seconds > 0
  np.testing.assert_allclose(trajectory[-1], 1 / 3, atol=1e-4)  # LOLA's arrogant point
