"""Few-shot episodes: N-way K-shot classification from a pool of classes, sinusoid regression.

Re-exported by ``kbeam_jax.tasks.fewshot`` (the public module), whose docstring has the
problem and its references.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Episodes(NamedTuple):
  """A meta-batch of B tasks, each with a support and a query set.

  ``support_x`` ``(B, S, D)`` float, ``support_y`` ``(B, S)`` (int32 class in
  ``0..n_way-1``, or float targets), ``query_x`` ``(B, Q, D)``, ``query_y`` ``(B, Q)``.
  """

  support_x: jax.Array
  support_y: jax.Array
  query_x: jax.Array
  query_y: jax.Array


class ClassPool(NamedTuple):
  """Images ``(C, M, H, W)`` uint8: M examples of each of C classes; ``names`` per class."""

  images: np.ndarray
  names: tuple[str, ...]


def _check_positive(**values: int) -> None:
  for name, value in values.items():
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
      raise ValueError(f"{name} must be a positive int, got {name}={value!r}.")


def class_pool(
  images: np.ndarray,
  labels: np.ndarray,
  classes: Sequence[int],
  *,
  rotations: int = 4,
  per_class: int | None = None,
) -> ClassPool:
  """The classes ``classes`` of a labelled image set, each rotated by 0°, 90°, ... as new classes.

  Class ``c`` rotated by ``r·90°`` becomes class ``len(rotations)·i + r`` (for the i-th
  entry of ``classes``). Every class keeps the same number of examples, the smallest count
  among them (or ``per_class``), taken in file order, so the pool is one array.

  Args:
    images: ``(N, H, W)`` images (square when ``rotations > 1``).
    labels: ``(N,)`` integer labels.
    classes: the labels to keep.
    rotations: 1 (no augmentation) to 4 (0°, 90°, 180°, 270°).
    per_class: examples per class (default: the smallest count).

  Returns:
    ``ClassPool(images (C, M, H, W) uint8, names)``, ``C = len(classes)·rotations``.

  Examples:
    >>> import numpy as np
    >>> from kbeam_jax.tasks import fewshot
    >>> images = np.arange(6 * 4, dtype=np.uint8).reshape(6, 2, 2)
    >>> pool = fewshot.class_pool(images, np.array([0, 1, 0, 1, 2, 0]), [0, 1], rotations=2)
    >>> pool.images.shape, pool.names
    ((4, 2, 2, 2), ('0@0', '0@90', '1@0', '1@90'))
  """
  images, labels = np.asarray(images), np.asarray(labels)
  if images.ndim != 3 or labels.shape != images.shape[:1]:
    raise ValueError(
      f"need images (N, H, W) and labels (N,), got {images.shape} and {labels.shape}."
    )
  if not 1 <= rotations <= 4:
    raise ValueError(f"rotations must be 1 to 4, got {rotations}.")
  if rotations > 1 and images.shape[1] != images.shape[2]:
    raise ValueError(f"rotating needs square images, got {images.shape[1:]}.")
  if len(classes) == 0:
    raise ValueError("classes is empty.")
  counts = {c: int(np.sum(labels == c)) for c in classes}
  missing = [c for c, n in counts.items() if n == 0]
  if missing:
    raise ValueError(f"no images with label(s) {missing}; labels present: {np.unique(labels)}.")
  m = min(counts.values()) if per_class is None else per_class
  if m < 1 or m > min(counts.values()):
    raise ValueError(f"per_class={per_class} but the smallest class has {min(counts.values())}.")
  pool, names = [], []
  for c in classes:
    chosen = images[labels == c][:m]
    for r in range(rotations):
      pool.append(np.rot90(chosen, r, axes=(1, 2)))
      names.append(f"{c}@{90 * r}")
  return ClassPool(np.ascontiguousarray(np.stack(pool)).astype(np.uint8), tuple(names))


def sample_classification(
  key: jax.Array, pool: jax.Array, *, num_tasks: int, n_way: int, k_shot: int, num_query: int
) -> Episodes:
  """N-way K-shot episodes from a class pool ``(C, M, H, W)``; jit-able, traced ``pool``.

  Each task draws ``n_way`` distinct classes and ``k_shot + num_query`` distinct examples
  of each; task label ``j`` is its j-th drawn class (a fresh random labelling per task).
  Pixels are scaled to ``[0, 1]`` and flattened.

  Returns:
    ``Episodes``: ``support_x (B, N·K, H·W)``, ``support_y (B, N·K)`` int32 (class-major),
    ``query_x (B, N·Q, H·W)``, ``query_y (B, N·Q)``.

  Examples:
    >>> import jax, numpy as np
    >>> from kbeam_jax.tasks import fewshot
    >>> pool = np.zeros((6, 10, 4, 4), np.uint8)
    >>> ep = fewshot.sample_classification(jax.random.key(0), pool, num_tasks=2, n_way=3,
    ...                                    k_shot=1, num_query=2)
    >>> ep.support_x.shape, ep.support_y[0].tolist(), ep.query_y.shape
    ((2, 3, 16), [0, 1, 2], (2, 6))
  """
  _check_positive(num_tasks=num_tasks, n_way=n_way, k_shot=k_shot, num_query=num_query)
  if jnp.ndim(pool) != 4:
    raise ValueError(f"pool must be (classes, examples, H, W), got shape {jnp.shape(pool)}.")
  num_classes, per_class, h, w = jnp.shape(pool)
  if n_way > num_classes or k_shot + num_query > per_class:
    raise ValueError(
      f"the pool has {num_classes} classes of {per_class} examples; an episode needs "
      f"n_way={n_way} classes of k_shot + num_query = {k_shot + num_query} examples."
    )
  per = k_shot + num_query
  pool = jnp.asarray(pool)

  def one(key):
    kc, ki = jax.random.split(key)
    classes = jax.random.choice(kc, num_classes, (n_way,), replace=False)
    idx = jax.vmap(lambda k: jax.random.choice(k, per_class, (per,), replace=False))(
      jax.random.split(ki, n_way)
    )
    x = pool[classes[:, None], idx].reshape(n_way, per, h * w).astype(jnp.float32) / 255.0
    y = jnp.broadcast_to(jnp.arange(n_way, dtype=jnp.int32)[:, None], (n_way, per))
    return Episodes(
      x[:, :k_shot].reshape(n_way * k_shot, h * w),
      y[:, :k_shot].reshape(-1),
      x[:, k_shot:].reshape(n_way * num_query, h * w),
      y[:, k_shot:].reshape(-1),
    )

  return jax.vmap(one)(jax.random.split(key, num_tasks))


def sample_sinusoid(
  key: jax.Array,
  *,
  num_tasks: int,
  k_shot: int,
  num_query: int,
  amplitude: tuple[float, float] = (0.1, 5.0),
  phase: tuple[float, float] = (0.0, float(np.pi)),
  x_range: tuple[float, float] = (-5.0, 5.0),
) -> Episodes:
  """Sinusoid regression tasks ``y = A sin(x - φ)`` (Finn et al. 2017), uniform draws.

  ``A`` uniform in ``amplitude``, ``φ`` in ``phase``, support and query inputs uniform
  in ``x_range``, independently; no observation noise.

  Returns:
    ``Episodes``: ``support_x (B, K, 1)``, ``support_y (B, K)``, ``query_x (B, Q, 1)``,
    ``query_y (B, Q)``, float32.

  Examples:
    >>> import jax
    >>> from kbeam_jax.tasks import fewshot
    >>> ep = fewshot.sample_sinusoid(jax.random.key(0), num_tasks=4, k_shot=5, num_query=10)
    >>> ep.support_x.shape, ep.query_y.shape, bool(abs(ep.query_y).max() <= 5.0)
    ((4, 5, 1), (4, 10), True)
  """
  _check_positive(num_tasks=num_tasks, k_shot=k_shot, num_query=num_query)
  for name, (lo, hi) in [("amplitude", amplitude), ("phase", phase), ("x_range", x_range)]:
    if not lo <= hi:
      raise ValueError(f"{name} must be (low, high) with low <= high, got {(lo, hi)}.")
  ka, kp, ks, kq = jax.random.split(key, 4)
  amp = jax.random.uniform(ka, (num_tasks, 1), minval=amplitude[0], maxval=amplitude[1])
  ph = jax.random.uniform(kp, (num_tasks, 1), minval=phase[0], maxval=phase[1])
  xs = jax.random.uniform(ks, (num_tasks, k_shot), minval=x_range[0], maxval=x_range[1])
  xq = jax.random.uniform(kq, (num_tasks, num_query), minval=x_range[0], maxval=x_range[1])
  return Episodes(xs[..., None], amp * jnp.sin(xs - ph), xq[..., None], amp * jnp.sin(xq - ph))
