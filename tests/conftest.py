"""Test-wide JAX settings: rank promotion raises, so broadcasting bugs cannot hide."""

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(params=["float32", "float64"])
def dtype(request):
  """Runs a test once in float32 and once in float64 (with x64 enabled)."""
  if request.param == "float64":
    with jax.enable_x64(True):
      yield jax.numpy.float64
  else:
    yield jax.numpy.float32
