"""Save and restore any pytree of arrays (typed PRNG keys included) with orbax-checkpoint.

A checkpoint is a directory managed by ``orbax.checkpoint.CheckpointManager``: every save
is a new step written to a temporary folder and renamed into place when complete (orbax's
atomic commit), and only then is the previous step deleted, so a run killed while saving
leaves the last complete checkpoint readable. Arrays are stored by tree path (``['gen']
.kernel``, ``[0].mu['w']``), and ``load_checkpoint`` matches them to the template by
path, never by position: a renamed key, a changed shape or dtype is an error naming the
path.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kbeam_jax._tree import PyTree

_FORMAT = 1  # bump when the layout below changes
_STEP_NAME = re.compile(r"^\d+($|\.)")  # orbax step folders and their temporary folders


def _is_key(x: Any) -> bool:
  """A typed PRNG key: an array, or an abstract ``ShapeDtypeStruct`` of one."""
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)


def _key_impl(x: Any) -> str:
  """The key's implementation name (``threefry2x32``), for an array or an abstract key."""
  if isinstance(x, jax.Array):
    return str(jax.random.key_impl(x))
  return str(x.dtype._impl.name)  # an abstract key: its dtype knows the implementation


def _name(entry: Any) -> str:
  """One path entry as the name orbax stores: dict key, attribute, or index."""
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)  # pragma: no cover - jax has no other path entry types


def _flatten(tree: PyTree) -> tuple[list[tuple[tuple[str, ...], str, Any]], Any]:
  """``[(names, readable path, leaf)]`` and the treedef of ``tree``."""
  with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
  # every name starts with "tree", so a tree that is a single array has a name too
  leaves = [
    (("tree", *(_name(e) for e in p)), jax.tree_util.keystr(p) or "(the root)", x)
    for p, x in with_path
  ]
  return leaves, treedef


def _nest(flat: dict[tuple[str, ...], Any]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for names, x in flat.items():
    node = out
    for n in names[:-1]:
      node = node.setdefault(n, {})
    node[names[-1]] = x
  return out


def _unnest(tree: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out |= _unnest(v, prefix + (str(k),))
    return out
  return {prefix: tree}


def _readable(names: tuple[str, ...]) -> str:
  return "".join(f"[{n!r}]" for n in names[1:]) or "(the root)"


def _dtype_of(x: Any) -> np.dtype:
  try:
    return np.dtype(x.dtype) if hasattr(x, "dtype") else np.dtype(jnp.result_type(x))
  except TypeError as e:
    raise TypeError(
      f"checkpoints hold arrays (and jax.random keys); got a leaf of type {type(x).__name__} "
      f"({x!r:.60}). Put strings and other values in the metadata: "
      "save_checkpoint(path, tree, note='...')."
    ) from e


def _json_meta(meta: dict[str, Any]) -> dict[str, Any]:
  """``meta`` with arrays turned into (nested) lists; a value JSON cannot hold is a TypeError."""

  def convert(x):
    if isinstance(x, jax.Array | np.ndarray | np.generic):
      return np.asarray(x).tolist()
    if isinstance(x, dict):
      return {str(k): convert(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
      return [convert(v) for v in x]
    return x

  meta = convert(meta)
  for key, value in meta.items():
    try:
      json.dumps(value)
    except (TypeError, ValueError) as e:
      raise TypeError(
        f"save_checkpoint stores meta as JSON: numbers, strings, booleans, None, lists, dicts "
        f"and arrays; meta[{key!r}] is not ({e}). Convert that value before saving."
      ) from e
  return meta


def _manager(path: Path, write: bool):
  import orbax.checkpoint as ocp

  options = ocp.CheckpointManagerOptions(
    max_to_keep=1 if write else None,
    save_interval_steps=1 if write else 0,  # read-only managers want these (else orbax warns)
    enable_async_checkpointing=False,
    create=write,
    read_only=not write,
    cleanup_tmp_directories=write,  # what a run killed while saving left behind
  )
  handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
  absl = logging.getLogger("absl")
  level = absl.level
  absl.setLevel(logging.ERROR)  # "Given directory is read only": orbax's note, not ours
  try:
    return ocp.CheckpointManager(path, options=options, item_handlers=handlers)
  finally:
    absl.setLevel(level)


def _check_directory(path: Path, action: str) -> None:
  if path.is_file():
    with path.open("rb") as f:
      head = f.read(1)
    old = head and (head[0] & 0xF0 == 0x80 or head[0] in (0xDE, 0xDF))  # a msgpack map
    raise ValueError(
      f"cannot {action} checkpoint {path}: it is a file, and a checkpoint is a directory "
      "(orbax-checkpoint)"
      + (
        ", and this file looks like a msgpack checkpoint of kbeam_jax 0.1, whose "
        "positional format this version no longer reads"
        if old
        else ""
      )
      + f". Delete {path} (and run without --resume), or use another path."
    )
  if path.is_dir():
    foreign = sorted(p.name for p in path.iterdir() if not _STEP_NAME.match(p.name))
    if foreign:
      raise ValueError(
        f"cannot {action} checkpoint {path}: the directory holds {foreign[:5]}, which are not "
        "checkpoint steps; it is not a checkpoint written by save_checkpoint. Pass a path of "
        "its own (e.g. out/checkpoints/run) or delete what is there."
      )


def checkpoint_exists(path: str | os.PathLike) -> bool:
  """Whether ``path`` holds a complete checkpoint (a committed step) to load.

  A directory left by a run killed during its first save holds only a temporary folder:
  that is not a checkpoint, so ``--resume`` starts from scratch. A plain file at ``path``
  counts as present (True), so that ``load_checkpoint`` then says what is wrong with it
  rather than a resume silently starting over.
  """
  path = Path(path)
  if not path.is_dir():
    return path.exists()  # a file: load_checkpoint explains what is wrong with it
  return any(p.is_dir() and p.name.isdigit() for p in path.iterdir())


def save_checkpoint(path: str | os.PathLike, tree: PyTree, **meta: Any) -> None:
  """Writes ``tree`` and ``meta`` to the checkpoint directory ``path`` (orbax-checkpoint).

  Arrays are stored by tree path; typed PRNG keys (``jax.random.key``) as their key data
  and implementation. The new step is committed atomically before the previous one is
  removed, so a run killed while saving leaves the last complete checkpoint.

  Args:
    path: the checkpoint directory (created if missing; it must not hold anything else).
    tree: any pytree of arrays, NumPy arrays or Python scalars.
    **meta: JSON-able values (numbers, strings, lists, dicts; arrays become lists).

  Examples:
    >>> import jax, jax.numpy as jnp, tempfile, os
    >>> from kbeam_jax import nn
    >>> path = os.path.join(tempfile.mkdtemp(), "state")
    >>> state = {"w": jnp.arange(3.0), "key": jax.random.key(1)}
    >>> nn.save_checkpoint(path, state, iteration=7)
    >>> restored, meta = nn.load_checkpoint(path, like=state)
    >>> restored["w"], meta["iteration"]
    (Array([0., 1., 2.], dtype=float32), 7)
  """
  import orbax.checkpoint as ocp

  path = Path(path).absolute()
  _check_directory(path, "write")
  leaves, _ = _flatten(tree)
  flat, keys, where = {}, {}, {}
  for names, readable, x in leaves:
    if names in flat:
      raise ValueError(
        f"the tree has two leaves stored under the same name {_readable(names)} ({where[names]} "
        f"and {readable}): a dict with both 0 and '0' as keys, say. Rename one."
      )
    where[names] = readable
    if _is_key(x):
      keys["/".join(names)] = _key_impl(x)
      x = jax.random.key_data(x)
    flat[names] = np.asarray(x, _dtype_of(x))
  info = {"format": _FORMAT, "prng_keys": keys, "paths": ["/".join(n) for n in flat]}
  payload = {"kbeam_jax": info, "meta": _json_meta(meta)}
  with _manager(path, write=True) as manager:
    latest = manager.latest_step()
    step = 0 if latest is None else latest + 1
    items = {"meta": ocp.args.JsonSave(payload)}
    if flat:  # orbax refuses an empty item; a tree without leaves stores only the metadata
      items["state"] = ocp.args.StandardSave(_nest(flat))
    manager.save(step, args=ocp.args.Composite(**items))


def load_checkpoint(path: str | os.PathLike, like: PyTree) -> tuple[PyTree, dict[str, Any]]:
  """Reads a ``save_checkpoint`` directory into the structure of ``like``, path by path.

  Every leaf of ``like`` must be in the checkpoint under the same tree path, with the same
  shape and dtype (a typed PRNG key with the same implementation), and the checkpoint must
  hold nothing else: no silent casts, no loading by position.

  Args:
    path: the checkpoint directory.
    like: a pytree with the structure, shapes and dtypes to restore (e.g. a freshly
      initialized state); its values are not used.

  Returns:
    ``(tree, meta)``: ``tree`` has the structure of ``like`` (jax arrays where ``like``
    has jax arrays or Python scalars, NumPy arrays where it has NumPy arrays).

  Raises:
    FileNotFoundError: no checkpoint at ``path``.
    ValueError: a path is missing or extra, a shape, dtype or key implementation differs
      (each naming the tree path), or the checkpoint's files are damaged.
  """
  import orbax.checkpoint as ocp

  path = Path(path).absolute()
  if not path.exists():
    raise FileNotFoundError(f"no checkpoint at {path}: the path does not exist.")
  _check_directory(path, "read")
  if not checkpoint_exists(path):
    raise FileNotFoundError(
      f"no checkpoint at {path}: the directory holds no complete step (a run killed during "
      "its first save leaves only a temporary folder). Delete it and start again."
    )
  try:
    with _manager(path, write=False) as manager:
      step = manager.latest_step()
      payload = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
      payload = payload["meta"]
      arrays = {}
      if (payload or {}).get("kbeam_jax", {}).get("paths"):
        items = ocp.args.Composite(state=ocp.args.StandardRestore())
        arrays = _unnest(manager.restore(step, args=items)["state"])
  except Exception as e:
    reason = str(e) if len(str(e)) < 400 else str(e)[:400] + " ..."
    raise ValueError(
      f"cannot read checkpoint {path}: {type(e).__name__}: {reason}\nIts files are damaged or "
      f"incomplete (copied while being written, or truncated). Delete {path} and start "
      "again (without --resume)."
    ) from e
  info = (payload or {}).get("kbeam_jax")
  if not isinstance(info, dict) or info.get("format") != _FORMAT:
    raise ValueError(
      f"{path} is not a kbeam_jax checkpoint of format {_FORMAT} (no kbeam_jax metadata "
      "found); write it with kbeam_jax.nn.save_checkpoint."
    )
  template, treedef = _flatten(like)
  wanted = {names: (readable, t) for names, readable, t in template}
  missing = [readable for names, (readable, _) in wanted.items() if names not in arrays]
  extra = [_readable(n) for n in arrays if n not in wanted]
  if missing or extra:
    raise ValueError(
      f"checkpoint {path} does not have the structure of `like`:"
      + (f"\n  missing from the checkpoint: {', '.join(missing)}" if missing else "")
      + (f"\n  in the checkpoint but not in `like`: {', '.join(extra)}" if extra else "")
      + "\nIt was saved from a different model, optimizer or configuration (or keys were "
      "renamed). Load it with a template built the same way, or start again without "
      "--resume."
    )
  keys = info.get("prng_keys", {})
  leaves = []
  for names, readable, t in template:
    x = np.asarray(arrays[names])
    stored_key = keys.get("/".join(names))
    if _is_key(t):
      impl = _key_impl(t)
      if stored_key != impl:
        got = f"a {stored_key} key" if stored_key else f"a {x.dtype} array, not a key"
        raise ValueError(
          f"checkpoint {path}, leaf {readable}: `like` holds a {impl} PRNG key, the "
          f"checkpoint {got}. Build `like` with the same jax.random.key implementation."
        )
      want_shape = jax.eval_shape(jax.random.key_data, t).shape
      if x.shape != want_shape:
        raise ValueError(
          f"checkpoint {path}, leaf {readable}: key data of shape {x.shape}, `like` has "
          f"{want_shape} (a different number of keys)."
        )
      leaves.append(jax.random.wrap_key_data(jnp.asarray(x), impl=impl))
      continue
    if stored_key:
      raise ValueError(
        f"checkpoint {path}, leaf {readable}: the checkpoint holds a {stored_key} PRNG key, "
        f"`like` a {_dtype_of(t)} array. Build `like` with a jax.random.key there."
      )
    if x.shape != np.shape(t):
      raise ValueError(
        f"checkpoint {path}, leaf {readable}: shape {x.shape} in the checkpoint, "
        f"{np.shape(t)} in `like` (another model size or number of beams?)."
      )
    if x.dtype != _dtype_of(t):
      raise ValueError(
        f"checkpoint {path}, leaf {readable}: dtype {x.dtype} in the checkpoint, "
        f"{_dtype_of(t)} in `like`; loading does not cast. Build `like` in {x.dtype} (and "
        "cast after loading if you mean to), or check jax_enable_x64 matches the run that "
        "saved it."
      )
    if isinstance(t, np.ndarray | np.generic):
      leaves.append(x)
    elif isinstance(t, jax.Array) and t.is_fully_addressable:
      leaves.append(jax.device_put(x, t.sharding))
    else:
      leaves.append(jnp.asarray(x))
  return jax.tree.unflatten(treedef, leaves), dict(payload.get("meta", {}))
