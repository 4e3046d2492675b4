"""MNIST in the IDX format (LeCun et al.), gzip or raw; the count comes from the header."""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from kbeam_jax.data._paths import find_file

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Reads one IDX file (gzip-compressed or raw) into an array of the header's shape.

  Example:
    >>> import numpy as np, tempfile, os
    >>> from kbeam_jax import data
    >>> header = bytes([0, 0, 8, 2]) + (2).to_bytes(4, "big") + (3).to_bytes(4, "big")
    >>> path = os.path.join(tempfile.mkdtemp(), "tiny-idx2-ubyte")
    >>> _ = open(path, "wb").write(header + bytes(range(6)))
    >>> data.read_idx(path)
    array([[0, 1, 2],
           [3, 4, 5]], dtype=uint8)
  """
  raw = Path(path).read_bytes()
  if raw[:2] == b"\x1f\x8b":
    raw = gzip.decompress(raw)
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
    raise ValueError(f"{path} is not an IDX file: bad magic number {raw[:4].hex()}.")
  ndim = raw[3]
  shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
  dtype = np.dtype(_DTYPES[raw[2]])
  body = raw[4 + 4 * ndim :]
  expected = int(np.prod(shape)) * dtype.itemsize
  if len(body) != expected:
    raise ValueError(
      f"{path}: the header says shape {shape} ({expected} bytes) but {len(body)} bytes follow."
    )
  return np.frombuffer(body, dtype).reshape(shape).astype(dtype.newbyteorder("="))


class MNIST(NamedTuple):
  """Images ``(N, 28, 28)`` uint8 and labels ``(N,)`` uint8."""

  images: np.ndarray
  labels: np.ndarray


def load_mnist(split: str = "train", data_dir: str | os.PathLike | None = None) -> MNIST:
  """MNIST ``split`` ("train" or "test") from ``<data_dir>/mnist/``, gzip or raw IDX.

  The number of images is read from the file header (this repository's training file
  holds 18,097 of the 60,000 images).

  Args:
    split: ``"train"`` or ``"test"``.
    data_dir: folder holding ``mnist/`` (or the IDX files themselves); default
      ``$KBEAM_JAX_DATA``, then ``~/.cache/kbeam_jax``.

  Returns:
    ``MNIST(images, labels)``.
  """
  prefix = {"train": "train", "test": "t10k"}.get(split)
  if prefix is None:
    raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
  arrays = []
  for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
    name = f"{prefix}-{kind}"
    arrays.append(read_idx(find_file([name + ".gz", name], "mnist", data_dir)))
  images, labels = arrays
  if images.shape[0] != labels.shape[0]:
    raise ValueError(f"MNIST {split}: {images.shape[0]} images but {labels.shape[0]} labels.")
  return MNIST(images, labels)
