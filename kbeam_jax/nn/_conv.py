"""A 2D convolution written as shifted slices and one contraction, for training on the CPU.

XLA's CPU convolution is fast in a jitted step but an order of magnitude slower inside
``lax.scan`` (measured on jax 0.10: 1.17 s against 48 ms per gradient step of the domain
adaptation network at batch 128); the contraction below runs at full speed in both.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def conv2d(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None, *, stride: int = 1):
  """``VALID`` convolution of NHWC ``x`` with an HWIO ``kernel`` (``lax.conv`` semantics).

  Pad ``x`` first for ``SAME``-style output sizes.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from kbeam_jax import nn
    >>> x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    >>> k = jax.random.normal(jax.random.key(1), (3, 3, 3, 4))
    >>> ref = jax.lax.conv_general_dilated(x, k, (1, 1), "VALID",
    ...                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))
    >>> bool(jnp.allclose(nn.conv2d(x, k), ref, atol=1e-5))
    True
  """
  if x.ndim != 4 or kernel.ndim != 4 or x.shape[-1] != kernel.shape[2]:
    raise ValueError(
      f"conv2d needs x (N, H, W, C) and kernel (kh, kw, C, out); got {x.shape} and {kernel.shape}."
    )
  kh, kw = kernel.shape[:2]
  h = (x.shape[1] - kh) // stride + 1
  w = (x.shape[2] - kw) // stride + 1
  patches = jnp.stack(
    [
      x[:, i : i + stride * (h - 1) + 1 : stride, j : j + stride * (w - 1) + 1 : stride, :]
      for i in range(kh)
      for j in range(kw)
    ],
    axis=3,
  )  # (N, h, w, kh·kw, C)
  y = jnp.einsum("nhwkc,kco->nhwo", patches, kernel.reshape(kh * kw, *kernel.shape[2:]))
  return y if bias is None else y + bias[None, None, None, :]


def max_pool2(x: jax.Array) -> jax.Array:
  """2×2 max-pool with stride 2 of NHWC ``x`` (odd trailing rows and columns dropped)."""
  n, h, w, c = x.shape
  x = x[:, : h - h % 2, : w - w % 2, :]
  return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class Conv(nnx.Module):
  """``nnx.Conv`` with ``VALID`` padding (same parameters and initialization), computed
  by ``conv2d``: the drop-in to use inside ``lax.scan`` on the CPU.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from kbeam_jax import nn
    >>> conv = nn.Conv(3, 8, (5, 5), rngs=nnx.Rngs(0))
    >>> conv(jnp.ones((2, 28, 28, 3))).shape
    (2, 24, 24, 8)
  """

  def __init__(self, in_features: int, out_features: int, kernel_size, *, rngs: nnx.Rngs):
    reference = nnx.Conv(in_features, out_features, kernel_size, padding="VALID", rngs=rngs)
    self.kernel = reference.kernel
    self.bias = reference.bias

  def __call__(self, x: jax.Array) -> jax.Array:
    return conv2d(x, self.kernel[...], self.bias[...])
