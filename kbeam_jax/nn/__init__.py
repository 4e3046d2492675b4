"""Flax integration: K beams of an NNX module, ``nnx.Optimizer`` updates without gradients
and its transform state as plain arrays, a linen ``TrainState`` that forwards extra
arguments to the transform, checkpoints of solver states (orbax), and a convolution that
stays fast inside ``lax.scan`` on the CPU."""

from kbeam_jax.nn._beams import apply_beams as apply_beams
from kbeam_jax.nn._beams import stack_modules as stack_modules
from kbeam_jax.nn._beams import unstack as unstack
from kbeam_jax.nn._checkpoint import checkpoint_exists as checkpoint_exists
from kbeam_jax.nn._checkpoint import load_checkpoint as load_checkpoint
from kbeam_jax.nn._checkpoint import save_checkpoint as save_checkpoint
from kbeam_jax.nn._conv import Conv as Conv
from kbeam_jax.nn._conv import conv2d as conv2d
from kbeam_jax.nn._conv import max_pool2 as max_pool2
from kbeam_jax.nn._optimizer import optimizer_state as optimizer_state
from kbeam_jax.nn._optimizer import update_without_grads as update_without_grads
from kbeam_jax.nn._train_state import TrainState as TrainState

__all__ = [
  "Conv",
  "TrainState",
  "apply_beams",
  "checkpoint_exists",
  "conv2d",
  "load_checkpoint",
  "max_pool2",
  "optimizer_state",
  "save_checkpoint",
  "stack_modules",
  "unstack",
  "update_without_grads",
]
