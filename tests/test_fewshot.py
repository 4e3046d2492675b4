"""Few-shot task (samplers, objectives, metrics), its benchmark's training loop at a tiny
size, and the Omniglot-format loader on trees written here."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import kbeam_jax
from benchmarks import fewshot as bench
from kbeam_jax import bilevel, data
from kbeam_jax.tasks import fewshot

# --- Omniglot-format loader -------------------------------------------------------------


def write_tree(root, layout, size=(6, 6)):
  """``layout``: {alphabet: {character: number of PNGs}}; pixel value = running index."""
  i = 0
  for alphabet, characters in layout.items():
    for character, count in characters.items():
      folder = root / alphabet / character
      folder.mkdir(parents=True)
      for j in range(count):
        Image.fromarray(np.full(size, i, np.uint8)).save(folder / f"{j:02d}.png")
        i += 1


def test_omniglot_loader_reads_the_tree(tmp_path):
  write_tree(tmp_path, {"Latin": {"b": 2, "a": 3}, "Greek": {"pi": 1}})
  tree = data.load_omniglot(tmp_path)
  assert tree.alphabets == ("Greek", "Latin")
  assert tree.characters == ("Greek/pi", "Latin/a", "Latin/b")
  assert tree.images.shape == (6, 6, 6) and tree.images.dtype == np.uint8
  assert tree.labels.tolist() == [0, 1, 1, 1, 2, 2]
  assert tree.alphabet.tolist() == [0, 1, 1, 1, 1, 1]
  # files in sorted order: Greek/pi was written last (index 5), Latin/a as 2, 3, 4
  assert tree.images[:, 0, 0].tolist() == [5, 2, 3, 4, 0, 1]


def test_omniglot_loader_resizes_and_finds_the_data_dir(tmp_path):
  write_tree(tmp_path / "omniglot", {"A": {"x": 1}})
  write_tree(tmp_path / "omniglot", {"B": {"y": 1}}, size=(10, 8))
  with pytest.raises(ValueError, match="differ in size"):
    data.load_omniglot(data_dir=tmp_path)
  tree = data.load_omniglot(data_dir=tmp_path, image_size=(4, 5))
  assert tree.images.shape == (2, 4, 5)


def test_omniglot_loader_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a directory"):
    data.load_omniglot(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="no omniglot/ folder"):
    data.load_omniglot(data_dir=tmp_path)
  with pytest.raises(ValueError, match="no alphabet folders"):
    data.load_omniglot(tmp_path)
  (tmp_path / "Latin").mkdir()
  with pytest.raises(ValueError, match="no character folders"):
    data.load_omniglot(tmp_path)
  (tmp_path / "Latin" / "a").mkdir()
  with pytest.raises(ValueError, match="no .png files"):
    data.load_omniglot(tmp_path)
  with pytest.raises(ValueError, match="image_size"):
    data.load_omniglot(tmp_path, image_size=0)


# --- samplers -----------------------------------------------------------------------------


def test_class_pool_rotations_are_new_classes():
  images = np.arange(5 * 9, dtype=np.uint8).reshape(5, 3, 3)
  pool = fewshot.class_pool(images, np.array([1, 0, 1, 1, 0]), [1, 0], rotations=4)
  assert pool.images.shape == (8, 2, 3, 3)  # 2 labels x 4 rotations, 2 images each
  assert pool.names[:5] == ("1@0", "1@90", "1@180", "1@270", "0@0")
  np.testing.assert_array_equal(pool.images[0, 1], images[2])
  np.testing.assert_array_equal(pool.images[1, 1], np.rot90(images[2]))
  np.testing.assert_array_equal(pool.images[6, 0], np.rot90(images[1], 2))


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(classes=[7]), "no images with label"),
    (dict(classes=[0], rotations=5), "rotations must be 1 to 4"),
    (dict(classes=[0], per_class=9), "per_class=9"),
    (dict(classes=[]), "classes is empty"),
  ],
)
def test_class_pool_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    fewshot.class_pool(np.zeros((2, 3, 3), np.uint8), np.array([0, 0]), **kwargs)


def test_classification_episodes_are_valid_and_deterministic():
  # Each image is unique: pixel (0, 0) = class, pixel (0, 1) = example index.
  pool = np.zeros((6, 8, 2, 2), np.uint8)
  pool[:, :, 0, 0] = np.arange(6)[:, None]
  pool[:, :, 0, 1] = np.arange(8)[None, :]
  kwargs = dict(num_tasks=5, n_way=3, k_shot=2, num_query=3)
  sample = jax.jit(functools.partial(fewshot.sample_classification, **kwargs))
  ep = sample(jax.random.key(3), pool)
  assert ep.support_x.shape == (5, 6, 4) and ep.query_x.shape == (5, 9, 4)
  assert ep.support_y.dtype == jnp.int32
  cls_s = np.rint(np.asarray(ep.support_x[..., 0]) * 255).astype(int)
  cls_q = np.rint(np.asarray(ep.query_x[..., 0]) * 255).astype(int)
  ex_s = np.rint(np.asarray(ep.support_x[..., 1]) * 255).astype(int)
  ex_q = np.rint(np.asarray(ep.query_x[..., 1]) * 255).astype(int)
  for b in range(5):
    label_to_class = {}
    labels = ep.support_y[b].tolist() + ep.query_y[b].tolist()
    for y, c in zip(labels, [*cls_s[b], *cls_q[b]], strict=True):
      assert label_to_class.setdefault(y, c) == c  # one class per label
    assert len(set(label_to_class.values())) == 3  # three distinct classes
    pairs = list(zip(cls_s[b], ex_s[b], strict=True)) + list(zip(cls_q[b], ex_q[b], strict=True))
    assert len(set(pairs)) == len(pairs)  # no image twice in a task
  again = sample(jax.random.key(3), pool)
  np.testing.assert_array_equal(ep.query_x, again.query_x)
  other = sample(jax.random.key(4), pool)
  assert not np.array_equal(ep.query_x, other.query_x)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(n_way=7), "needs n_way=7"),
    (dict(k_shot=5, num_query=4), "k_shot \\+ num_query = 9"),
    (dict(num_tasks=0), "num_tasks must be a positive int"),
    (dict(pool=np.zeros((6, 8, 4), np.uint8)), "pool must be"),
  ],
)
def test_classification_sampler_errors(kwargs, match):
  args = dict(pool=np.zeros((6, 8, 2, 2), np.uint8), num_tasks=2, n_way=3, k_shot=1, num_query=1)
  with pytest.raises(ValueError, match=match):
    fewshot.sample_classification(jax.random.key(0), **(args | kwargs))


def test_sinusoid_tasks_are_sinusoids():
  ep = fewshot.sample_sinusoid(jax.random.key(0), num_tasks=50, k_shot=10, num_query=20)
  x = np.concatenate([ep.support_x[..., 0], ep.query_x[..., 0]], axis=1).astype(np.float64)
  y = np.concatenate([ep.support_y, ep.query_y], axis=1).astype(np.float64)
  assert np.abs(x).max() <= 5.0
  # y = A sin(x - φ) = a sin x + b cos x: the 2-parameter least-squares fit is exact,
  # with A = |(a, b)| in [0.1, 5] and φ = atan2(-b, a) in [0, π].
  for xi, yi in zip(x, y, strict=True):
    basis = np.stack([np.sin(xi), np.cos(xi)], axis=1)
    (a, b), *_ = np.linalg.lstsq(basis, yi, rcond=None)
    np.testing.assert_allclose(basis @ [a, b], yi, atol=1e-4)
    assert 0.1 - 1e-4 <= np.hypot(a, b) <= 5.0 + 1e-4
    assert -1e-3 <= np.arctan2(-b, a) <= np.pi + 1e-3
  with pytest.raises(ValueError, match="low <= high"):
    fewshot.sample_sinusoid(jax.random.key(0), num_tasks=1, k_shot=1, num_query=1, phase=(1, 0))


# --- objectives ---------------------------------------------------------------------------


@functools.cache  # one draw (and one compilation) for the tests that share it
def tiny_classification(key=0, num_tasks=3):
  pool = np.random.default_rng(key).integers(0, 256, (6, 10, 4, 4), np.uint8)
  sample = functools.partial(
    fewshot.sample_classification, num_tasks=num_tasks, n_way=3, k_shot=2, num_query=4
  )
  return jax.jit(sample)(jax.random.key(key + 1), pool)  # compiled: cheaper than op by op


def test_objective_shapes_and_bad_input():
  ep = tiny_classification()
  u = fewshot.init_mlp(jax.random.key(0), [16, 12, 8])
  heads = fewshot.init_heads(3, 8, 3)
  f, g = (jax.jit(h) for h in fewshot.objectives("classification", l2=0.1))
  assert jnp.shape(f(u, heads, ep)) == () and jnp.shape(g(u, heads, ep)) == ()
  # zero heads: uniform predictions, the loss of each task is log(3)
  np.testing.assert_allclose(f(u, heads, ep), np.log(3.0), rtol=1e-6)
  np.testing.assert_allclose(g(u, heads, ep), 3 * np.log(3.0), rtol=1e-6)
  assert fewshot.features(u, ep.support_x, 2.0).shape == (3, 6, 8)
  with pytest.raises(ValueError, match="kind must be one of"):
    fewshot.objectives("ranking", l2=0.1)
  with pytest.raises(ValueError, match="l2 must be > 0"):
    fewshot.objectives("regression", l2=0.0)
  with pytest.raises(ValueError, match="at least one value"):
    fewshot.mean_ci95([])


def descend(g, u, heads, ep, steps, lr):
  """``steps`` plain descent steps on the heads."""
  return bilevel.argmin(g, u, heads, ep, method=bilevel.Naive(), inner_steps=steps, inner_lr=lr)


def test_lower_optimum_is_reached_regression_closed_form():
  """Descent on g reaches the ridge solution computed in closed form, task by task."""
  ep = fewshot.sample_sinusoid(jax.random.key(0), num_tasks=4, k_shot=5, num_query=5)
  u = fewshot.init_mlp(jax.random.key(1), [1, 8, 6])
  l2 = 0.05
  f, g = fewshot.objectives("regression", l2=l2)
  heads = descend(g, u, fewshot.init_heads(4, 6, 1), ep, 3000, 0.4)
  z = np.asarray(fewshot.features(u, ep.support_x), np.float64)
  for b in range(4):
    phi = np.concatenate([z[b], np.ones((5, 1))], axis=1)  # bias as a last feature
    # g_b = mean((phi θ - y)²) + (l2/2)|θ|²  =>  (2/K phiᵀphi + l2 I) θ = 2/K phiᵀ y
    theta = np.linalg.solve(2 / 5 * phi.T @ phi + l2 * np.eye(7), 2 / 5 * phi.T @ ep.support_y[b])
    np.testing.assert_allclose(heads["w"][b, :, 0], theta[:6], atol=2e-3)
    np.testing.assert_allclose(heads["b"][b, 0], theta[6], atol=2e-3)


def test_lower_optimum_is_reached_classification():
  ep = tiny_classification()
  u = fewshot.init_mlp(jax.random.key(0), [16, 12, 8])
  f, g = fewshot.objectives("classification", l2=0.1)
  heads0 = fewshot.init_heads(3, 8, 3)
  norm = lambda h: float(jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(h))))
  heads = descend(g, u, heads0, ep, 500, 1.0)
  grad0 = norm(jax.grad(g, argnums=1)(u, heads0, ep))
  assert norm(jax.grad(g, argnums=1)(u, heads, ep)) < 1e-4 * grad0
  # fit_heads on precomputed features solves the same problem
  fitted = fewshot.fit_heads(
    "classification",
    fewshot.features(u, ep.support_x),
    ep.support_y,
    num_outputs=3,
    l2=0.1,
    inner_steps=500,
    inner_lr=1.0,
  )
  np.testing.assert_allclose(fitted["w"], heads["w"], atol=1e-5)


def test_stacked_heads_give_the_mean_of_per_task_hypergradients():
  """One call on the stacked meta-batch = per-task hypergradients (vmapped), averaged."""
  ep = fewshot.sample_sinusoid(jax.random.key(2), num_tasks=3, k_shot=5, num_query=7)
  u = fewshot.init_mlp(jax.random.key(3), [1, 8, 6])
  f, g = fewshot.objectives("regression", l2=0.1)
  opts = dict(method=bilevel.ApproxGrad(30, 0.1), inner_steps=30, inner_lr=0.3)
  stacked = jax.jit(
    lambda u, ep: bilevel.hypergradient(f, g, u, fewshot.init_heads(3, 6, 1), ep, **opts).grad
  )(u, ep)

  def one(ep_i):
    ep1 = jax.tree.map(lambda a: a[None], ep_i)
    return bilevel.hypergradient(f, g, u, fewshot.init_heads(1, 6, 1), ep1, **opts).grad

  per_task = jax.jit(jax.vmap(one))(ep)
  for a, b in zip(jax.tree.leaves(stacked), jax.tree.leaves(per_task), strict=True):
    np.testing.assert_allclose(a, b.mean(axis=0), rtol=1e-4, atol=1e-6)


def test_metrics():
  ep = tiny_classification()
  u = fewshot.init_mlp(jax.random.key(0), [16, 12, 8])
  acc = fewshot.evaluate(
    "classification", u, ep, num_outputs=3, l2=0.1, inner_steps=5, inner_lr=1.0
  )
  centroid = fewshot.nearest_centroid_accuracy(u, ep, n_way=3)
  for a in (acc, centroid):
    assert a.shape == (3,) and bool(jnp.all((a >= 0) & (a <= 1)))
  # a perfect representation: the identity on one-hot inputs, one class per input
  x = jnp.tile(jnp.eye(3), (1, 2, 1))  # (1, 6, 3): classes 0, 1, 2, 0, 1, 2
  y = jnp.array([[0, 1, 2, 0, 1, 2]])
  perfect = fewshot.Episodes(x, y, x, y)
  assert float(fewshot.nearest_centroid_accuracy([], perfect, n_way=3, feature_scale=None)[0]) == 1
  head_acc = fewshot.evaluate(
    "classification", [], perfect, num_outputs=3, l2=0.01, inner_steps=100, inner_lr=1.0
  )
  assert float(head_acc[0]) == 1.0


# --- the benchmark's training loop, every method, tiny ------------------------------------


def tiny_setting(**kw):
  s = next(s for s in bench.settings(quick=True) if s.name == "sine-5shot")
  return s._replace(sizes=(1, 16, 16), meta_batch=8, upper_lr=0.01, **kw)


def upper_value(s, u, ep):
  """The upper objective at the lower solution: f(u, w*(u)) on a fixed batch of tasks."""
  f, g = fewshot.objectives(s.kind, l2=s.l2, feature_scale=s.feature_scale)
  heads0 = fewshot.init_heads(ep.support_x.shape[0], s.sizes[-1], s.num_outputs)
  heads = descend(g, u, heads0, ep, 200, s.inner_lr)
  return float(f(u, heads, ep))


@pytest.mark.parametrize("method", bench.BILEVEL + ("joint",))
def test_upper_objective_decreases_and_runs_are_deterministic(method):
  s = tiny_setting()
  held_out = fewshot.sample_sinusoid(jax.random.key(99), num_tasks=32, k_shot=5, num_query=20)
  solver = bench.METHODS[method](s)
  u0 = fewshot.init_mlp(jax.random.key(0), s.sizes)
  pool = jnp.zeros((1, 1, 1, 1), jnp.uint8)
  run = jax.jit(lambda state: kbeam_jax.run(solver.step, state, 150, pool))
  state, metrics = run(solver.init(jax.random.key(1), u0))
  assert metrics["query_loss"].shape == (150,)
  # f(u, w*(u)) on held-out tasks, measured: 5.00 -> 3.75 (gd), 3.44 (rmd), 3.21
  # (approxgrad), 2.10 (penalty), 2.91 (joint).
  before, after = upper_value(s, u0, held_out), upper_value(s, state.u, held_out)
  assert after < 0.9 * before, (before, after)
  again, _ = run(solver.init(jax.random.key(1), u0))
  for a, b in zip(jax.tree.leaves(state.u), jax.tree.leaves(again.u), strict=True):
    np.testing.assert_array_equal(a, b)


def test_run_one_record(tmp_path):
  s = tiny_setting(iterations=4, eval_tasks=10)
  dummy = jnp.zeros((1, 1, 1, 1), jnp.uint8)
  record, curve = bench.run_one(s, "gd", 0, dummy, dummy, tmp_path, chunk=2)
  assert not (tmp_path / "checkpoints").exists()  # checkpoints only with resume
  record, curve = bench.run_one(s, "gd", 0, dummy, dummy, tmp_path, chunk=2, resume=True)
  assert record["iterations"] == 4 and len(curve) == 2
  # the test curve: before training, then after each chunk; MSEs
  assert [i for i, _ in record["test_curve"]] == [0, 2, 4]
  assert all(v > 0 for _, v in record["test_curve"])
  assert record["head_mean"] > 0 and record["head_ci95"] >= 0
  assert (tmp_path / "checkpoints" / "fewshot_sine-5shot_gd_0").exists()
