"""MNIST in the IDX format (LeCun et al.), gzip or raw; the count comes from the header."""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

from kbeam_jax.data._paths import find_file

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


_FIX = "Copy the file again from its source (or point data_dir / KBEAM_JAX_DATA at a good copy)."


def _decompress(path: Path, raw: bytes) -> bytes:
  try:
    return gzip.decompress(raw)
  except EOFError as e:
    raise ValueError(
      f"{path} is a truncated gzip file ({len(raw):,} bytes; the compressed stream ends "
      f"early): it was cut off while downloading or copying. {_FIX}"
    ) from e
  except (OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
    raise ValueError(f"{path} is a damaged gzip file ({e}). {_FIX}") from e


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Reads one IDX file (gzip-compressed or raw) into an array of the header's shape.

  The IDX header is two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16,
  0x0C int32, 0x0D float32, 0x0E float64), the number of dimensions, then each dimension
  as a big-endian 32-bit count; the data follow, exactly ``prod(shape)`` items.

  Raises:
    FileNotFoundError: ``path`` does not exist.
    ValueError: naming the file, when it is empty, not IDX (wrong magic number), a
      truncated or damaged gzip file, or when the header's dimensions disagree with the
      bytes that follow.

  Examples:
    >>> import numpy as np, tempfile, os
    >>> from kbeam_jax import data
    >>> header = bytes([0, 0, 8, 2]) + (2).to_bytes(4, "big") + (3).to_bytes(4, "big")
    >>> path = os.path.join(tempfile.mkdtemp(), "tiny-idx2-ubyte")
    >>> _ = open(path, "wb").write(header + bytes(range(6)))
    >>> data.read_idx(path)
    array([[0, 1, 2],
           [3, 4, 5]], dtype=uint8)
  """
  path = Path(path)
  raw = path.read_bytes()
  if not raw:
    raise ValueError(f"{path} is empty (0 bytes). {_FIX}")
  if raw[:2] == b"\x1f\x8b":
    raw = _decompress(path, raw)
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
    hint = " (it looks like a web page: a failed download?)" if b"<" in raw[:64] else ""
    raise ValueError(
      f"{path} is not an IDX file: its magic number is {raw[:4].hex(' ')}{hint}, while an "
      "IDX file starts with 00 00, a type code (08 for uint8 ... 0e for float64) and the "
      f"number of dimensions. Is it the right file (e.g. train-images-idx3-ubyte.gz)? {_FIX}"
    )
  ndim = raw[3]
  if ndim == 0:
    raise ValueError(f"{path}: the IDX header declares 0 dimensions; the file is damaged. {_FIX}")
  if len(raw) < 4 + 4 * ndim:
    raise ValueError(
      f"{path}: the IDX header declares {ndim} dimensions, which need {4 + 4 * ndim} header "
      f"bytes, but the file holds only {len(raw)} bytes: it is truncated or its header is "
      f"damaged. {_FIX}"
    )
  shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
  dtype = np.dtype(_DTYPES[raw[2]])
  body = raw[4 + 4 * ndim :]
  expected = math.prod(shape) * dtype.itemsize
  if len(body) != expected:
    what = "is truncated" if len(body) < expected else "has extra bytes"
    raise ValueError(
      f"{path}: the header says {ndim} dimensions of shape {shape} ({expected:,} bytes of "
      f"{dtype.name}) but {len(body):,} bytes follow: the file {what}, or its header's "
      f"count or number of dimensions is wrong. {_FIX}"
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
  paths = []
  for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
    name = f"{prefix}-{kind}"
    paths.append(find_file([name + ".gz", name], "mnist", data_dir))
  images, labels = (read_idx(p) for p in paths)
  for path, array, ndim, what in (
    (paths[0], images, 3, "(N, rows, cols) images"),
    (paths[1], labels, 1, "(N,) labels"),
  ):
    if array.ndim != ndim or array.dtype != np.uint8:
      raise ValueError(
        f"{path} holds a {array.dtype} array of shape {array.shape}; MNIST needs uint8 "
        f"{what}. Are the images and labels files swapped or from another data set?"
      )
  if images.shape[0] != labels.shape[0]:
    raise ValueError(
      f"MNIST {split}: {images.shape[0]:,} images in {paths[0]} but {labels.shape[0]:,} "
      f"labels in {paths[1]}; the two files must come from the same release. {_FIX}"
    )
  if images.shape[0] == 0:
    raise ValueError(f"MNIST {split}: {paths[0]} holds no images.")
  if labels.max() > 9:
    raise ValueError(
      f"{paths[1]} holds labels up to {labels.max()}; MNIST's are 0-9. Is it another data set?"
    )
  return MNIST(images, labels)
