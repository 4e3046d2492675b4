"""Omniglot-format image trees: ``root/<alphabet>/<character>/*.png``, one class per character.

The layout of Lake et al.'s Omniglot release (``images_background/``,
``images_evaluation/``): every character folder is a class, its PNGs the drawings. Any
tree in this layout loads, so the same few-shot code runs on Omniglot where a user has it
and on trees a test writes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from kbeam_jax.data._paths import data_dirs


class Omniglot(NamedTuple):
  """Images, their class (character) and alphabet, and the names behind the indices.

  ``images`` ``(N, H, W)`` uint8 grey values as stored (Omniglot draws black strokes on
  white); ``labels`` ``(N,)`` int32 class index into ``characters``; ``alphabet`` ``(N,)``
  int32 index into ``alphabets``; ``characters`` ``"alphabet/character"`` per class.
  """

  images: np.ndarray
  labels: np.ndarray
  alphabet: np.ndarray
  alphabets: tuple[str, ...]
  characters: tuple[str, ...]


def _find_root(root, data_dir) -> Path:
  if root is not None:
    path = Path(root).expanduser()
    if not path.is_dir():
      raise FileNotFoundError(
        f"Omniglot root {str(path)!r} is not a directory; expected root/<alphabet>/"
        "<character>/*.png (for example the unzipped images_background/)."
      )
    return path
  tried = [d / "omniglot" for d in data_dirs(data_dir)]
  for path in tried:
    if path.is_dir():
      return path
  raise FileNotFoundError(
    f"no omniglot/ folder found; looked in: {', '.join(map(str, tried))}. Pass root=... "
    "(a folder of <alphabet>/<character>/*.png) or put the tree in <data_dir>/omniglot."
  )


def _subfolders(folder: Path) -> list[Path]:
  """Sorted subfolders, without hidden ones (``.ipynb_checkpoints``, ``.git``, ...)."""
  return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def load_omniglot(
  root: str | os.PathLike | None = None,
  *,
  image_size: int | tuple[int, int] | None = None,
  data_dir: str | os.PathLike | None = None,
) -> Omniglot:
  """Loads every ``root/<alphabet>/<character>/*.png`` as greyscale, classes in sorted order.

  Args:
    root: the tree's top folder (its subfolders are the alphabets). If omitted,
      ``<dir>/omniglot`` over ``data_dirs(data_dir)`` (``$KBEAM_JAX_DATA``, then
      ``~/.cache/kbeam_jax``).
    image_size: resize every image to ``(size, size)`` or ``(height, width)`` (bilinear);
      required when the PNGs differ in size (Omniglot's are 105 × 105, often used at 28).
    data_dir: where to look for ``omniglot/`` when ``root`` is omitted.

  Returns:
    ``Omniglot(images, labels, alphabet, alphabets, characters)``.

  Raises:
    FileNotFoundError: ``root`` is not a directory (or no ``omniglot/`` was found).
    ValueError: the tree holds no alphabet folder, an alphabet holds no character folder,
      a character folder holds no PNG, a PNG cannot be read (naming it), or the images
      differ in size and no ``image_size`` was given. Hidden folders (``.name``) are
      skipped.

  Examples:
    >>> import os, tempfile, numpy as np
    >>> from PIL import Image
    >>> from kbeam_jax import data
    >>> root = tempfile.mkdtemp()
    >>> for alphabet, character in [("Greek", "alpha"), ("Greek", "beta"), ("Runic", "a")]:
    ...   os.makedirs(os.path.join(root, alphabet, character))
    ...   for i in range(2):
    ...     Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(
    ...       os.path.join(root, alphabet, character, f"{i}.png"))
    >>> tree = data.load_omniglot(root, image_size=4)
    >>> tree.images.shape, tree.labels.tolist(), tree.alphabets
    ((6, 4, 4), [0, 0, 1, 1, 2, 2], ('Greek', 'Runic'))
    >>> tree.characters[2]
    'Runic/a'
  """
  from PIL import Image

  size = (image_size, image_size) if isinstance(image_size, int | np.integer) else image_size
  if size is not None and (
    not isinstance(size, tuple | list)
    or len(size) != 2
    or not all(isinstance(n, int | np.integer) and not isinstance(n, bool) for n in size)
    or min(size) < 1
  ):
    raise ValueError(f"image_size must be a positive int or (height, width), got {image_size!r}.")
  image_size = size
  root = _find_root(root, data_dir)
  alphabets = _subfolders(root)
  if not alphabets:
    raise ValueError(
      f"{root} holds no alphabet folders; expected root/<alphabet>/<character>/*.png."
    )
  images, labels, alphabet_of, characters = [], [], [], []
  for a, alphabet in enumerate(alphabets):
    folders = _subfolders(alphabet)
    if not folders:
      raise ValueError(f"alphabet folder {alphabet} holds no character folders.")
    for folder in folders:
      files = sorted(folder.glob("*.png"))
      if not files:
        raise ValueError(f"character folder {folder} holds no .png files.")
      for file in files:
        try:
          with Image.open(file) as img:
            img = img.convert("L")
            if image_size is not None:
              img = img.resize((image_size[1], image_size[0]), Image.Resampling.BILINEAR)
            images.append(np.asarray(img, np.uint8))
        except (OSError, ValueError) as e:  # PIL: unidentified, truncated or damaged files
          raise ValueError(
            f"cannot read the image {file} ({type(e).__name__}: {e}); it is damaged or not a "
            "PNG. Remove or replace it."
          ) from e
        labels.append(len(characters))
        alphabet_of.append(a)
      characters.append(f"{alphabet.name}/{folder.name}")
  shapes = sorted({im.shape for im in images})
  if len(shapes) > 1:
    raise ValueError(
      f"the PNGs under {root} differ in size ({shapes[0]} ... {shapes[-1]}); pass "
      "image_size=... to resize them to one size."
    )
  return Omniglot(
    images=np.stack(images),
    labels=np.asarray(labels, np.int32),
    alphabet=np.asarray(alphabet_of, np.int32),
    alphabets=tuple(p.name for p in alphabets),
    characters=tuple(characters),
  )
