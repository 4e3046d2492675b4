"""Hessian-vector products on pytrees (forward-over-reverse and mixed vjp) and the largest
eigenvalue of such a product by power iteration."""

from kbeam_jax.derivatives._curvature import max_eigenvalue as max_eigenvalue
from kbeam_jax.derivatives._hvp import grad_and_hvp_vv as grad_and_hvp_vv
from kbeam_jax.derivatives._hvp import hvp as hvp
from kbeam_jax.derivatives._hvp import hvp_joint as hvp_joint
from kbeam_jax.derivatives._hvp import hvp_uv as hvp_uv
from kbeam_jax.derivatives._hvp import hvp_vv as hvp_vv
from kbeam_jax.derivatives._hvp import jvp_grad_v as jvp_grad_v
from kbeam_jax.derivatives._hvp import linearize_hvp_vv as linearize_hvp_vv
from kbeam_jax.derivatives._hvp import vjp_grad_v as vjp_grad_v

__all__ = [
  "grad_and_hvp_vv",
  "hvp",
  "hvp_joint",
  "hvp_uv",
  "hvp_vv",
  "jvp_grad_v",
  "linearize_hvp_vv",
  "max_eigenvalue",
  "vjp_grad_v",
]
