"""Data loaders and samplers. No network: files come from ``data_dir``, else
``$KBEAM_JAX_DATA``, else ``~/.cache/kbeam_jax``; a missing file says where it looked."""

from kbeam_jax.data._genki import Genki as Genki
from kbeam_jax.data._genki import load_genki as load_genki
from kbeam_jax.data._mnist import MNIST as MNIST
from kbeam_jax.data._mnist import load_mnist as load_mnist
from kbeam_jax.data._mnist import read_idx as read_idx
from kbeam_jax.data._mnistm import load_photos as load_photos
from kbeam_jax.data._mnistm import mnist_m as mnist_m
from kbeam_jax.data._mog import mog_centers as mog_centers
from kbeam_jax.data._mog import sample_mog as sample_mog
from kbeam_jax.data._omniglot import load_omniglot as load_omniglot
from kbeam_jax.data._paths import data_dirs as data_dirs
from kbeam_jax.data._paths import find_file as find_file

__all__ = [
  "MNIST",
  "Genki",
  "data_dirs",
  "find_file",
  "load_genki",
  "load_mnist",
  "load_omniglot",
  "load_photos",
  "mnist_m",
  "mog_centers",
  "read_idx",
  "sample_mog",
]
