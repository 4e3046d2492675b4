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
  with pytest.raises(ValueError, match="smaller than the 28×28 patch"):
    data.mnist_m(digits, [photo[:10, :10]])
  with pytest.raises(ValueError, match=r"\(N, 28, 28\)"):
    data.mnist_m(digits[0], [photo])


def test_photos_from_a_directory(tmp_path):
  from PIL import Image

  Image.fromarray(np.full((30, 40, 3), 7, np.uint8)).save(tmp_path / "a.png")
  photos = data.load_photos(tmp_path)
  assert len(photos) == 1 and photos[0].shape == (30, 40, 3)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    data.load_photos(tmp_path / "a_missing_dir")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no images"):
    data.load_photos(tmp_path / "empty")


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


# --- bad files: every case names the file, the problem and the fix -------------------------


def idx_bytes(array, code=0x08):
  header = bytes([0, 0, code, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
  return header + array.tobytes()


DIGITS = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)


def _header(ndim=None, count=None):
  raw = bytearray(idx_bytes(DIGITS))
  if ndim is not None:
    raw[3] = ndim
  if count is not None:
    raw[4:8] = count.to_bytes(4, "big")
  return bytes(raw)


def _truncated_gzip():
  packed = gzip.compress(idx_bytes(DIGITS))
  return packed[: len(packed) // 2]


def _bad_crc():
  packed = bytearray(gzip.compress(idx_bytes(DIGITS)))
  packed[-6] ^= 0xFF  # inside the CRC32 trailer
  return bytes(packed)


BAD_IDX = {
  "truncated gzip": (_truncated_gzip(), "truncated gzip file"),
  "damaged gzip": (_bad_crc(), "damaged gzip file .*CRC"),
  "empty": (b"", "is empty"),
  "wrong magic": (b"\x00\x01\x08\x03abcdefgh", "not an IDX file: its magic number is 00 01 08 03"),
  "web page": (b"<!DOCTYPE html><html>404</html>", "looks like a web page"),
  "zero dimensions": (_header(ndim=0), "declares 0 dimensions"),
  # one dimension too many: the first data bytes are read as a fourth size
  "wrong dimension count": (_header(ndim=4), r"4 dimensions of shape \(2, 28, 28, \d+\)"),
  # a header claiming more dimensions than the file has bytes used to give an empty array
  "header cut short": (bytes([0, 0, 8, 3]) + (2).to_bytes(4, "big"), "need 16 header bytes"),
  "count too large": (
    _header(count=3),
    r"shape \(3, 28, 28\) .* 1,568 bytes follow: the file is truncated",
  ),
  "extra bytes": (idx_bytes(DIGITS) + b"xx", "has extra bytes"),
}


@pytest.mark.parametrize("case", sorted(BAD_IDX))
def test_bad_idx_files_name_the_file_problem_and_fix(tmp_path, case):
  raw, problem = BAD_IDX[case]
  path = tmp_path / "train-images-idx3-ubyte.gz"
  path.write_bytes(raw)
  with pytest.raises(ValueError, match=problem) as err:
    data.read_idx(path)
  assert str(path) in str(err.value) and "Copy" in str(err.value)


def test_load_mnist_checks_what_the_files_hold(tmp_path):
  folder = tmp_path / "mnist"
  folder.mkdir()
  images, labels = folder / "train-images-idx3-ubyte", folder / "train-labels-idx1-ubyte"
  images.write_bytes(idx_bytes(np.zeros(2, np.uint8)))  # the two files swapped
  labels.write_bytes(idx_bytes(DIGITS))
  with pytest.raises(ValueError, match="images and labels files swapped"):
    data.load_mnist("train", tmp_path)
  images.write_bytes(idx_bytes(DIGITS))
  labels.write_bytes(idx_bytes(np.zeros(3, np.uint8)))
  with pytest.raises(ValueError, match="2 images in .* but 3 labels in .*labels-idx1"):
    data.load_mnist("train", tmp_path)
  labels.write_bytes(idx_bytes(np.array([1, 200], np.uint8)))
  with pytest.raises(ValueError, match="labels up to 200"):
    data.load_mnist("train", tmp_path)
  labels.write_bytes(idx_bytes(np.array([1, 2], np.uint8)))
  assert data.load_mnist("train", tmp_path).labels.tolist() == [1, 2]
  # a missing file says which directories were tried, and which do not exist
  with pytest.raises(FileNotFoundError, match="nowhere/mnist \\(no such directory\\)"):
    data.load_mnist("train", tmp_path / "nowhere")


def _genki(rng):
  return {
    "Xtrain": rng.random((256, 4)),
    "Xtest": rng.random((256, 2)),
    "y1_train": np.array([[1, 2, 1, 2]]),
    "y2_train": np.array([[1, 1, 2, 2]]),
    "y1_test": np.array([[1, 2]]),
    "y2_test": np.array([[2, 1]]),
  }


def test_genki_bad_files(tmp_path):
  scipy_io = pytest.importorskip("scipy.io")
  (tmp_path / "genki").mkdir()
  path = tmp_path / "genki" / "genki.mat"
  good = _genki(np.random.default_rng(0))
  scipy_io.savemat(path, good)
  raw = path.read_bytes()
  v73 = b"MATLAB 7.3 MAT-file".ljust(116) + bytes(8) + b"\x00\x02IM" + b"\x89HDF\r\n\x1a\n"
  bad_bytes = {
    "truncated": (raw[: len(raw) // 2], "not a readable MATLAB file"),
    "corrupt": (bytes(50) + b"garbage" * 30, "not a readable MATLAB file"),
    "empty": (b"", "not a readable MATLAB file"),
    "v7.3": (v73 + bytes(100), "MATLAB v7.3 .*-v7"),
  }
  for raw_bad, problem in bad_bytes.values():
    path.write_bytes(raw_bad)
    with pytest.raises(ValueError, match=problem) as err:
      data.load_genki(tmp_path)
    assert str(path) in str(err.value)
  bad_arrays = {
    "transposed": ({"Xtrain": good["Xtrain"].T}, "y1_train has shape .* faces × features"),
    "labels 0/1": ({"y1_train": np.array([[0, 1, 0, 1]])}, "labels \\[0, 1\\]; .* 1 and 2"),
    "NaN": ({"Xtest": np.full((256, 2), np.nan)}, "Xtest holds 512 NaN"),
    "text": ({"Xtest": "abc"}, "Xtest must be a numeric matrix"),
  }
  for change, problem in bad_arrays.values():
    scipy_io.savemat(path, {**good, **change})
    with pytest.raises(ValueError, match=problem) as err:
      data.load_genki(tmp_path)
    assert str(path) in str(err.value)


def test_photos_and_mnist_m_bad_inputs(tmp_path):
  from PIL import Image

  (tmp_path / "p").mkdir()
  (tmp_path / "p" / "x.jpg").write_bytes(b"garbage")
  with pytest.raises(ValueError, match="cannot read the image .*x.jpg"):
    data.load_photos(tmp_path / "p")
  Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "p" / "x.jpg")
  raw = (tmp_path / "p" / "x.jpg").read_bytes()
  (tmp_path / "p" / "x.jpg").write_bytes(raw[: len(raw) // 2])  # truncated JPEG
  with pytest.raises(ValueError, match="cannot read the image .*x.jpg.*Remove or replace"):
    data.load_photos(tmp_path / "p")
  (tmp_path / "file.png").write_bytes(b"")
  with pytest.raises(FileNotFoundError, match="is a file"):
    data.load_photos(tmp_path / "file.png")
  photo = np.zeros((40, 40, 3), np.uint8)
  with pytest.raises(ValueError, match="digits must be uint8 .* 255"):
    data.mnist_m(DIGITS / 255.0, [photo])  # floats in [0, 1] used to blend as zeros
  with pytest.raises(ValueError, match=r"photo 1 is a uint8 array of shape \(40, 40\)"):
    data.mnist_m(DIGITS, [photo, photo[..., 0]])  # a grey photo used to be dropped silently
  with pytest.raises(ValueError, match="photo 0 is a float64"):
    data.mnist_m(DIGITS, [photo / 255.0])
  with pytest.raises(ValueError, match="photos is empty"):
    data.mnist_m(DIGITS, [])
  with pytest.raises(ValueError, match="seed must be an int >= 0"):
    data.mnist_m(DIGITS, [photo], seed=-1)


def test_omniglot_bad_files_and_arguments(tmp_path):
  from PIL import Image

  folder = tmp_path / "Greek" / "alpha"
  folder.mkdir(parents=True)
  (folder / "0.png").write_bytes(b"\x89PNG\r\n\x1a\ngarbage")
  with pytest.raises(ValueError, match="cannot read the image .*0.png"):
    data.load_omniglot(tmp_path)
  Image.fromarray(np.zeros((4, 4), np.uint8)).save(folder / "0.png")
  (tmp_path / ".ipynb_checkpoints").mkdir()  # hidden folders are not alphabets
  assert data.load_omniglot(tmp_path).alphabets == ("Greek",)
  for size in (2.5, "28", (3, 0), (True, 2)):
    with pytest.raises(ValueError, match="image_size must be a positive int"):
      data.load_omniglot(tmp_path, image_size=size)


def test_mog_arguments():
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="n must be >= 0"):
    data.sample_mog(key, -1)
  with pytest.raises(ValueError, match="num_modes must be in 1..8"):
    data.sample_mog(key, 5, num_modes=9)  # a ninth mode would sit on the first
  with pytest.raises(ValueError, match="num_modes must be in 1..8"):
    data.mog_centers(0)
  with pytest.raises(ValueError, match="std must be a finite number"):
    data.sample_mog(key, 5, std=float("nan"))
  with pytest.raises(TypeError, match="n must be a Python int"):
    data.sample_mog(key, 2.5)
