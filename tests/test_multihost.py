"""Several hosts on one machine: two processes joined by ``jax.distributed`` on 127.0.0.1
(JAX's gloo collectives on the CPU, 4 virtual devices each) run ``parallel.kbeam`` with its
8 beams over all 8 devices and a hypergradient whose batch is split over them, each
process handing in only its own rows; the numbers must be those of one process with 8
virtual devices, and the same in both processes.

The processes (``_multihost_worker.py``) and the one-process reference run side by side;
each has a deadline (``jax.distributed.initialize(initialization_timeout=...)`` inside,
and a kill from here), so a hang fails the test instead of blocking it.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).parent
PROCESSES, LOCAL_DEVICES, DEADLINE_S = 2, 4, 180


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(out: Path, devices: int, *distributed: str) -> subprocess.Popen:
  env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}  # gRPC honours them
  env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), str(HERE), env.get("PYTHONPATH", "")])
  with open(out.with_suffix(".log"), "w") as log:
    return subprocess.Popen(
      [sys.executable, str(HERE / "_multihost_worker.py"), str(out), *distributed],
      env=env,
      stdout=log,
      stderr=subprocess.STDOUT,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The JSON of each process (by process id) and of the one-process reference."""
  folder = tmp_path_factory.mktemp("multihost")
  coordinator = f"127.0.0.1:{free_port()}"
  outs = [folder / f"process{i}.json" for i in range(PROCESSES)] + [folder / "reference.json"]
  procs = [
    launch(outs[i], LOCAL_DEVICES, coordinator, str(PROCESSES), str(i)) for i in range(PROCESSES)
  ]
  procs.append(launch(outs[-1], PROCESSES * LOCAL_DEVICES))
  deadline = time.monotonic() + DEADLINE_S
  try:
    # A process that fails leaves the other waiting on a collective: stop at the first.
    while any(p.poll() is None for p in procs) and all(p.poll() in (None, 0) for p in procs):
      assert time.monotonic() < deadline, f"the multi-host run did not finish in {DEADLINE_S} s"
      time.sleep(0.2)
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
      proc.wait()
  failed = [
    f"{out.stem} (exit {proc.returncode}):\n{out.with_suffix('.log').read_text()[-2000:]}"
    for proc, out in zip(procs, outs, strict=True)
    if proc.returncode != 0
  ]
  assert not failed, "\n".join(failed)
  return [json.loads(out.read_text()) for out in outs]


def assert_close(a, b, tol):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


def test_the_processes_see_every_device(runs):
  *processes, reference = runs
  for i, run in enumerate(processes):
    assert (run["process_index"], run["process_count"]) == (i, PROCESSES)
    assert (run["devices"], run["local_devices"]) == (8, LOCAL_DEVICES)
  assert (reference["process_count"], reference["devices"]) == (1, 8)


def test_both_processes_hold_the_same_numbers(runs):
  first, second, _ = runs
  for part in ("kbeam", "hypergradient"):
    assert first[part] == second[part]


def test_kbeam_with_its_beams_over_both_processes(runs):
  *processes, reference = runs
  ref = reference["kbeam"]
  assert len(set(np.ravel(ref["values"][-1]).tolist())) == 8  # eight different beams
  for run in processes:
    c = run["kbeam"]
    assert c["beam_spec"] == c["shard_spec"] == "P('beams',)"
    assert c["local_beam_shards"] == LOCAL_DEVICES  # each process holds 4 of the 8 beams
    for name in ("u", "beams", "values", "shard_beams"):
      assert_close(c[name], ref[name], 1e-5)
    assert c["best"] == ref["best"]


def test_hypergradient_with_the_batch_over_both_processes(runs):
  *processes, reference = runs
  ref = reference["hypergradient"]
  assert np.linalg.norm(ref["grad"]) > 1e-3  # a hypergradient worth comparing
  for run in processes:
    c = run["hypergradient"]
    assert c["batch_spec"] == "P('data',)"
    assert c["local_rows"] == 64 // PROCESSES  # each process holds only its own rows
    # gathered back, the local pieces and shard_batch's placement are the batch itself
    assert c["local_batch_diff"] == c["shard_batch_diff"] == 0.0
    assert_close(c["grad"], ref["grad"], 1e-5)
    assert_close(c["v"], ref["v"], 1e-5)
