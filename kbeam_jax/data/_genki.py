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
  """
  try:
    from scipy.io import loadmat
  except ImportError as e:  # pragma: no cover - scipy is installed with the bench extra
    raise ImportError("load_genki reads a MATLAB file with scipy: pip install scipy") from e
  path = find_file("genki.mat", "genki", data_dir)
  mat = loadmat(path)
  missing = [
    k for k in ("Xtrain", "y1_train", "y2_train", "Xtest", "y1_test", "y2_test") if k not in mat
  ]
  if missing:
    raise ValueError(f"{path} lacks the keys {missing}; is it the minimax-filter GENKI file?")
  x = lambda k: np.asarray(mat[k], np.float32).T
  y = lambda k: np.asarray(mat[k]).reshape(-1).astype(np.int32) - 1
  return Genki(x("Xtrain"), y("y1_train"), y("y2_train"), x("Xtest"), y("y1_test"), y("y2_test"))
