"""Save and restore any pytree of arrays (typed PRNG keys included) with flax serialization."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

PyTree = Any


def _is_key(x: Any) -> bool:
  return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def save_checkpoint(path: str | os.PathLike, tree: PyTree, **meta: Any) -> None:
  """Writes ``tree`` and ``meta`` (msgpack-able: numbers, strings, lists, dicts, arrays).

  The file is written next to ``path`` and renamed into place, so a run killed while
  saving leaves the previous checkpoint intact.

  Example:
    >>> import jax, jax.numpy as jnp, tempfile, os
    >>> from kbeam_jax import nn
    >>> path = os.path.join(tempfile.mkdtemp(), "state.msgpack")
    >>> state = {"w": jnp.arange(3.0), "key": jax.random.key(1)}
    >>> nn.save_checkpoint(path, state, iteration=7)
    >>> restored, meta = nn.load_checkpoint(path, like=state)
    >>> restored["w"], meta["iteration"]
    (Array([0., 1., 2.], dtype=float32), 7)
  """
  leaves = jax.tree.leaves(tree)
  payload = {
    "leaves": {
      str(i): np.asarray(jax.random.key_data(x) if _is_key(x) else x) for i, x in enumerate(leaves)
    },
    "meta": meta,
  }
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_bytes(serialization.msgpack_serialize(payload))
  os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike, like: PyTree) -> tuple[PyTree, dict[str, Any]]:
  """Reads a ``save_checkpoint`` file into the structure, shapes and dtypes of ``like``.

  Returns:
    ``(tree, meta)``.

  Raises:
    ValueError: when the file's arrays do not match ``like`` (another model or size).
  """
  payload = serialization.msgpack_restore(Path(path).read_bytes())
  template, treedef = jax.tree.flatten(like)
  stored = payload["leaves"]
  if len(stored) != len(template):
    raise ValueError(
      f"{path} holds {len(stored)} arrays but the state has {len(template)} leaves: "
      "it was saved from a different model or configuration."
    )
  leaves = []
  for i, t in enumerate(template):
    x = np.asarray(stored[str(i)])
    if _is_key(t):
      leaves.append(jax.random.wrap_key_data(x, impl=jax.random.key_impl(t)))
      continue
    if x.shape != np.shape(t):
      raise ValueError(f"{path}: leaf {i} has shape {x.shape}, the state expects {np.shape(t)}.")
    leaves.append(jnp.asarray(x, dtype=jnp.result_type(t)))
  return jax.tree.unflatten(treedef, leaves), dict(payload.get("meta", {}))
