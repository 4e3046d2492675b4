"""Where the loaders look for files: an argument, ``KBEAM_JAX_DATA``, ``~/.cache/kbeam_jax``."""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "KBEAM_JAX_DATA"


def data_dirs(data_dir: str | os.PathLike | None = None) -> list[Path]:
  """The directories searched, in order: ``data_dir`` if given, else ``$KBEAM_JAX_DATA``
  if set, then ``~/.cache/kbeam_jax``."""
  if data_dir is not None:
    return [Path(data_dir).expanduser()]
  dirs = []
  if os.environ.get(ENV_VAR):
    dirs.append(Path(os.environ[ENV_VAR]).expanduser())
  dirs.append(Path("~/.cache/kbeam_jax").expanduser())
  return dirs


def find_file(
  names: str | list[str], subdir: str, data_dir: str | os.PathLike | None = None
) -> Path:
  """The first of ``names`` found in ``<dir>/<subdir>`` or ``<dir>`` over ``data_dirs``.

  Raises:
    FileNotFoundError: naming the file and every directory tried, and how to point the
      loader at the data.
  """
  names = [names] if isinstance(names, str) else list(names)
  tried = []
  for root in data_dirs(data_dir):
    for folder in (root / subdir, root):
      tried.append(str(folder) + ("" if folder.is_dir() else " (no such directory)"))
      for name in names:
        if (folder / name).is_file():
          return folder / name
  raise FileNotFoundError(
    f"{' or '.join(names)} not found; looked in: {', '.join(tried)}. Set {ENV_VAR} to the "
    f"folder that holds {subdir}/ (or pass data_dir=... to the loader)."
  )
