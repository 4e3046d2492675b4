"""Tiny synthetic digits and a plain lower solve, for the denoising and poisoning tasks."""

import jax
import numpy as np

from kbeam_jax import bilevel


def tiny_digits(n, seed, *, noise, lit=1.0):
  """Ten noisy prototype patterns as uint8 28×28 images, labels their prototype.

  ``noise``: the pixel noise's standard deviation; ``lit``: the fraction of each
  prototype's pixels that are on (the others stay 0, noise included).
  """
  rng = np.random.default_rng(seed)
  proto_rng = np.random.default_rng(123)
  prototypes = proto_rng.uniform(0, 255, (10, 784))
  on = proto_rng.uniform(size=(10, 784)) < lit
  prototypes = prototypes * on
  labels = np.arange(n) % 10
  images = (prototypes[labels] + rng.normal(0, noise, (n, 784))) * on[labels]
  return np.clip(images, 0, 255).astype(np.uint8).reshape(n, 28, 28), labels


def solve_lower(g, u, v, args, steps=1000, *, lr):
  """``steps`` steps of gradient descent of step ``lr`` on the lower problem (``Naive``)."""
  solve = lambda u, v: bilevel.argmin(
    g, u, v, *args, method=bilevel.Naive(), inner_steps=steps, inner_lr=lr
  )
  return jax.jit(solve)(u, v)
