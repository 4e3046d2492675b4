"""Sharded K-beam on 8 virtual CPU devices: the numbers of one device, the layout kept from
step to step, and only O(|u| + K) numbers exchanged per step (read from the compiled HLO).

The checks run in one subprocess (``_parallel_checks.py``), since the device count is
fixed when JAX starts.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import kbeam_jax
from kbeam_jax import parallel

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def checks():
  env = dict(os.environ)
  flags = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  env["XLA_FLAGS"] = flags.strip()
  env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), str(HERE), env.get("PYTHONPATH", "")])
  out = subprocess.run(
    [sys.executable, str(HERE / "_parallel_checks.py")],
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
    check=False,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout)


def total(collectives):
  return sum(n for _, n in collectives)


def test_best_rule_exchanges_only_values_and_the_leader_gradient(checks):
  c = checks["best_beams8"]
  assert c["max_diff"] < 1e-5 and c["max_diff_values"] < 1e-5
  assert c["beam_specs"] == ["P('beams',)"] and c["u_specs"] == ["P()"]
  K, u = 8, c["u_size"]
  assert c["collectives"], "beams on 8 devices must communicate"
  # Each collective carries the K values / indices, the leader's gradient or a scalar ...
  assert max(n for _, n in c["collectives"]) <= max(K, u)
  # ... in all O(|u| + K), never a beam's parameters (K x 1,185 numbers here).
  assert total(c["collectives"]) <= 3 * (u + K) < c["beam_size"]


def test_beams_and_data_axes(checks):
  c = checks["best_beams4_data2"]
  assert c["max_diff"] < 1e-5 and c["beam_specs"] == ["P('beams',)"]
  # The data axis all-reduces the local beams' gradients (2 beams per device, K / 4; the
  # critic's real and fake terms reduced apart: twice that); the beams are never
  # gathered: every collective larger than the values and the leader's gradient is such
  # an all-reduce, and no gather carries more than K numbers.
  small = max(8, c["u_size"])
  large = [(op, n) for op, n in c["collectives"] if n > small]
  assert large and all(op == "all-reduce" and n <= 2 * 2 * c["beam_size"] for op, n in large)
  assert all(n <= 8 for op, n in c["collectives"] if op == "all-gather")


@pytest.mark.parametrize("name", ["best_beams8", "best_beams4_data2", "min_norm_beams8"])
def test_one_compiled_step_serves_every_step(checks, name):
  # _parallel_checks feeds the compiled executable the states it returns; an executable
  # refuses arguments whose shardings differ from those it was compiled for
  assert checks[name]["steps_on_one_program"] == 3


def test_sizes_that_do_not_fit_the_mesh_are_named(checks):
  e = checks["errors"]
  assert "K (the number of beams) = 8 cannot be split over the 3 devices" in e["k_not_divisible"]
  assert "the batch size = 63 cannot be split over the 2 devices" in e["batch_not_divisible"]
  with pytest.raises(ValueError, match="mesh must be a jax.sharding.Mesh with the axes"):
    parallel.kbeam(lambda u, v: u * v, None, None, mesh="beams")


def test_min_norm_rule_exchanges_gradients_not_parameters(checks):
  c = checks["min_norm_beams8"]
  assert c["max_diff"] < 1e-5 and c["beam_specs"] == ["P('beams',)"]
  K, u = 8, c["u_size"]
  # The Gram matrix needs every beam's leader gradient: O(K |u| + K²), no beam parameters.
  assert total(c["collectives"]) <= 2 * (K * u + K * K + K + u) < c["beam_size"]


def test_trials_axis(checks):
  c = checks["trials2_beams4"]
  assert c["max_diff"] < 1e-5 and c["beam_specs"] == ["P('trials', 'beams')"]


def test_transform_in_an_nnx_loop(checks):
  c = checks["nnx_beams8"]
  assert c["max_diff"] < 1e-5 and c["max_diff_beams"] < 1e-5
  assert c["beam_specs"] == ["P('beams',)"]


@pytest.mark.parametrize("method", ["CG", "RMD", "FMD"])
def test_bilevel_hypergradient_with_a_data_parallel_batch(checks, method):
  c = checks[f"bilevel_{method}_data8"]
  assert c["grad_norm"] > 1e-3  # a hypergradient worth comparing
  assert c["max_diff"] < 1e-5 * max(1.0, c["grad_norm"])
  assert c["batch_specs"] == ["P('data',)"]
  # The devices add up partial sums over their batch shards (gradients, Hessian-vector
  # products: O(|u| + |v|) each); the batch itself is never gathered.
  assert c["collectives"] and {op for op, _ in c["collectives"]} == {"all-reduce"}
  assert max(n for _, n in c["collectives"]) < c["batch_size"]


def test_mesh_needs_enough_devices():
  with pytest.raises(ValueError, match="needs 64 devices"):
    parallel.make_mesh(beams=64)
  with pytest.raises(ValueError, match="beams .* must be an int >= 1"):
    parallel.make_mesh(beams=0)
  assert "parallel" in kbeam_jax.__all__


def test_beam_leaves_are_found_by_state_type_not_by_field_name():
  """A K-beam state's beams, follower states and mask split on ``beams``, inside any pytree
  and inside ``nnx.state`` of an optimizer; a user's own field called ``beams`` does not."""
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  from kbeam_jax import minimax

  mesh = parallel.make_mesh(beams=1)
  specs = lambda tree: {
    jax.tree_util.keystr(p): str(s.spec)
    for p, s in jax.tree_util.tree_leaves_with_path(parallel.state_sharding(tree, mesh))
  }
  solver = minimax.kbeam(lambda u, v: u * v, optax.sgd(0.1), optax.adam(0.1))
  state = solver.init(jax.random.key(0), jnp.ones(1), jnp.zeros((4, 1)), num_beams=4)
  got = specs({"run": state, "beams": jnp.ones(2), "active": jnp.ones(2)})
  assert got["['beams']"] == got["['active']"] == got["['run'].u"] == "P()"
  for field in ("beams", "active", "follower_state[0].mu"):
    assert got[f"['run'].{field}"] == "P('beams',)"
  model = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
  tx = minimax.kbeam_sgd(0.1, optax.adam(0.1), jnp.zeros((4, 2)))
  got = specs(nnx.state(nnx.Optimizer(model, tx, wrt=nnx.Param)))
  assert got["['opt_state'][0]['beams'].value"] == "P('beams',)"
  assert got["['opt_state'][0]['follower_state'][0]['nu'].value"] == "P('beams',)"
  assert got["['opt_state'][0]['values'].value"] == "P()"
