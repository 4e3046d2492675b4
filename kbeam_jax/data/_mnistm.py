"""MNIST-M (Ganin et al. 2015): each digit blended with a random photograph patch."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif"}


def load_photos(directory: str | os.PathLike | None = None) -> list[np.ndarray]:
  """Colour photographs ``(H, W, 3)`` uint8 to cut MNIST-M patches from.

  Args:
    directory: a folder of images (e.g. BSDS500, read with Pillow, searched recursively);
      default the two photographs scikit-learn ships (``load_sample_images``).
  """
  if directory is None:
    try:
      from sklearn.datasets import load_sample_images
    except ImportError as e:
      raise ImportError(
        "MNIST-M patches come from scikit-learn's sample photographs by default: "
        "pip install scikit-learn, or pass a directory of images."
      ) from e
    return [np.asarray(im, np.uint8) for im in load_sample_images().images]
  from PIL import Image

  directory = Path(directory).expanduser()
  if not directory.is_dir():
    raise FileNotFoundError(
      f"photo directory {directory} "
      + ("is a file" if directory.exists() else "does not exist")
      + "; pass a folder of images (e.g. BSDS500's images/), or nothing for scikit-learn's "
      "sample photographs."
    )
  files = sorted(p for p in directory.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)
  if not files:
    raise FileNotFoundError(f"no images ({', '.join(sorted(_IMAGE_SUFFIXES))}) in {directory}.")
  photos = []
  for p in files:
    try:
      with Image.open(p) as img:
        photos.append(np.asarray(img.convert("RGB"), np.uint8))
    except (OSError, ValueError) as e:  # PIL: unidentified, truncated or damaged images
      raise ValueError(
        f"cannot read the image {p} ({type(e).__name__}: {e}); it is damaged or not an "
        "image. Remove or replace it."
      ) from e
  return photos


def mnist_m(
  digits: np.ndarray, photos: list[np.ndarray], seed: int = 0, size: int = 28
) -> np.ndarray:
  """Blends each digit with a random ``size × size`` patch: ``|patch - digit|`` per channel.

  Args:
    digits: ``(N, size, size)`` uint8 MNIST images.
    photos: colour photographs ``(H, W, 3)`` uint8, each at least ``size`` on a side
      (see ``load_photos``).
    seed: seed of the patch positions and photograph choices.
    size: patch side.

  Returns:
    ``(N, size, size, 3)`` uint8.

  Examples:
    >>> import numpy as np
    >>> from kbeam_jax import data
    >>> photo = np.full((40, 40, 3), 200, np.uint8)
    >>> digits = np.zeros((2, 28, 28), np.uint8); digits[:, 10:20, 10:20] = 255
    >>> out = data.mnist_m(digits, [photo])
    >>> out.shape, int(out[0, 0, 0, 0]), int(out[0, 15, 15, 0])
    ((2, 28, 28, 3), 200, 55)
  """
  if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 1:
    raise ValueError(f"size must be a positive int, got {size!r}.")
  if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
    raise ValueError(f"seed must be an int >= 0, got {seed!r}.")
  digits = np.asarray(digits)
  if digits.ndim != 3 or digits.shape[1:] != (size, size):
    raise ValueError(f"digits must be (N, {size}, {size}), got {digits.shape}.")
  if digits.dtype != np.uint8:
    raise ValueError(
      f"digits must be uint8 grey values 0..255 (as load_mnist returns them), got "
      f"{digits.dtype}; for floats in [0, 1] pass (digits * 255).round().astype(np.uint8)."
    )
  if isinstance(photos, np.ndarray):
    photos = list(photos) if photos.ndim == 4 else [photos]
  photos = [np.asarray(p) for p in photos]
  if not photos:
    raise ValueError("photos is empty: pass colour photographs (see load_photos).")
  for i, p in enumerate(photos):
    if p.ndim != 3 or p.shape[2] not in (3, 4) or p.dtype != np.uint8:
      raise ValueError(
        f"photo {i} is a {p.dtype} array of shape {p.shape}; each photograph must be uint8 "
        "(H, W, 3) colour (load_photos converts any image file to that)."
      )
    if min(p.shape[:2]) < size:
      raise ValueError(
        f"photo {i} is {p.shape[0]}×{p.shape[1]} pixels, smaller than the {size}×{size} "
        "patch; drop it or pass larger photographs."
      )
  rng = np.random.default_rng(seed)
  out = np.empty(digits.shape + (3,), np.uint8)
  which = rng.integers(len(photos), size=len(digits))
  for i, (digit, p) in enumerate(zip(digits, which, strict=True)):
    photo = photos[p]
    r = rng.integers(photo.shape[0] - size + 1)
    c = rng.integers(photo.shape[1] - size + 1)
    patch = photo[r : r + size, c : c + size, :3].astype(np.int16)
    out[i] = np.abs(patch - digit[:, :, None].astype(np.int16)).astype(np.uint8)
  return out
