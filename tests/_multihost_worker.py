"""Run by ``test_multihost.py``: one process of a ``jax.distributed`` run on 127.0.0.1, or
the one-process reference; writes JSON to the file named first.

``python _multihost_worker.py OUT [COORDINATOR NUM_PROCESSES PROCESS_ID]``: with the last
three, this process joins the others (JAX's gloo collectives on the CPU) and the meshes
span every process's devices; without them the same computations run on this process's
devices alone. Either way the outputs are gathered (``process_allgather``) to their global
values, so that every process and the reference can be compared number by number.
"""

from __future__ import annotations

import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

import kbeam_jax
from kbeam_jax import bilevel, minimax, parallel

K, BATCH, STEPS = 8, 64, 5
X = np.random.default_rng(1).standard_normal((16, 3)).astype(np.float32)  # no JAX call yet


def game(u, v):
  """A small smooth game: the leader ``u`` (3 x 2) against a follower ``v`` (2,)."""
  return jnp.mean(jnp.tanh(X @ u) @ v) - 0.5 * jnp.sum(v**2) + 0.1 * jnp.sum(u**2)


def follower_init(key):
  return jax.random.normal(key, (2,))


def gather(tree):
  """Every leaf's global value as a NumPy array (the same call in every process)."""
  return multihost_utils.process_allgather(tree, tiled=True)


def kbeam_check() -> dict:
  """``parallel.kbeam`` with its K = 8 beams over the 8 devices of every process."""
  mesh = parallel.make_mesh(beams=K)
  opts = optax.adam(0.05), optax.sgd(0.1)
  solver = parallel.kbeam(game, *opts, mesh=mesh)
  state = solver.init(jax.random.key(2), jnp.ones((3, 2)), follower_init, K)
  out, info = jax.jit(lambda s: kbeam_jax.run(solver.step, s, STEPS))(state)
  # parallel.shard places a state built on the host (every process builds the same)
  plain = minimax.kbeam(game, *opts)
  placed = parallel.shard(plain.init(jax.random.key(2), jnp.ones((3, 2)), follower_init, K), mesh)
  return {
    "u": gather(out.u),
    "beams": gather(out.beams),
    "values": gather(info.values),
    "best": gather(info.best),
    "beam_spec": str(out.beams.sharding.spec),
    "local_beam_shards": len(out.beams.addressable_shards),
    "shard_beams": gather(placed.beams),
    "shard_spec": str(placed.beams.sharding.spec),
  }


def hypergradient_check() -> dict:
  """A CG hypergradient, its batch split over the ``data`` axis of every process's devices;
  each process hands in only its own rows (``make_array_from_process_local_data``)."""
  # imported only now: _parallel_checks touches the backend, after jax.distributed.initialize
  from _parallel_checks import ridge_problem  # tests/ is on PYTHONPATH

  g, f, batch = ridge_problem()
  mesh = parallel.make_mesh(data=len(jax.devices()))
  rows = BATCH // jax.process_count()
  mine = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)
  sharding = parallel.batch_sharding(mesh)
  local = jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)[mine]), batch
  )

  @jax.jit
  def hypergradient(u, v0, *batch):
    out = bilevel.hypergradient(
      f, g, u, v0, *batch, method=bilevel.CG(20), inner_steps=40, inner_lr=0.1
    )
    return out.grad, out.v

  grad, v = hypergradient(jnp.full((6,), -1.0), jnp.zeros(6), *local)
  # The batch as a whole, placed by parallel.shard_batch (every process passing all of it),
  # and the rows of the local pieces: both must be the batch itself.
  whole = parallel.shard_batch(batch, mesh)
  return {
    "grad": gather(grad),
    "v": gather(v),
    "batch_spec": str(local[0].sharding.spec),
    "local_rows": int(sum(s.data.shape[0] for s in local[0].addressable_shards)),
    "local_batch_diff": max_diff(gather(local), batch),
    "shard_batch_diff": max_diff(gather(whole), batch),
  }


def max_diff(a, b) -> float:
  return max(
    float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )


def main() -> None:
  if len(sys.argv) > 2:  # before any other JAX call
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
      sys.argv[2],
      num_processes=int(sys.argv[3]),
      process_id=int(sys.argv[4]),
      initialization_timeout=30,
      heartbeat_timeout_seconds=30,
      shutdown_timeout_seconds=30,
    )
  start = time.perf_counter()
  out = {
    "process_index": jax.process_index(),
    "process_count": jax.process_count(),
    "devices": len(jax.devices()),
    "local_devices": len(jax.local_devices()),
    "kbeam": kbeam_check(),
    "hypergradient": hypergradient_check(),
  }
  out["seconds"] = time.perf_counter() - start
  with open(sys.argv[1], "w") as file:
    json.dump(out, file, default=lambda x: np.asarray(x).tolist())


if __name__ == "__main__":
  main()
