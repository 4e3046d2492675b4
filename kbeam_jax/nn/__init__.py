"""Flax integration: K beams of an NNX module, a linen ``TrainState`` that forwards extra
arguments to the transform, and checkpoints of solver states."""

from kbeam_jax.nn._beams import apply_beams as apply_beams
from kbeam_jax.nn._beams import stack_modules as stack_modules
from kbeam_jax.nn._beams import unstack as unstack
from kbeam_jax.nn._checkpoint import load_checkpoint as load_checkpoint
from kbeam_jax.nn._checkpoint import save_checkpoint as save_checkpoint
from kbeam_jax.nn._train_state import TrainState as TrainState

__all__ = [
  "TrainState",
  "apply_beams",
  "load_checkpoint",
  "save_checkpoint",
  "stack_modules",
  "unstack",
]
