"""The papers' problems as reusable definitions: objective, domain, known solution.

Modules: ``surfaces``, ``gan_mog``, ``privacy``, ``domain_adaptation``, ``adversarial``,
``denoising``, ``poisoning``, ``fewshot``, ``games``. Each is imported on first use, so
``kbeam_jax.tasks.surfaces`` works after ``import kbeam_jax`` and ``from kbeam_jax.tasks
import poisoning`` as usual.
"""

import importlib

_MODULES = (
  "adversarial",
  "denoising",
  "domain_adaptation",
  "fewshot",
  "gan_mog",
  "games",
  "poisoning",
  "privacy",
  "surfaces",
)


def __getattr__(name: str):
  if name in _MODULES:
    return importlib.import_module(f"{__name__}.{name}")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_MODULES))
