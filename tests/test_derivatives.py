"""Hessian-vector products against dense Hessians from ``jax.hessian`` (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from kbeam_jax import derivatives


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


def random_point(key):
  ks = jax.random.split(key, 6)
  u = {"a": jax.random.normal(ks[0], (3,)), "b": jax.random.normal(ks[1], (2, 2))}
  v = [jax.random.normal(ks[2], (4,)), {"c": jax.random.normal(ks[3], ())}]
  q_v = jax.tree.map(lambda x: jax.random.normal(ks[4], x.shape), v)
  q_u = jax.tree.map(lambda x: jax.random.normal(ks[5], x.shape), u)
  return u, v, q_u, q_v


def g(u, v, scale):
  """A non-quadratic coupling of every leaf of u with every leaf of v."""
  uf, _ = ravel_pytree(u)
  vf, _ = ravel_pytree(v)
  M = jnp.arange(uf.size * vf.size, dtype=uf.dtype).reshape(uf.size, vf.size) / 10.0
  return (
    scale * jnp.sin(uf) @ M @ jnp.tanh(vf) + jnp.sum(vf**4) / 4 + jnp.sum(uf**2) * jnp.sum(vf**2)
  )


def dense_blocks(u, v, scale):
  uf, unravel_u = ravel_pytree(u)
  vf, unravel_v = ravel_pytree(v)
  joint = lambda x: g(unravel_u(x[: uf.size]), unravel_v(x[uf.size :]), scale)
  H = jax.hessian(joint)(jnp.concatenate([uf, vf]))
  n = uf.size
  return H[:n, :n], H[:n, n:], H[n:, n:]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_products_match_dense_hessian(seed):
  u, v, q_u, q_v = random_point(jax.random.key(seed))
  Huu, Huv, Hvv = dense_blocks(u, v, 0.7)
  flat = lambda t: ravel_pytree(t)[0]
  qu, qv = flat(q_u), flat(q_v)

  np.testing.assert_allclose(flat(derivatives.hvp_vv(g, u, v, q_v, 0.7)), Hvv @ qv, rtol=1e-10)
  np.testing.assert_allclose(flat(derivatives.hvp_uv(g, u, v, q_v, 0.7)), Huv @ qv, rtol=1e-10)
  grad_v, tangent = derivatives.jvp_grad_v(g, u, v, q_u, q_v, 0.7)
  np.testing.assert_allclose(flat(tangent), Huv.T @ qu + Hvv @ qv, rtol=1e-10)
  np.testing.assert_allclose(flat(grad_v), flat(jax.grad(g, argnums=1)(u, v, 0.7)), rtol=1e-12)
  mixed, vv = derivatives.hvp_joint(g, u, v, q_v, 0.7)
  np.testing.assert_allclose(flat(mixed), Huv @ qv, rtol=1e-10)
  np.testing.assert_allclose(flat(vv), Hvv @ qv, rtol=1e-10)

  f = lambda x, s: g(x, v, s)
  np.testing.assert_allclose(flat(derivatives.hvp(f, u, q_u, 0.7)), Huu @ qu, rtol=1e-10)


def test_products_keep_structure_and_dtype():
  u, v, _, q_v = random_point(jax.random.key(3))
  out = derivatives.hvp_uv(g, u, v, q_v, 1.0)
  assert jax.tree.structure(out) == jax.tree.structure(u)
  assert all(x.dtype == jnp.float64 for x in jax.tree.leaves(out))


def test_mismatched_direction_is_a_clear_error():
  u, v, q_u, _ = random_point(jax.random.key(4))
  with pytest.raises(ValueError, match="v and q must have the same pytree structure"):
    derivatives.hvp_vv(g, u, v, q_u, 1.0)


def test_non_scalar_function_is_a_clear_error():
  u, v, _, q_v = random_point(jax.random.key(5))
  with pytest.raises(ValueError, match="g must return a scalar"):
    derivatives.hvp_vv(lambda u, v: ravel_pytree(v)[0], u, v, q_v)


def test_linearized_and_mixed_products_against_dense_matrices():
  with jax.enable_x64(True):
    ks = jax.random.split(jax.random.key(3), 4)
    A = jax.random.normal(ks[0], (4, 4))
    A = A @ A.T
    B = jax.random.normal(ks[1], (3, 4))
    c = jax.random.normal(ks[2], (4,))
    g = lambda u, v, c: 0.5 * v @ A @ v + u @ B @ v + jnp.sum(jnp.sin(v)) * (c @ v)
    u, v, q = jnp.ones(3), jax.random.normal(ks[3], (4,)), jnp.arange(4.0)
    H = jax.hessian(g, argnums=1)(u, v, c)
    grad, hvp = derivatives.grad_and_hvp_vv(g, u, v, c)
    np.testing.assert_allclose(grad, jax.grad(g, argnums=1)(u, v, c), rtol=1e-12)
    np.testing.assert_allclose(hvp(q), H @ q, rtol=1e-12)
    np.testing.assert_allclose(derivatives.linearize_hvp_vv(g, u, v, c)(q), H @ q, rtol=1e-12)
    u_bar, (c_bar,) = derivatives.vjp_grad_v(g, u, v, q, c)
    J_u = jax.jacfwd(jax.grad(g, argnums=1), argnums=0)(u, v, c)  # (V, U)
    J_c = jax.jacfwd(jax.grad(g, argnums=1), argnums=2)(u, v, c)  # (V, V)
    np.testing.assert_allclose(u_bar, J_u.T @ q, rtol=1e-12)
    np.testing.assert_allclose(c_bar, J_c.T @ q, rtol=1e-12)
