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


class CompileCounter:
  """Counts XLA compilations (``jax.monitoring``'s backend-compile events) since ``reset``."""

  def __init__(self):
    self.count = 0

  def __call__(self, event, duration, **kwargs):
    del duration, kwargs
    if event == "/jax/core/compile/backend_compile_duration":
      self.count += 1

  def reset(self):
    self.count = 0


@pytest.fixture
def compile_counter():
  """A ``CompileCounter`` listening for the duration of one test."""
  counter = CompileCounter()
  jax.monitoring.register_event_duration_secs_listener(counter)
  yield counter
  jax.monitoring.unregister_event_duration_listener(counter)


@pytest.fixture(autouse=True)
def no_persistent_compile_cache():
  """Fails a test that leaves JAX's persistent compilation cache switched on.

  The cache outlives the session, and writing some executables to it crashed the process
  (a segmentation fault in ``put_executable_and_time``) later in the run.
  """
  yield
  folder = jax.config.jax_compilation_cache_dir
  if folder:
    jax.config.update("jax_compilation_cache_dir", None)
    pytest.fail(f"the test switched the persistent compilation cache on ({folder})")


@pytest.fixture(autouse=True, scope="module")
def fresh_compilation_caches():
  """Drops JAX's in-memory compiled programs after every test module.

  One process compiling the whole suite's programs crashed inside XLA's CPU compiler (a
  segmentation fault, then an abort, in ``backend_compile_and_load``, twice at the same
  test of ``test_multilevel.py``), while each half of the suite passed on its own.
  """
  yield
  jax.clear_caches()
