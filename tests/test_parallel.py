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
  # The data axis all-reduces the local beams' gradients; the beams are never gathered.
  assert max(n for _, n in c["collectives"]) < 8 * c["beam_size"]


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


def test_readme_example_runs():
  import re

  import numpy as np

  readme = (HERE.parent / "README.md").read_text()
  block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "make_mesh" in b)
  namespace = {}
  exec(compile(block, "README.md", "exec"), namespace)
  assert namespace["state"].beams.shape == (8, 2)
  assert np.all(np.isfinite(np.asarray(namespace["info"].values)))
