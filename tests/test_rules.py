"""Direction rules and the simplex subproblems against weights computed by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _cases import RULE_NAMES, rules

from kbeam_jax import minimax
from kbeam_jax.minimax import _rules
from kbeam_jax.minimax._direction import direction


def linear_objective(zs, values):
  """``f(u, v_k) = values_k + <z_k, u>`` at ``u = 0``: gradients ``z_k``, values as given.

  The beam ``v_k`` is the one-hot vector e_k, so ``f(u, v) = Σ_k v_k (values_k + z_k·u)``.
  """
  zs, values = jnp.asarray(zs), jnp.asarray(values)
  f = lambda u, v: v @ (values + zs @ u)
  beams = jnp.eye(len(values))
  return f, jnp.zeros(zs.shape[1]), beams


def weights(name, zs, values, epsilon):
  """The direction of the rule ``name`` (at ``epsilon``) on the linear objective."""
  key = jax.random.key(0)
  f, u, beams = linear_objective(zs, values)
  active = jnp.ones(len(values), bool)
  rule = rules(epsilon)[name]
  return direction(f, rule, u, beams, active, jnp.asarray(epsilon), key, (), None)


def test_project_simplex_by_hand():
  mask = jnp.array([True, True, True])
  np.testing.assert_allclose(
    _rules.project_simplex(jnp.array([0.2, 0.3, 0.5]), mask), [0.2, 0.3, 0.5], atol=1e-7
  )
  # (2, 0, 0) -> (1, 0, 0); (1, 1, 0) -> (0.5, 0.5, 0); masked-out entries are zero.
  np.testing.assert_allclose(
    _rules.project_simplex(jnp.array([2.0, 0.0, 0.0]), mask), [1.0, 0.0, 0.0], atol=1e-7
  )
  np.testing.assert_allclose(
    _rules.project_simplex(jnp.array([1.0, 1.0, 0.0]), mask), [0.5, 0.5, 0.0], atol=1e-7
  )
  np.testing.assert_allclose(
    _rules.project_simplex(jnp.array([1.0, 5.0, 0.0]), jnp.array([True, False, True])),
    [1.0, 0.0, 0.0],
    atol=1e-7,
  )


# Two beams, z_1 = (1, 0), z_2 = (0, 1), f = (1.0, 0.9).
TWO_Z, TWO_F = [[1.0, 0.0], [0.0, 1.0]], [1.0, 0.9]


def test_best_two_beams():
  d = weights("best", TWO_Z, TWO_F, 0.0)
  np.testing.assert_allclose(d.weights, [1.0, 0.0])
  np.testing.assert_allclose(d.z, [1.0, 0.0])
  assert int(d.best) == 0 and int(d.eps_set_size) == 1
  np.testing.assert_allclose(d.certificate, 1.0)


def test_min_norm_two_beams():
  # R = {1, 2}; the min-norm point of the segment is (0.5, 0.5), |z| = sqrt(0.5).
  d = weights("min_norm", TWO_Z, TWO_F, 0.2)
  np.testing.assert_allclose(d.weights, [0.5, 0.5], atol=1e-6)
  np.testing.assert_allclose(d.z, [0.5, 0.5], atol=1e-6)
  np.testing.assert_allclose(d.certificate, np.sqrt(0.5), atol=1e-6)
  assert int(d.eps_set_size) == 2


def test_kiwiel_two_beams():
  # max_t -0.1 t - ((1 - t)^2 + t^2) / 2  ->  0.9 - 2t = 0, t = 0.45.
  d = weights("kiwiel", TWO_Z, TWO_F, 0.2)
  np.testing.assert_allclose(d.weights, [0.55, 0.45], atol=1e-6)


def test_small_epsilon_keeps_only_the_best_beam():
  for rule in ("random", "min_norm", "kiwiel"):
    d = weights(rule, TWO_Z, TWO_F, 0.05)
    np.testing.assert_allclose(d.weights, [1.0, 0.0], atol=1e-7)
    np.testing.assert_allclose(d.certificate, 1.0, atol=1e-6)
    assert int(d.eps_set_size) == 1


def test_random_weights_are_normalized_exponentials_on_the_set():
  key = jax.random.key(7)
  zs, values = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], [1.0, 0.95, 0.0]
  f, u, beams = linear_objective(zs, values)
  # direction() splits nothing: the rule key is used as given.
  rule = minimax.Random(0.1)
  d = direction(f, rule, u, beams, jnp.ones(3, bool), jnp.asarray(0.1), key, (), None)
  e = -np.log(np.asarray(jax.random.uniform(key, (3,), minval=np.finfo(np.float32).tiny)))
  expected = np.array([e[0], e[1], 0.0]) / (e[0] + e[1])
  np.testing.assert_allclose(d.weights, expected, rtol=1e-6)
  np.testing.assert_allclose(d.z, expected @ np.array(zs), rtol=1e-6)


def test_zero_in_hull_certificate_is_zero():
  # z = (1, 0), (-1, 1), (-1, -1): 0 = 0.5 z_1 + 0.25 z_2 + 0.25 z_3.
  zs, values = [[1.0, 0.0], [-1.0, 1.0], [-1.0, -1.0]], [0.0, 0.0, 0.0]
  d = weights("min_norm", zs, values, 0.0)
  np.testing.assert_allclose(d.weights, [0.5, 0.25, 0.25], atol=1e-5)
  np.testing.assert_allclose(d.certificate, 0.0, atol=1e-5)
  np.testing.assert_allclose(d.z, [0.0, 0.0], atol=1e-5)
  # With equal values Kiwiel's weights are the min-norm weights.
  np.testing.assert_allclose(
    weights("kiwiel", zs, values, 0.0).weights, [0.5, 0.25, 0.25], atol=1e-5
  )


def test_min_norm_three_beams_on_an_edge():
  # Hull of (2, 0), (0, 2), (2, 2): the nearest point to 0 is (1, 1), on the first edge.
  d = weights("min_norm", [[2.0, 0.0], [0.0, 2.0], [2.0, 2.0]], [0.0, 0.0, 0.0], 0.0)
  np.testing.assert_allclose(d.weights, [0.5, 0.5, 0.0], atol=1e-5)
  np.testing.assert_allclose(d.certificate, np.sqrt(2.0), atol=1e-5)


def test_kiwiel_three_beams_drops_a_far_beam():
  # f = (0, -0.1, -1): the third beam's gap outweighs its gradient; λ = (0.55, 0.45, 0).
  d = weights("kiwiel", [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], [0.0, -0.1, -1.0], 10.0)
  np.testing.assert_allclose(d.weights, [0.55, 0.45, 0.0], atol=1e-5)
  assert int(d.eps_set_size) == 3


@pytest.mark.parametrize("rule", RULE_NAMES)
def test_weights_are_convex_and_on_the_set(rule):
  zs = jax.random.normal(jax.random.key(1), (6, 4))
  values = jnp.array([1.0, 0.99, 0.5, 0.98, 0.0, 1.0])
  d = weights(rule, zs, values, 0.0 if rule == "best" else 0.05)
  w = np.asarray(d.weights)
  assert np.all(w >= 0) and np.isclose(w.sum(), 1.0, atol=1e-6)
  assert np.all(w[[2, 4]] == 0)


def brute_force_qp(G, b, mask):
  """``min ½λᵀGλ - bᵀλ`` on the simplex of ``mask`` in float64, by trying every support."""
  G, b = np.asarray(G, np.float64), np.asarray(b, np.float64)
  idx = np.flatnonzero(mask)
  best, best_lam = np.inf, None
  for bits in range(1, 2 ** len(idx)):
    S = idx[[(bits >> i) & 1 == 1 for i in range(len(idx))]]
    n = len(S)
    A = np.block([[G[np.ix_(S, S)], np.ones((n, 1))], [np.ones((1, n)), np.zeros((1, 1))]])
    sol = np.linalg.lstsq(A, np.concatenate([b[S], [1.0]]), rcond=None)[0][:n]
    if np.all(sol >= -1e-12):
      lam = np.zeros(len(b))
      lam[S] = np.maximum(sol, 0) / np.maximum(sol, 0).sum()
      value = 0.5 * lam @ G @ lam - b @ lam
      if value < best:
        best, best_lam = value, lam
  return best, best_lam


@pytest.mark.parametrize("seed", range(6))
def test_simplex_qp_is_exact(seed):
  """Against every support in float64, with a linear term (Kiwiel) and without (min-norm),
  duplicated and collinear gradients included."""
  rng = np.random.default_rng(seed)
  K, dim = 7, 1 + seed % 3
  Z = rng.normal(size=(K, dim))
  Z[3] = Z[1]  # a duplicate
  Z[5] = 0.5 * (Z[0] + Z[2])  # an affinely dependent point
  G = Z @ Z.T
  mask = rng.random(K) < 0.8
  mask[0] = True
  for b in (np.zeros(K), -np.abs(rng.normal(size=K))):
    lam = np.asarray(_rules.simplex_qp(jnp.asarray(G, jnp.float32), jnp.asarray(b), mask))
    assert np.all(lam >= 0) and np.isclose(lam.sum(), 1.0, atol=1e-6) and np.all(lam[~mask] == 0)
    best, _ = brute_force_qp(G, b, mask)
    assert 0.5 * lam @ G @ lam - b @ lam <= best + 1e-5


def test_simplex_qp_empty_mask_and_one_beam():
  G = jnp.eye(3)
  np.testing.assert_array_equal(_rules.simplex_qp(G, jnp.zeros(3), jnp.zeros(3, bool)), 0.0)
  np.testing.assert_array_equal(
    _rules.simplex_qp(G, jnp.zeros(3), jnp.array([False, True, False])), [0.0, 1.0, 0.0]
  )


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_rules_in_low_precision(dtype):
  """Gradients of norm ~1000 (a float16 Gram matrix would overflow at 65504): the weights
  and the certificate are those of float32."""
  zs = 1000.0 * jnp.array([[1.0, 0.2], [-0.8, 0.3], [0.1, -1.0]])
  values = jnp.array([1.0, 0.99, 0.98])
  for rule in ("min_norm", "kiwiel"):
    ref = weights(rule, zs, values, 0.1)
    f, u, beams = linear_objective(zs.astype(dtype), values.astype(dtype))
    u, beams = u.astype(dtype), beams.astype(dtype)
    value = rules(0.1)[rule]
    d = direction(f, value, u, beams, jnp.ones(3, bool), jnp.asarray(0.1), None, (), None)
    assert d.weights.dtype == dtype and d.certificate.dtype == dtype
    np.testing.assert_allclose(np.asarray(d.weights, np.float32), ref.weights, atol=2e-2)
    np.testing.assert_allclose(float(d.certificate), float(ref.certificate), rtol=2e-2, atol=5.0)


def test_simplex_qp_bad_input_is_named():
  G, b, mask = jnp.eye(3), jnp.zeros(3), jnp.ones(3, bool)
  with pytest.raises(ValueError, match=r"gram \(K, K\), linear \(K,\) and mask \(K,\)"):
    _rules.simplex_qp(jnp.ones((3, 2)), b, mask)
  with pytest.raises(ValueError, match=r"linear \(2,\)"):
    _rules.simplex_qp(G, jnp.zeros(2), mask)
  with pytest.raises(TypeError, match="mask must be boolean"):
    _rules.simplex_qp(G, b, jnp.ones(3))
  with pytest.raises(ValueError, match="max_steps must be >= 0"):
    _rules.simplex_qp(G, b, mask, max_steps=-1)
