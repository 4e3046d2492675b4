"""The GENKI face subset of the minimax-filter papers (Hamm, JMLR 2017), a MATLAB file."""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np

from kbeam_jax.data._paths import find_file


class Genki(NamedTuple):
  """Faces as rows ``(N, 256)`` float32 (16×16 grey); labels 0/1 (expression: 1 = the
  file's class 2; gender likewise)."""

  x_train: np.ndarray
  expression_train: np.ndarray
  gender_train: np.ndarray
  x_test: np.ndarray
  expression_test: np.ndarray
  gender_test: np.ndarray


def load_genki(data_dir: str | os.PathLike | None = None) -> Genki:
  """Reads ``<data_dir>/genki/genki.mat`` (keys ``Xtrain``, ``y1_train``, ``y2_train``, ...).

  Expression (``y1``) is the utility task, gender (``y2``) the private one; the file's
  labels 1..2 become 0..1. Needs scipy (``pip install scipy``).

  Raises:
    FileNotFoundError: no ``genki.mat`` (naming every directory tried).
    ValueError: naming the file, when it is not a readable MATLAB file (truncated,
      damaged, or MATLAB v7.3), lacks a key, or holds arrays of the wrong shape, labels
      other than 1 and 2, or non-finite features.
  """
  try:
    from scipy.io import loadmat
  except ImportError as e:  # pragma: no cover - scipy is installed with the bench extra
    raise ImportError("load_genki reads a MATLAB file with scipy: pip install scipy") from e
  path = find_file("genki.mat", "genki", data_dir)
  fix = "Copy genki.mat again from its source (or point data_dir / KBEAM_JAX_DATA at a good copy)."
  try:
    mat = loadmat(path)
  except NotImplementedError as e:  # scipy's answer to MATLAB v7.3 (HDF5) files
    raise ValueError(
      f"{path} is a MATLAB v7.3 (HDF5) file, which scipy cannot read ({e}). Save it from "
      "MATLAB with save(..., '-v7'), or use the file published with the minimax-filter code."
    ) from e
  except Exception as e:  # scipy raises ValueError, TypeError, zlib errors, ... on bad bytes
    raise ValueError(
      f"{path} is not a readable MATLAB file ({type(e).__name__}: {e}): it is truncated or "
      f"damaged. {fix}"
    ) from e
  keys = ("Xtrain", "y1_train", "y2_train", "Xtest", "y1_test", "y2_test")
  missing = [k for k in keys if k not in mat]
  if missing:
    raise ValueError(
      f"{path} lacks the keys {missing} (it has {sorted(k for k in mat if not k.startswith('__'))}"
      "); is it the minimax-filter GENKI file?"
    )
  out = []
  for split in ("train", "test"):
    x = np.asarray(mat[f"X{split}"])
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.number):
      raise ValueError(
        f"{path}: X{split} must be a numeric matrix (features × faces, one column per face), "
        f"got {x.dtype} of shape {x.shape}."
      )
    if not np.all(np.isfinite(x)):
      raise ValueError(f"{path}: X{split} holds {np.sum(~np.isfinite(x))} NaN or inf values.")
    out.append(x.astype(np.float32).T)
    for task in ("y1", "y2"):
      y = np.asarray(mat[f"{task}_{split}"])
      if y.size != x.shape[1] or y.squeeze().ndim > 1:
        raise ValueError(
          f"{path}: {task}_{split} has shape {y.shape}, but X{split} holds {x.shape[1]} faces "
          "(one per column): one label per face is needed. Is X stored faces × features? "
          "The loader expects features × faces, as in the published file."
        )
      values = np.unique(y)
      if not np.isin(values, (1, 2)).all():
        raise ValueError(
          f"{path}: {task}_{split} holds the labels {values.tolist()[:10]}; the GENKI file "
          "labels its two classes 1 and 2."
        )
      out.append(y.reshape(-1).astype(np.int32) - 1)
  return Genki(*out)
