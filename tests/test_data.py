"""Loaders on tiny files written in the real formats; never the network."""

import gzip

import jax
import numpy as np
import pytest

from kbeam_jax import data


def write_idx(path, array, compress):
  codes = {np.uint8: 0x08, np.int32: 0x0C}
  header = bytes([0, 0, codes[array.dtype.type], array.ndim])
  header += b"".join(int(n).to_bytes(4, "big") for n in array.shape)
  body = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
  path.write_bytes(gzip.compress(body) if compress else body)


def fake_mnist(root, n, split="train", compress=True):
  folder = root / "mnist"
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
  labels = rng.integers(0, 10, n, dtype=np.uint8)
  prefix = "train" if split == "train" else "t10k"
  suffix = ".gz" if compress else ""
  write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images, compress)
  write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels, compress)
  return images, labels


@pytest.mark.parametrize("compress", [True, False])
def test_mnist_count_comes_from_the_header(tmp_path, compress):
  images, labels = fake_mnist(tmp_path, 7, compress=compress)
  m = data.load_mnist("train", tmp_path)
  assert m.images.shape == (7, 28, 28) and m.images.dtype == np.uint8
  np.testing.assert_array_equal(m.images, images)
  np.testing.assert_array_equal(m.labels, labels)


def test_idx_other_dtypes_and_bad_files(tmp_path):
  x = np.arange(6, dtype=np.int32).reshape(3, 2) - 3
  write_idx(tmp_path / "a", x, compress=False)
  np.testing.assert_array_equal(data.read_idx(tmp_path / "a"), x)
  (tmp_path / "b").write_bytes(b"PK\x03\x04junk")
  with pytest.raises(ValueError, match="not an IDX file"):
    data.read_idx(tmp_path / "b")
  (tmp_path / "c").write_bytes(bytes([0, 0, 8, 1]) + (5).to_bytes(4, "big") + b"abc")
  with pytest.raises(ValueError, match="5 bytes"):
    data.read_idx(tmp_path / "c")


def test_data_dir_order_and_missing_file_message(tmp_path, monkeypatch):
  fake_mnist(tmp_path / "env", 3, split="test")
  monkeypatch.setenv("KBEAM_JAX_DATA", str(tmp_path / "env"))
  assert data.load_mnist("test").images.shape[0] == 3  # from the environment variable
  assert data.data_dirs()[0] == tmp_path / "env"
  with pytest.raises(FileNotFoundError) as err:
    data.load_mnist("test", tmp_path / "nowhere")
  message = str(err.value)
  assert "t10k-images-idx3-ubyte" in message and str(tmp_path / "nowhere") in message
  assert "KBEAM_JAX_DATA" in message
  with pytest.raises(ValueError, match="'train' or 'test'"):
    data.load_mnist("validation", tmp_path)


def test_genki_reads_a_mat_file(tmp_path):
  scipy_io = pytest.importorskip("scipy.io")
  (tmp_path / "genki").mkdir()
  rng = np.random.default_rng(0)
  mat = {"Xtrain": rng.random((256, 6)), "Xtest": rng.random((256, 4))}
  mat |= {"y1_train": np.array([[1, 2, 1, 2, 1, 2]], np.uint8), "y1_test": np.array([[2, 2, 1, 1]])}
  mat |= {"y2_train": np.array([[2, 2, 2, 1, 1, 1]], np.uint8), "y2_test": np.array([[1, 2, 1, 2]])}
  scipy_io.savemat(tmp_path / "genki" / "genki.mat", mat)
  g = data.load_genki(tmp_path)
  assert g.x_train.shape == (6, 256) and g.x_test.shape == (4, 256)
  np.testing.assert_allclose(g.x_train, mat["Xtrain"].T, rtol=1e-6)
  np.testing.assert_array_equal(g.expression_train, [0, 1, 0, 1, 0, 1])
  np.testing.assert_array_equal(g.gender_test, [0, 1, 0, 1])
  scipy_io.savemat(tmp_path / "genki" / "genki.mat", {"Xtrain": mat["Xtrain"]})
  with pytest.raises(ValueError, match="lacks the keys"):
    data.load_genki(tmp_path)


def test_mnist_m_blends_digit_and_patch():
  rng = np.random.default_rng(1)
  photo = rng.integers(0, 256, (50, 60, 3), dtype=np.uint8)
  digits = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
  out = data.mnist_m(digits, [photo], seed=3)
  assert out.shape == (5, 28, 28, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out, data.mnist_m(digits, [photo], seed=3))  # seeded
  # every output is |patch - digit| for some patch of the photograph
  d = digits[0].astype(int)[..., None]
  found = any(
    np.array_equal(out[0], np.abs(photo[r : r + 28, c : c + 28].astype(int) - d))
    for r in range(50 - 27)
    for c in range(60 - 27)
  )
  assert found
  with pytest.raises(ValueError, match="at least 28"):
    data.mnist_m(digits, [photo[:10, :10]])
  with pytest.raises(ValueError, match=r"\(N, 28, 28\)"):
    data.mnist_m(digits[0], [photo])


def test_photos_from_a_directory(tmp_path):
  from PIL import Image

  Image.fromarray(np.full((30, 40, 3), 7, np.uint8)).save(tmp_path / "a.png")
  photos = data.load_photos(tmp_path)
  assert len(photos) == 1 and photos[0].shape == (30, 40, 3)
  with pytest.raises(FileNotFoundError, match="no images"):
    data.load_photos(tmp_path / "a_missing_dir_is_empty")


def test_mog_samples_sit_on_the_seven_modes():
  x = np.asarray(data.sample_mog(jax.random.key(0), 7000))
  centers = np.asarray(data.mog_centers())
  assert centers.shape == (7, 2)
  np.testing.assert_allclose(np.linalg.norm(centers, axis=1), 1.0, rtol=1e-6)
  nearest = np.argmin(np.linalg.norm(x[:, None] - centers[None], axis=-1), axis=1)
  assert np.max(np.linalg.norm(x - centers[nearest], axis=-1)) < 0.06  # 6 std
  counts = np.bincount(nearest, minlength=7)
  assert counts.min() > 800  # about 1000 each
  assert not np.any(
    np.linalg.norm(x - np.array([np.sin(7 * np.pi / 4), np.cos(7 * np.pi / 4)]), axis=-1) < 0.5
  )  # the eighth position is empty
