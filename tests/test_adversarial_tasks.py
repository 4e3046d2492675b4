"""The adversarial tasks (GAN on a MoG, minimax filter, domain adaptation) on tiny data,
and the benchmark drivers' stop-and-resume guarantee."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import kbeam_jax
from benchmarks import domain_adaptation as da_bench
from benchmarks import gan_mog as gan_bench
from benchmarks import privacy as privacy_bench
from kbeam_jax import data, minimax, nn
from kbeam_jax.tasks import domain_adaptation as da
from kbeam_jax.tasks import gan_mog, privacy

# --- GAN on a mixture of Gaussians -------------------------------------------------------


def test_gan_models_and_objective_value():
  g_def, u = nnx.split(gan_mog.Generator(nnx.Rngs(0)), nnx.Param)
  d_def, v = nnx.split(gan_mog.Discriminator(nnx.Rngs(1)), nnx.Param)
  z = gan_mog.sample_noise(jax.random.key(2), 16)
  assert z.shape == (16, 256)
  assert nnx.merge(g_def, u)(z).shape == (16, 2)
  # A discriminator whose logits are all 0 says D = 1/2 everywhere: f = 2 log(1/2).
  v0 = jax.tree.map(jnp.zeros_like, nnx.as_pure(v))
  f = gan_mog.objective(g_def, d_def)
  x = data.sample_mog(jax.random.key(3), 16)
  np.testing.assert_allclose(f(nnx.as_pure(u), v0, x, z), 2 * np.log(0.5), rtol=1e-6)
  # A discriminator that rates real points higher raises the value (it is the maximizer).
  d = nnx.merge(d_def, v)
  manual = jnp.mean(jnp.log(jax.nn.sigmoid(d(x)))) + jnp.mean(
    jnp.log(1 - jax.nn.sigmoid(d(nnx.merge(g_def, u)(z))))
  )
  np.testing.assert_allclose(f(nnx.as_pure(u), nnx.as_pure(v), x, z), manual, rtol=1e-5)


def test_histogram_jsd_and_mode_stats():
  x = data.sample_mog(jax.random.key(0), 5000)
  counts = gan_mog.histogram(x)
  assert counts.shape == (20, 20) and int(counts.sum()) == 5000  # all inside [-2, 2]²
  assert int(gan_mog.histogram(jnp.array([[3.0, 0.0], [0.0, -2.5]])).sum()) == 0
  np.testing.assert_allclose(gan_mog.jsd(x, x), 0.0, atol=1e-7)
  far = jnp.full((5000, 2), 1.9)
  assert 0.5 < float(gan_mog.jsd(x, far)) <= np.log(2)
  modes, quality = gan_mog.mode_stats(x)
  assert int(modes) == 7 and float(quality) > 0.97  # 3 std holds 98.9% of a 2D Gaussian
  modes, quality = gan_mog.mode_stats(jnp.zeros((100, 2)))  # the centre: no mode
  assert int(modes) == 0 and float(quality) == 0.0
  one_mode = jnp.tile(data.mog_centers()[2:3], (100, 1))
  modes, quality = gan_mog.mode_stats(one_mode)
  assert int(modes) == 1 and float(quality) == 1.0


def test_gan_benchmark_resumes_to_the_same_numbers(tmp_path):
  """A run stopped after one chunk and resumed ends where a straight run ends."""
  opts = dict(trials=2, num_iters=20, eval_every=10, seed=0)
  straight = gan_bench.run_method("kbeam_2", **opts)
  ckpt = tmp_path / "gan_checkpoint"
  first = gan_bench.run_method("kbeam_2", **opts, checkpoint=ckpt, stop_after=1)
  assert len(first["jsd"]) == 2  # the initial evaluation and one chunk
  resumed = gan_bench.run_method("kbeam_2", **opts, checkpoint=ckpt, resume=True)
  assert len(resumed["jsd"]) == 3
  np.testing.assert_array_equal(resumed["jsd"], straight["jsd"])
  np.testing.assert_array_equal(resumed["modes"], straight["modes"])
  for a, b in zip(
    jax.tree.leaves(resumed["final_u"]), jax.tree.leaves(straight["final_u"]), strict=True
  ):
    np.testing.assert_array_equal(a, b)


def test_gan_report_says_when_a_run_is_too_short_to_rank_the_methods():
  record = dict(
    method="kbeam_5", jsd=[[0.4, 0.5], [0.1, 0.2]], modes=[[3, 4], [4, 4]],
    quality=[[0.1, 0.2], [0.2, 0.3]], iterations=[0, 8000], ms_per_iter_per_trial=3.0,
  )  # fmt: skip
  meta = dict(trials=2, num_iters=8000, seed=0, eval_every=2000, environment=dict(device="cpu"))
  assert "--iters 10000" in gan_bench.report([record], meta)
  assert "--iters 10000" not in gan_bench.report([record], meta | dict(num_iters=50_000))


def test_gan_benchmark_methods_and_errors():
  for name, method in gan_bench.METHODS.items():
    assert isinstance(gan_bench.make_solver(name), kbeam_jax.Solver)
    assert method.stacked == name.startswith("kbeam")
  assert [gan_bench.METHODS[f"kbeam_{K}"].num_discriminators for K in (1, 5)] == [1, 5]
  with pytest.raises(KeyError, match="unknown method"):
    gan_bench.make_solver("kbeam")
  with pytest.raises(ValueError, match="multiple of"):
    gan_bench.run_method("kbeam_1", trials=1, num_iters=15, eval_every=10, seed=0)


# --- The minimax filter ----------------------------------------------------------------


def tiny_faces(n=120, seed=0):
  """256-dim features spanning 16 latent dimensions (few samples cannot be overfitted);
  expression is latent coordinate 0's sign, gender coordinate 1's."""
  latent = jax.random.normal(jax.random.key(seed), (n, 16))
  basis = jnp.linalg.qr(jax.random.normal(jax.random.key(99), (256, 16)))[0]
  x = latent @ basis.T
  return x, (latent[:, 0] > 0).astype(jnp.int32), (latent[:, 1] > 0).astype(jnp.int32)


def test_privacy_objective_matches_its_definition():
  fdef, filt = nnx.split(privacy.LinearFilter(256, 10, nnx.Rngs(0)), nnx.Param)
  cdef, w = nnx.split(privacy.LogisticRegression(10, 2, nnx.Rngs(1)), nnx.Param)
  _, v = nnx.split(privacy.LogisticRegression(10, 2, nnx.Rngs(2)), nnx.Param)
  x, y_u, y_p = tiny_faces()
  u = {"filter": filt, "utility": w}
  z = nnx.merge(fdef, filt)(x)
  ce = lambda p, y: privacy.cross_entropy(nnx.merge(cdef, p)(z), y)
  l2 = 1e-3
  expected = -(ce(v, y_p) + 0.5 * l2 * privacy.sq_norm(v)) + 3.0 * (
    ce(w, y_u) + 0.5 * l2 * privacy.sq_norm(w)
  )
  f = privacy.objective(fdef, cdef, rho=3.0, l2=l2)
  np.testing.assert_allclose(f(u, v, x, y_u, y_p), expected, rtol=1e-6)
  assert z.shape == (120, 10)
  with pytest.raises(ValueError, match="rho"):
    privacy.objective(fdef, cdef, rho=-1.0)


def test_baseline_filters_and_retrained_accuracy():
  x, y_u, y_p = tiny_faces(400)
  P = privacy.pca_filter(x, 10)
  assert P.shape == (256, 10)
  np.testing.assert_allclose(P.T @ P, np.eye(10), atol=1e-4)  # orthonormal directions
  R = privacy.random_filter(jax.random.key(0), 256, 10)
  assert R.shape == (256, 10)
  # Features holding coordinates 0 and 1 predict both labels; without them, chance.
  acc = lambda z, y: float(privacy.retrain_accuracy(z[:300], y[:300], z[300:], y[300:]))
  assert acc(x, y_u) > 0.85 and acc(x, y_p) > 0.85
  basis = jnp.linalg.qr(jax.random.normal(jax.random.key(99), (256, 16)))[0]
  assert acc(x @ basis[:, 2:], y_u) < 0.7  # the latent coordinates 0 and 1 projected out
  z = x
  mlp = privacy.retrain_mlp_accuracy(z[:300], y_p[:300], z[300:], y_p[300:], jax.random.key(1))
  assert float(mlp) > 0.75


@pytest.mark.parametrize("solver_name", ["kbeam", "kiwiel"])
def test_filter_training_hides_the_private_label(solver_name):
  """A few hundred steps on tiny data: the adversary's retrained accuracy drops to near
  chance while the utility label stays predictable."""
  x, y_u, y_p = tiny_faces(600, seed=1)
  d = {"x_train": x[:400], "expression_train": y_u[:400], "gender_train": y_p[:400]}
  features, info = privacy_bench.train_filter("linear", solver_name, 10.0, 0, d, 1000)
  assert len(info["history"]) == 2  # two checkpointed blocks of 500
  z_train, z_test = features(x[:400]), features(x[400:])
  gender = float(privacy.retrain_accuracy(z_train, y_p[:400], z_test, y_p[400:]))
  expression = float(privacy.retrain_accuracy(z_train, y_u[:400], z_test, y_u[400:]))
  assert expression > 0.8, expression
  assert gender < 0.7, gender


# --- Domain adaptation -----------------------------------------------------------------


def test_conv_matches_flax_conv():
  x = jax.random.normal(jax.random.key(0), (2, 12, 12, 3))
  ours = nn.Conv(3, 5, (5, 5), rngs=nnx.Rngs(1))
  ref = nnx.Conv(3, 5, (5, 5), padding="VALID", rngs=nnx.Rngs(1))
  np.testing.assert_allclose(ours(x), ref(x), atol=1e-5)
  np.testing.assert_allclose(ours.kernel[...], ref.kernel[...])  # same initialization
  k = jax.random.normal(jax.random.key(2), (3, 3, 3, 4))
  strided = jax.lax.conv_general_dilated(
    x, k, (2, 2), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  np.testing.assert_allclose(nn.conv2d(x, k, stride=2), strided, atol=1e-5)
  pooled = nn.max_pool2(jnp.arange(16.0).reshape(1, 4, 4, 1))
  np.testing.assert_array_equal(pooled[0, :, :, 0], [[5, 7], [13, 15]])
  with pytest.raises(ValueError, match="kernel"):
    nn.conv2d(x, jnp.ones((3, 3, 2, 4)))


def test_domain_adaptation_models_and_objective():
  u = da.init_leader(jax.random.key(0))
  _, v = nnx.split(da.DomainClassifier(nnx.Rngs(1)), nnx.Param)
  v = nnx.as_pure(v)
  fdef, cdef, ddef = da.graphdefs()
  x_s = jnp.asarray(da.to_rgb(np.zeros((4, 28, 28), np.uint8)))
  x_t = jnp.asarray(da.to_rgb(np.full((4, 28, 28, 3), 255, np.uint8)))
  assert x_s.shape == (4, 28, 28, 3) and float(x_s.max()) == -0.5 and float(x_t.min()) == 0.5
  h = nnx.merge(fdef, u["features"])(x_s)
  assert h.shape == (4, da.FEATURES) == (4, 768)
  y = jnp.arange(4)
  value = da.objective()(u, v, x_s, y, x_t)
  D = nnx.merge(ddef, v)
  ce = lambda logits, label: privacy.cross_entropy(logits, jnp.full(4, label))
  h_t = nnx.merge(fdef, u["features"])(x_t)
  expected = da.classification_loss()(u, x_s, y) - 0.5 * ce(D(h), 0) - 0.5 * ce(D(h_t), 1)
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  assert 0.0 <= da.accuracy(u, np.asarray(x_s), np.arange(4), batch=3) <= 1.0


def test_domain_adaptation_kbeam_steps_learn_the_source_labels():
  """K = 2 domain classifiers as beams; a few steps lower the label loss on a tiny set."""
  rng = np.random.default_rng(0)
  digits = rng.integers(0, 256, (8, 28, 28), dtype=np.uint8)
  photos = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)]
  x_s = jnp.asarray(da.to_rgb(digits))
  x_t = jnp.asarray(da.to_rgb(data.mnist_m(digits, photos, seed=0)))
  y = jnp.arange(8) % 2
  opt = optax.sgd(3e-3, momentum=0.9)  # the benchmark's 1e-2 overshoots on 8 images
  solver = minimax.kbeam(da.objective(), opt, opt)
  _, beams = nn.stack_modules(da.DomainClassifier, jax.random.key(1), 2)
  state = solver.init(jax.random.key(2), da.init_leader(jax.random.key(0)), beams, 2)
  loss = da.classification_loss()
  before = float(loss(state.u, x_s, y))
  state, info = jax.jit(lambda s: kbeam_jax.run(solver.step, s, 15, x_s, y, x_t))(state)
  assert info.values.shape == (15, 2)
  assert np.all(np.isfinite(info.values))
  assert float(loss(state.u, x_s, y)) < 0.5 * before
  assert float(jnp.max(info.values[-1])) < float(jnp.max(info.values[0]))


def test_domain_adaptation_benchmark_runs_every_method_on_tiny_data():
  rng = np.random.default_rng(0)
  digits = rng.integers(0, 256, (16, 28, 28), dtype=np.uint8)
  x = da.to_rgb(digits)
  labels = (np.arange(16) % 10).astype(np.int32)
  d = {
    "x_source": x,
    "y_source": labels,
    "x_target": x,
    "y_target": labels,
    "x_source_test": x,
    "x_target_test": x,
    "y_test": labels,
  }
  for method in ("source_only", "target_only", "kbeam_2"):
    r = da_bench.run_method(method, d, num_iters=2, eval_every=1, seed=0, test_size=16)
    assert r["iterations"] == [1, 2] and len(r["target_accuracy"]) == 2
    assert all(0.0 <= a <= 1.0 for a in r["target_accuracy"] + r["source_accuracy"])
  with pytest.raises(KeyError, match="unknown method"):
    da_bench.init_state("dann", jax.random.key(0))
