"""Run by ``test_parallel.py`` in a subprocess with 8 virtual CPU devices; prints JSON.

Every check runs the same computation twice in this process: with its state and batch
laid out on a mesh of the 8 devices, and unsharded (on one device); it reports the
largest difference, the shardings the sharded state kept, and the collectives of the
compiled sharded step (op, element count), read from ``compile().as_text()``.
"""

from __future__ import annotations

import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import kbeam_jax
from kbeam_jax import bilevel, minimax, nn, parallel

K, HIDDEN, BATCH = 8, 32, 64
COLLECTIVE = re.compile(
  r"=\s*(\([^)]*\)|\S+)\s+(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)"
  r"(?:-start)?\("
)
SHAPE = re.compile(r"[a-z]+\d*\[([\d,]*)\]")


def collectives(hlo: str) -> list[tuple[str, int]]:
  """``(op, elements)`` of every collective in an HLO text (a tuple's shapes summed)."""
  out = []
  for result, op in COLLECTIVE.findall(hlo):
    elements = 0
    for dims in SHAPE.findall(result):
      elements += int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
    out.append((op, elements))
  return out


class Critic(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(2, HIDDEN, rngs=rngs)
    self.l2 = nnx.Linear(HIDDEN, HIDDEN, rngs=rngs)
    self.out = nnx.Linear(HIDDEN, 1, rngs=rngs)

  def __call__(self, x):
    return self.out(jnp.tanh(self.l2(jnp.tanh(self.l1(x)))))[..., 0]


GRAPHDEF, BEAMS = nn.stack_modules(Critic, jax.random.key(0), K)


def game(u, v, x):
  """A small GAN: the leader maps the data through ``tanh(x W + b)``; critics score both."""
  critic = nnx.merge(GRAPHDEF, v)
  fake = jnp.tanh(x @ u["w"] + u["b"])
  decay = 0.01 * sum(jnp.sum(p**2) for p in jax.tree.leaves(v))
  return jnp.mean(critic(x)) - jnp.mean(critic(fake)) - decay


def leader():
  return {"w": jnp.array([[0.8, -0.3], [0.2, 0.5]]), "b": jnp.array([0.1, -0.2])}


DATA = jax.random.normal(jax.random.key(1), (BATCH, 2))


def max_diff(a, b) -> float:
  return max(
    float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )


def specs(tree) -> list[str]:
  return sorted({str(x.sharding.spec) for x in jax.tree.leaves(tree)})


BEST = minimax.Best()


def solver_check(mesh_shape: dict[str, int], rule: minimax.Rule = BEST, steps: int = 5) -> dict:
  kwargs = dict(rule=rule)
  opts = (optax.adam(0.01), optax.adam(0.02))
  mesh = parallel.make_mesh(**mesh_shape)
  sharded = parallel.kbeam(game, *opts, mesh=mesh, **kwargs)
  plain = minimax.kbeam(game, *opts, **kwargs)
  run = lambda solver: jax.jit(lambda s, x: kbeam_jax.run(solver.step, s, steps, x))
  state = sharded.init(jax.random.key(2), leader(), BEAMS, K)
  x = parallel.shard_batch(DATA, mesh) if mesh_shape.get("data", 1) > 1 else DATA
  out, info = run(sharded)(state, x)
  ref, ref_info = run(plain)(plain.init(jax.random.key(2), leader(), BEAMS, K), DATA)
  compiled = jax.jit(sharded.step).lower(state, x).compile()
  hlo = compiled.as_text()
  # One program serves every step: a compiled executable refuses inputs whose shardings
  # differ from those it was compiled for, so the states it returns must keep the layout.
  again, steps_on_one_program = state, 0
  for _ in range(3):
    again, _ = compiled(again, x)
    steps_on_one_program += 1
  return {
    "steps_on_one_program": steps_on_one_program,
    "max_diff": max_diff((out.u, out.beams), (ref.u, ref.beams)),
    "max_diff_values": max_diff(info.values, ref_info.values),
    "beam_specs": specs((out.beams, out.follower_state, out.active)),
    "u_specs": specs(out.u),
    "collectives": collectives(hlo),
    "u_size": sum(x.size for x in jax.tree.leaves(leader())),
    "beam_size": sum(x.size for x in jax.tree.leaves(BEAMS)) // K,
  }


def trials_check() -> dict:
  """Two trials on ``trials``, their beams on ``beams`` (4 each), vmapped."""
  mesh = parallel.make_mesh(trials=2, beams=4)
  opts = (optax.sgd(0.05), optax.sgd(0.05))
  sharded = parallel.kbeam(game, *opts, mesh=mesh)
  plain = minimax.kbeam(game, *opts)

  def run(solver):
    def one(key):
      leaves, treedef = jax.tree.flatten(BEAMS)
      keys = jax.random.split(key, len(leaves))
      noisy = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
      beams = jax.tree.unflatten(treedef, noisy)
      return kbeam_jax.run(solver.step, solver.init(key, leader(), beams, K), 4, DATA)[0]

    return jax.jit(jax.vmap(one, spmd_axis_name="trials"))

  keys = jax.random.split(jax.random.key(3), 2)
  keys = jax.device_put(keys, NamedSharding(mesh, P("trials")))
  out, ref = run(sharded)(keys), run(plain)(keys)
  return {
    "max_diff": max_diff((out.u, out.beams), (ref.u, ref.beams)),
    "beam_specs": specs(out.beams),
  }


class Leader(nnx.Module):
  def __init__(self, rngs):
    self.linear = nnx.Linear(2, 2, rngs=rngs)

  def __call__(self, x):
    return jnp.tanh(self.linear(x))


def nnx_check(steps: int = 4) -> dict:
  """``kbeam_sgd`` inside ``nnx.Optimizer``: its beams on ``beams``, a jitted NNX loop."""
  mesh = parallel.make_mesh(beams=8)

  def minimax_fn(params, v, graphdef):
    fake = nnx.merge(graphdef, params)(DATA)
    critic = nnx.merge(GRAPHDEF, v)
    return jnp.mean(critic(DATA)) - jnp.mean(critic(fake))

  def train(sharded: bool):
    model = Leader(nnx.Rngs(0))
    tx = minimax.kbeam_sgd(0.05, optax.adam(0.02), BEAMS, sharded_beams=sharded)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    if sharded:
      nnx.update(optimizer, parallel.shard(nnx.state(optimizer), mesh))

    @nnx.jit
    def step(model, optimizer):
      graphdef = nnx.graphdef(model)
      grads = nnx.grad(lambda m: jnp.mean(m(DATA)))(model)  # ignored by K-beam
      optimizer.update(model, grads, minimax_fn=lambda p, v: minimax_fn(p, v, graphdef))

    for _ in range(steps):
      step(model, optimizer)
    return model, optimizer

  m1, o1 = train(True)
  m0, o0 = train(False)
  beams = lambda o: nnx.state(o)["opt_state"][0]["beams"]
  return {
    "max_diff": max_diff(nnx.state(m1, nnx.Param), nnx.state(m0, nnx.Param)),
    "max_diff_beams": max_diff(beams(o1), beams(o0)),
    "beam_specs": specs(beams(o1)),
  }


def ridge_problem():
  """A ridge regression with per-feature L2 coefficients ``exp(u)``, judged on validation
  data: ``(g, f, batch)``, the batch (``BATCH`` rows) the same wherever it is drawn."""
  kx, kv, kw, kn = jax.random.split(jax.random.key(3), 4)
  w = jax.random.normal(kw, (6,))
  x_train, x_val = jax.random.normal(kx, (BATCH, 6)), jax.random.normal(kv, (BATCH, 6))
  noise = 0.3 * jax.random.normal(kn, (2, BATCH))
  batch = (x_train, x_train @ w + noise[0], x_val, x_val @ w + noise[1])

  def g(u, v, xt, yt, xv, yv):
    return jnp.mean((xt @ v - yt) ** 2) + jnp.sum(jnp.exp(u) * v**2)

  def f(u, v, xt, yt, xv, yv):
    return jnp.mean((xv @ v - yv) ** 2)

  return g, f, batch


def bilevel_check(method_name: str, steps: int = 40) -> dict:
  """A hypergradient with a data-parallel batch: per-feature L2 coefficients ``exp(u)`` of
  a ridge regression (lower level, training batch) judged on a validation batch (upper
  level); both batches split over the 8 devices along ``data``, ``u`` and ``v`` replicated."""
  method = {"CG": bilevel.CG(20), "RMD": bilevel.RMD(), "FMD": bilevel.FMD()}[method_name]
  mesh = parallel.make_mesh(data=8)
  g, f, batch = ridge_problem()

  def hypergradient(u, v0, *batch):
    out = bilevel.hypergradient(f, g, u, v0, *batch, method=method, inner_steps=steps, inner_lr=0.1)
    return out.grad, out.v

  u, v0 = jnp.full((6,), -1.0), jnp.zeros(6)
  step = jax.jit(hypergradient)
  sharded = parallel.shard_batch(batch, mesh)
  grad1, v1 = step(u, v0, *sharded)
  grad0, v0_ = step(u, v0, *batch)
  hlo = step.lower(u, v0, *sharded).compile().as_text()
  return {
    "max_diff": max_diff((grad1, v1), (grad0, v0_)),
    "grad_norm": float(jnp.linalg.norm(grad0)),
    "batch_specs": specs(sharded),
    "collectives": collectives(hlo),
    "batch_size": int(batch[0].size),
  }


def error_check() -> dict:
  """Meshes and sizes that do not fit: the messages."""
  messages = {}
  solver = parallel.kbeam(game, optax.sgd(0.1), optax.sgd(0.1), mesh=parallel.make_mesh(beams=3))
  for name, call in {
    "k_not_divisible": lambda: solver.init(jax.random.key(0), leader(), BEAMS, K),
    "batch_not_divisible": lambda: parallel.shard_batch(DATA[:63], parallel.make_mesh(data=2)),
  }.items():
    try:
      call()
      messages[name] = None
    except ValueError as e:
      messages[name] = str(e)
  return messages


def main() -> None:
  assert len(jax.devices()) == 8, jax.devices()
  out = {
    "best_beams8": solver_check({"beams": 8}),
    "best_beams4_data2": solver_check({"beams": 4, "data": 2}),
    "min_norm_beams8": solver_check({"beams": 8}, rule=minimax.MinNorm(0.05)),
    "trials2_beams4": trials_check(),
    "nnx_beams8": nnx_check(),
    "errors": error_check(),
    **{f"bilevel_{m}_data8": bilevel_check(m) for m in ("CG", "RMD", "FMD")},
  }
  json.dump(out, sys.stdout)


if __name__ == "__main__":
  main()
