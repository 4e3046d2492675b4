"""Several devices: the K beams, the data batch and the trials of a study as mesh axes.

JAX's own SPMD engine does the work: arrays carry a ``NamedSharding`` over a
``jax.sharding.Mesh`` with the axes ``("trials", "beams", "data")``, ``jax.jit``
partitions the K-beam step, and ``with_sharding_constraint`` keeps the layout from step
to step. The layout:

* ``beams``: the K beams, their follower optimizer states and the ``active`` mask are
  split along their leading (beam) axis; each device holds K/n beams and runs their
  ascent steps locally;
* ``data``: the batch is split along its leading axis (the objective must be a mean over
  the batch, so that XLA's partial sums add up to it);
* ``trials``: the trials of a study, vmapped with ``jax.vmap(..., spmd_axis_name="trials")``,
  are split along the trial axis; trials never communicate;
* everything else (the leader ``u`` and its optimizer state, keys, counters) is
  replicated.

What crosses devices in one K-beam step (rule ``best`` with ``sharded_beams=True``, which
``parallel.kbeam`` sets): the K values and best-beam indices (an all-gather of K numbers)
and the leader's gradient (an all-reduce of |u| numbers): O(|u| + K), never a beam's
parameters. The ε-rules need every beam's gradient for their Gram matrix (O(K·|u|)); the
``data`` axis adds the usual all-reduce of each beam's gradient over the batch shards.
``tests/test_parallel.py`` reads these collectives from the compiled program.

Several hosts: start the same program on every host and call
``jax.distributed.initialize`` before any other JAX call (coordinator address, process
count and id as arguments, or detected from SLURM, Open MPI or a TPU pod); ``jax.devices()``
then lists every host's devices and ``make_mesh`` spans them all. ``parallel.kbeam``'s
``init`` builds the state in one jitted program with the state's shardings as its
``out_shardings``, so each process fills only its own devices (every process passes the
same arguments), and ``shard`` the same for a state every process holds whole.
``shard_batch`` places a batch every process holds whole; a process hands in only its own
rows with ``jax.make_array_from_process_local_data``. Results split over the processes
come back whole with ``jax.experimental.multihost_utils.process_allgather``::

  # each of 2 processes (process_id 0, 1) started with 4 CPU devices:
  # XLA_FLAGS=--xla_force_host_platform_device_count=4; on CPUs JAX's gloo collectives
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # (jax 0.10's default)
  jax.distributed.initialize("127.0.0.1:1234", num_processes=2, process_id=process_id)
  mesh = parallel.make_mesh(beams=8)  # the 8 beams over the 8 devices of both processes
  solver = parallel.kbeam(f, optax.adam(0.05), optax.sgd(0.1), mesh=mesh)
  state = solver.init(jax.random.key(2), u0, v_init, 8)  # each process: its 4 beams
  state, info = jax.jit(lambda s: kbeam_jax.run(solver.step, s, 5))(state)
  beams = multihost_utils.process_allgather(state.beams, tiled=True)  # all 8, on the host
  data_mesh = parallel.make_mesh(data=8)  # a batch of 64 rows, 32 from each process
  rows = slice(32 * jax.process_index(), 32 * (jax.process_index() + 1))
  batch = jax.tree.map(lambda x: jax.make_array_from_process_local_data(
    parallel.batch_sharding(data_mesh), x[rows]), full_batch)
  grad = jax.jit(lambda u, v0, *b: bilevel.hypergradient(f_up, g_low, u, v0, *b,
    method=bilevel.CG(20), inner_steps=40, inner_lr=0.1).grad)(u, v0, *batch)

``tests/test_multihost.py`` runs this in two processes on 127.0.0.1 and compares them with
one process of 8 virtual devices.

Examples:
  >>> import jax, jax.numpy as jnp, optax
  >>> from kbeam_jax import parallel
  >>> mesh = parallel.make_mesh(beams=1)  # one device here; beams=8 splits K over eight
  >>> solver = parallel.kbeam(lambda u, v: u * v - v**2, optax.sgd(0.1), optax.sgd(0.1),
  ...                         mesh=mesh)
  >>> state = solver.init(jax.random.key(0), jnp.array(1.0), jnp.zeros(4), num_beams=4)
  >>> state, info = jax.jit(solver.step)(state)
  >>> parallel.state_sharding(state, mesh).beams.spec, parallel.state_sharding(state, mesh).u.spec
  (P('beams',), P())
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kbeam_jax._solver import Solver
from kbeam_jax._tree import PyTree

__all__ = [
  "batch_sharding",
  "constrain",
  "kbeam",
  "make_mesh",
  "shard",
  "shard_batch",
  "state_sharding",
]

AXES = ("trials", "beams", "data")
BEAM_FIELDS = ("beams", "follower_state", "active")


def make_mesh(
  *, beams: int = 1, data: int = 1, trials: int = 1, devices: Sequence[Any] | None = None
) -> Mesh:
  """A mesh with the axes ``("trials", "beams", "data")`` of the given sizes.

  Args:
    beams: devices along the beam axis (must divide K).
    data: devices along the batch axis (must divide the batch size).
    trials: devices along the trial axis (must divide the number of trials).
    devices: the devices to use, default the first ``trials * beams * data`` of
      ``jax.devices()`` (every host's, after ``jax.distributed.initialize()``).

  Returns:
    A ``jax.sharding.Mesh``.

  Examples:
    >>> from kbeam_jax import parallel
    >>> parallel.make_mesh(beams=1).shape  # beams=8 on eight devices
    OrderedDict([('trials', 1), ('beams', 1), ('data', 1)])
  """
  sizes = {"trials": trials, "beams": beams, "data": data}
  for name, size in sizes.items():
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
      raise ValueError(f"{name} (devices along the {name} axis) must be an int >= 1, got {size!r}.")
  need = trials * beams * data
  devices = list(jax.devices() if devices is None else devices)
  if len(devices) < need:
    raise ValueError(
      f"a mesh of trials={trials} x beams={beams} x data={data} needs {need} devices, "
      f"{len(devices)} available. On a CPU, set XLA_FLAGS=--xla_force_host_platform_device_"
      f"count={need} before importing jax for virtual devices."
    )
  return Mesh(np.asarray(devices[:need]).reshape(trials, beams, data), AXES)


def _check_mesh(mesh: Any) -> None:
  if not isinstance(mesh, Mesh) or tuple(mesh.axis_names) != AXES:
    names = getattr(mesh, "axis_names", None)
    raise ValueError(
      f"mesh must be a jax.sharding.Mesh with the axes {AXES}, got {type(mesh).__name__} "
      f"with axes {names}; build it with kbeam_jax.parallel.make_mesh(beams=, data=, trials=)."
    )


AXIS_SIZES = {
  "trials": "the number of trials",
  "beams": "K (the number of beams)",
  "data": "the batch size",
}


def _check_fits(path: tuple[Any, ...], leaf: Any, axes: tuple[str, ...], mesh: Mesh) -> None:
  """Raises unless ``leaf`` has a leading axis per mesh axis in ``axes``, each divisible
  by that mesh axis's device count."""
  shape = np.shape(leaf)
  if len(axes) > len(shape):
    hint = (
      " With trials=True every leaf needs a leading trial axis: build the state with "
      "jax.vmap(solver.init) over the trials' keys."
      if "trials" in axes
      else ""
    )
    raise ValueError(
      f"the leaf {jax.tree_util.keystr(path) or 'x'} has shape {shape}, too few axes for "
      f"{P(*axes)}.{hint}"
    )
  for axis, size in zip(axes, shape, strict=False):
    if size % mesh.shape[axis]:
      raise ValueError(
        f"{AXIS_SIZES[axis]} = {size} cannot be split over the {mesh.shape[axis]} devices of "
        f"the mesh's {axis!r} axis; choose {axis}= in make_mesh to divide {size}."
      )


def _is_beam_state(node: Any) -> bool:
  """A K-beam state: a ``KBeamState`` or ``ScaleByKBeamState``, or the mapping ``nnx.state``
  makes of one (exactly its fields as keys); never a user pytree that merely has a field
  named ``beams``."""
  from kbeam_jax.minimax import KBeamState, ScaleByKBeamState

  if isinstance(node, KBeamState | ScaleByKBeamState):
    return True
  if isinstance(node, Mapping):  # nnx.state leaves out fields without arrays (optax's EmptyState)
    keys = set(node.keys())
    return any(
      {"beams", "key", "count", "active"} <= keys <= set(t._fields)
      for t in (KBeamState, ScaleByKBeamState)
    )
  return False


def _field(path: tuple[Any, ...]) -> Any:
  key = path[0]
  return getattr(key, "name", getattr(key, "key", getattr(key, "idx", None)))


def state_sharding(tree: PyTree, mesh: Mesh, *, trials: bool = False) -> PyTree:
  """The ``NamedSharding`` of every leaf of a K-beam state (or any pytree holding one).

  The fields ``beams``, ``follower_state`` and ``active`` of every K-beam state in the tree
  (a ``KBeamState``, a ``ScaleByKBeamState`` inside an optax chain, or the state of an
  ``nnx.Optimizer`` holding one) are split along their beam axis on ``beams``; the rest is
  replicated (a user pytree with a field called ``beams`` included). With ``trials=True``
  every leaf has a leading trial axis, split on ``trials``, and the beam axis comes second.
  """

  _check_mesh(mesh)

  def spec(path, leaf, beam=False):
    axes = ("trials",) if trials else ()
    if beam:
      axes += ("beams",)
    _check_fits(path, leaf, axes, mesh)
    return NamedSharding(mesh, P(*axes))

  def node_spec(path, node):
    if not _is_beam_state(node):
      return spec(path, node)
    return jax.tree_util.tree_map_with_path(
      lambda sub, leaf: spec(path + sub, leaf, _field(sub) in BEAM_FIELDS), node
    )

  return jax.tree_util.tree_map_with_path(node_spec, tree, is_leaf=_is_beam_state)


def shard(tree: PyTree, mesh: Mesh, *, trials: bool = False) -> PyTree:
  """Places a K-beam state on ``mesh`` (see ``state_sharding``).

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from kbeam_jax import minimax, parallel
    >>> mesh = parallel.make_mesh(beams=1)
    >>> solver = minimax.kbeam(lambda u, v: u * v, optax.sgd(0.1), optax.sgd(0.1))
    >>> state = parallel.shard(solver.init(jax.random.key(0), 1.0, jnp.zeros(4), 4), mesh)
    >>> state.beams.sharding.spec
    P('beams',)
  """
  return _place(tree, state_sharding(tree, mesh, trials=trials))


def _place(tree: PyTree, shardings: PyTree) -> PyTree:
  """``tree`` laid out by ``shardings`` (one per leaf, or one for all): ``jax.device_put``
  when every device is this process's; across processes (``jax.distributed``), where
  ``device_put`` cannot reach the other processes' devices, a jitted identity whose
  ``out_shardings`` let every process fill only its own devices, from a value that must be
  the same on every process (host data or uncommitted arrays, as for any argument of a
  jitted function)."""
  if all(s.is_fully_addressable for s in jax.tree.leaves(shardings)):
    return jax.device_put(tree, shardings)
  return jax.jit(lambda t: t, out_shardings=shardings)(tree)


def constrain(tree: PyTree, mesh: Mesh) -> PyTree:
  """Inside ``jit``: keeps a K-beam state in the layout of ``state_sharding`` (inside
  ``jax.vmap(..., spmd_axis_name="trials")`` the trial axis is added by the vmap)."""
  return jax.lax.with_sharding_constraint(tree, state_sharding(tree, mesh))


def batch_sharding(mesh: Mesh, *, trials: bool = False) -> NamedSharding:
  """Splits a batch along its leading axis on ``data`` (after a trial axis if ``trials``)."""
  _check_mesh(mesh)
  return NamedSharding(mesh, P("trials", "data") if trials else P("data"))


def shard_batch(tree: PyTree, mesh: Mesh, *, trials: bool = False) -> PyTree:
  """Places every leaf of a batch on ``mesh``, split along its leading axis on ``data``.

  Across processes every process passes the whole batch (``jax.device_put`` checks that
  they agree); to hand in only this process's rows, use
  ``jax.make_array_from_process_local_data(batch_sharding(mesh), rows)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from kbeam_jax import parallel
    >>> x = parallel.shard_batch(jnp.ones((64, 2)), parallel.make_mesh(data=1))
    >>> x.sharding.spec
    P('data',)
  """
  sharding = batch_sharding(mesh, trials=trials)
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    _check_fits(path, leaf, tuple(sharding.spec), mesh)
  return jax.device_put(tree, sharding)


def kbeam(
  f: Callable[..., jax.Array],
  leader: optax.GradientTransformation,
  follower: optax.GradientTransformation,
  *,
  mesh: Mesh,
  **kwargs: Any,
) -> Solver:
  """``minimax.kbeam`` laid out on ``mesh``: ``init`` builds the state in that layout (beams
  on ``beams``, the rest replicated; one jitted program, so that across processes each
  fills only its own devices), ``step`` keeps that layout, and, when the mesh splits
  the beams over several devices, rule ``best`` combines the beams' gradients instead of
  gathering the best beam (``sharded_beams=True``), so a step exchanges O(|u| + K)
  numbers between devices. K must be a multiple of the ``beams`` axis size.

  Args:
    f, leader, follower: as for ``minimax.kbeam``; pass the batch to ``step`` already
      placed with ``shard_batch``.
    mesh: from ``make_mesh``.
    **kwargs: the keyword arguments of ``minimax.kbeam``.

  Returns:
    ``Solver(init, step)`` with the signatures of ``minimax.kbeam``'s.
  """
  from kbeam_jax import minimax

  _check_mesh(mesh)
  kwargs.setdefault("sharded_beams", mesh.shape["beams"] > 1)
  solver = minimax.kbeam(f, leader, follower, **kwargs)

  def init(*args: Any, **init_kwargs: Any):
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((args, init_kwargs))):
      return constrain(solver.init(*args, **init_kwargs), mesh)  # inside jit / vmap
    # One jitted program whose outputs carry the state's shardings, so that across processes
    # each process fills only its own devices (device_put cannot reach the others). The array
    # leaves of the positional arguments are its inputs; the rest (K, an initializer
    # ``key -> v``, the keywords) stays static, so the checks of ``init`` see it as given.
    leaves, treedef = jax.tree.flatten(args)
    where = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array | np.ndarray)]

    def build(*arrays):
      full = list(leaves)
      for i, x in zip(where, arrays, strict=True):
        full[i] = x
      return solver.init(*jax.tree.unflatten(treedef, full), **init_kwargs)

    arrays = [leaves[i] for i in where]
    shardings = state_sharding(jax.eval_shape(build, *arrays), mesh)
    return jax.jit(build, out_shardings=shardings)(*arrays)

  def step(state, *args: Any):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # K-sized QPs run replicated
      new_state, info = solver.step(state, *args)
    return constrain(new_state, mesh), info

  return Solver(init, step)
