"""Adversarial examples: the attacks, the network attacker, the K-beam minimax defense on a
tiny synthetic problem, and the benchmark's quick path on a synthetic MNIST stand-in."""

import gzip
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import kbeam_jax
from benchmarks import _adversarial_report as report
from benchmarks import _adversarial_training as training
from benchmarks import adversarial_defense as bench
from kbeam_jax import minimax, nn
from kbeam_jax.tasks import adversarial as adv


class LinearClassifier(nnx.Module):
  """Two logits linear in the pixels: FGSM is the exact worst case of its margin."""

  def __init__(self, rngs):
    self.out = nnx.Linear(784, 2, rngs=rngs)

  def __call__(self, x):
    return self.out(x.reshape(x.shape[0], -1))


def small_attacker(rngs):
  return adv.Attacker(rngs, hidden=16)


def graphdef(make):
  return nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(0))), nnx.Param)[0]


def params(make, seed):
  return nnx.as_pure(nnx.split(make(nnx.Rngs(seed)), nnx.Param)[1])


def two_features(key, n):
  """Labels 0/1 (sign s = ±1). Top half: 0.5 + 0.3 s plus strong pixel noise (a robust
  feature: a perturbation of 0.1 cannot flip its mean); bottom half: 0.5 + 0.05 s, noise
  free (perfectly predictive, and flipped by any perturbation of 0.1)."""
  k1, k2 = jax.random.split(key)
  y = jax.random.bernoulli(k1, 0.5, (n,)).astype(jnp.int32)
  s = (2 * y - 1).astype(jnp.float32)[:, None, None, None]
  top = 0.5 + 0.3 * s + 0.3 * jax.random.normal(k2, (n, 14, 28, 1))
  bottom = 0.5 + 0.05 * s * jnp.ones((n, 14, 28, 1))
  return jnp.clip(jnp.concatenate([top, bottom], axis=1), 0.0, 1.0), y


# --- Attacks ------------------------------------------------------------------------------


@jax.jit
def attacked_losses(u, x, y, eta):
  """Clean, FGSM and PGD-10 images and losses of the default classifier (one compile)."""
  classifier, _ = adv.graphdefs()
  logits = adv.logits_fn(classifier, u)
  x_fgsm = adv.fgsm(logits, x, y, eta)
  x_pgd = adv.pgd(logits, x, y, eta, num_steps=10, key=jax.random.key(2))
  loss = lambda z: adv.cross_entropy(logits(z), y)
  acc = lambda z: adv.accuracy(logits(z), y)
  return x_fgsm, x_pgd, (loss(x), loss(x_fgsm), loss(x_pgd)), (acc(x), acc(x_pgd))


@pytest.mark.parametrize("eta", [0.1, 0.3])
def test_fgsm_and_pgd_stay_in_the_ball_and_raise_the_loss(eta):
  u = adv.init_classifier(jax.random.key(0))
  x = jax.random.uniform(jax.random.key(1), (16, 28, 28, 1))
  x = x.at[:, :4].set(0.0).at[:, -4:].set(1.0)  # pixels at both ends of [0, 1]
  y = jnp.arange(16) % 10
  x_fgsm, x_pgd, (clean, fgsm, pgd), (acc_clean, acc_pgd) = attacked_losses(u, x, y, eta)
  for x_adv in (x_fgsm, x_pgd):
    assert x_adv.shape == x.shape
    assert float(jnp.max(jnp.abs(x_adv - x))) <= eta + 1e-6
    assert float(jnp.min(x_adv)) >= 0.0 and float(jnp.max(x_adv)) <= 1.0
  assert float(fgsm) > float(clean) + 0.1
  assert float(pgd) > float(fgsm)
  assert float(acc_pgd) <= float(acc_clean)
  # Without a random start, zero steps leave x as it is.
  logits = lambda z: z.reshape(z.shape[0], -1)[:, :10]
  np.testing.assert_array_equal(adv.pgd(logits, x, y, eta, num_steps=0), x)


def test_fgsm_on_a_linear_model_is_the_closed_form():
  """For two logits ``x·w_k``, the loss rises fastest along ``sign(w_other - w_true)``."""
  classifier = graphdef(LinearClassifier)
  u = params(LinearClassifier, 0)
  x = jnp.full((4, 28, 28, 1), 0.5)
  y = jnp.array([0, 1, 0, 1])
  w = u["out"]["kernel"]
  direction = jnp.sign(w[:, 1] - w[:, 0]).reshape(28, 28, 1)
  expected = 0.5 + 0.2 * jnp.where((y == 0)[:, None, None, None], direction, -direction)
  x_adv = adv.fgsm(adv.logits_fn(classifier, u), x, y, 0.2)
  np.testing.assert_allclose(x_adv, expected, atol=1e-6)


def test_network_attacker_is_bounded_whatever_its_weights():
  classifier, attacker = adv.graphdefs()
  v = jax.tree.map(lambda p: 100.0 * p, adv.init_attacker(jax.random.key(0)))  # saturated
  x = jax.random.uniform(jax.random.key(1), (8, 28, 28, 1))
  for eta in (0.05, 0.3, 1.0):
    x_adv = adv.attack(attacker, v, x, eta)
    assert float(jnp.max(jnp.abs(x_adv - x))) <= eta + 1e-6
    assert float(jnp.min(x_adv)) >= 0.0 and float(jnp.max(x_adv)) <= 1.0
  a = nnx.merge(attacker, v)(x)
  np.testing.assert_allclose(
    adv.attack(attacker, v, x, 0.2), np.clip(x + 0.2 * np.tanh(a), 0, 1), atol=1e-6
  )
  np.testing.assert_allclose(adv.saturation(jnp.array([1.0, -3.0, 4.0])), (1 + 4) / 3)


def test_penalty_changes_only_the_attackers_side_of_the_game():
  classifier, attacker = adv.graphdefs()
  u = adv.init_classifier(jax.random.key(0))
  v = jax.tree.map(lambda p: 5.0 * p, adv.init_attacker(jax.random.key(1)))
  x = jax.random.uniform(jax.random.key(2), (8, 28, 28, 1))
  y = jnp.arange(8)
  plain = adv.objective(classifier, attacker)
  penalized = adv.objective(classifier, attacker, penalty=0.5)
  a = nnx.merge(attacker, v)(x)
  assert float(adv.saturation(a)) > 0.0
  np.testing.assert_allclose(
    penalized(u, v, x, y, 0.3), plain(u, v, x, y, 0.3) - 0.5 * adv.saturation(a), rtol=1e-5
  )
  logits = nnx.merge(classifier, u)(adv.attack(attacker, v, x, 0.3))
  np.testing.assert_allclose(plain(u, v, x, y, 0.3), adv.cross_entropy(logits, y), rtol=1e-6)
  g_plain = jax.jit(jax.grad(plain))(u, v, x, y, 0.3)
  g_penalized = jax.jit(jax.grad(penalized))(u, v, x, y, 0.3)
  for a_leaf, b_leaf in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_penalized), strict=True):
    np.testing.assert_allclose(a_leaf, b_leaf, rtol=1e-6)


def test_bad_inputs_raise_clear_errors():
  classifier, attacker = adv.graphdefs()
  logits = adv.logits_fn(classifier, adv.init_classifier(jax.random.key(0)))
  x, y = jnp.zeros((2, 28, 28, 1)), jnp.zeros(2, jnp.int32)
  for eta in (0.0, -0.1, 1.5, float("nan")):
    with pytest.raises(ValueError, match=r"eta .* must lie in \(0, 1\]"):
      adv.fgsm(logits, x, y, eta)
  with pytest.raises(ValueError, match="eta"):
    adv.pgd(logits, x, y, 2.0)
  with pytest.raises(ValueError, match="eta"):
    adv.perturb(x, x, jnp.array([0.1, 0.2]))
  with pytest.raises(ValueError, match="num_steps must be >= 0"):
    adv.pgd(logits, x, y, 0.1, num_steps=-1)
  with pytest.raises(ValueError, match="penalty"):
    adv.objective(classifier, attacker, penalty=-1.0)
  with pytest.raises(TypeError, match="uint8"):
    adv.to_images(np.zeros((2, 28, 28), np.float32))
  with pytest.raises(ValueError, match=r"\(N, 28, 28\)"):
    adv.to_images(np.zeros((2, 28, 28, 1), np.uint8))
  with pytest.raises(ValueError, match="K .* must be >= 1"):
    nn.stack_modules(adv.Attacker, jax.random.key(0), 0)
  with pytest.raises(ValueError, match="K .* must be >= 1"):
    training.minimax_defense(0)
  with pytest.raises(TypeError, match="Defense values"):  # defenses are values, not names
    bench.check_config(bench.Config(defenses=(training.NONE, "minimax_k5")))
  with pytest.raises(ValueError, match="eta"):
    bench.check_config(bench.Config(etas=(0.1, 1.2)))
  with pytest.raises(ValueError, match="multiple of chunk"):
    bench.check_config(bench.Config(defense_steps=150, chunk=100))
  with pytest.raises(ValueError, match="pgd_test=2000 must be at most test_size=1000"):
    bench.check_config(bench.Config(pgd_test=2000, test_size=1000))
  with pytest.raises(TypeError, match="rule"):  # before the clean classifier trains
    bench.check_config(bench.Config(rule="best"))
  with pytest.raises(ValueError, match="ascent_steps"):
    bench.check_config(bench.Config(ascent_steps=0))


# --- The minimax defense --------------------------------------------------------------------


def test_kbeam_minimax_defense_improves_robustness():
  """On data with a faint noise-free feature and a strong noisy one, a classifier trained
  on clean data leans on the faint one; playing the game against K = 2 attacker networks
  for the same number of steps from the same start makes it robust to PGD."""
  x, y = two_features(jax.random.key(0), 128)
  x_test, y_test = two_features(jax.random.key(1), 256)
  classifier, attacker = graphdef(LinearClassifier), graphdef(small_attacker)
  u0 = params(LinearClassifier, 0)
  eta, steps = 0.1, 200
  loss = adv.classification_loss(classifier)
  opt = optax.adam(1e-3)

  def clean_training(u):
    def body(carry, _):
      u, s = carry
      updates, s = opt.update(jax.grad(loss)(u, x, y), s, u)
      return (optax.apply_updates(u, updates), s), None

    return jax.lax.scan(body, (u, opt.init(u)), length=steps)[0][0]

  f = adv.objective(classifier, attacker, penalty=0.1)
  solver = minimax.kbeam(f, opt, optax.adam(1e-2))
  _, beams = nn.stack_modules(small_attacker, jax.random.key(1), 2)
  state = solver.init(jax.random.key(2), u0, beams, 2)
  state, info = jax.jit(lambda s: kbeam_jax.run(solver.step, s, steps, x, y, eta))(state)
  assert info.values.shape == (steps, 2) and bool(jnp.all(jnp.isfinite(info.values)))

  @jax.jit
  def robust_accuracy(u):
    logits = adv.logits_fn(classifier, u)
    return adv.accuracy(logits(adv.pgd(logits, x_test, y_test, eta, num_steps=10)), y_test)

  clean = jax.jit(clean_training)(u0)
  assert float(adv.accuracy(adv.logits_fn(classifier, clean)(x_test), y_test)) == 1.0
  assert float(adv.accuracy(adv.logits_fn(classifier, state.u)(x_test), y_test)) == 1.0
  before, after = float(robust_accuracy(clean)), float(robust_accuracy(state.u))
  assert after > before + 0.15, (before, after)


# --- The benchmark on a synthetic MNIST stand-in -------------------------------------------


def write_idx(path, array):
  header = bytes([0, 0, 0x08, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
  path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def fake_mnist(root, n_train=64, n_test=40):
  """Digits c = a bright 8×8 square at one of ten places, on faint noise."""
  folder = root / "mnist"
  folder.mkdir(parents=True)
  rng = np.random.default_rng(0)
  for prefix, n in (("train", n_train), ("t10k", n_test)):
    labels = (np.arange(n) % 10).astype(np.uint8)
    images = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
    for i, c in enumerate(labels):
      r, col = 2 + 12 * (c // 5), 1 + 5 * (c % 5)
      images[i, r : r + 8, col : col + 8] = 230
    write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
  """One tiny run of the whole suite on a synthetic MNIST, shared by the tests below (its
  programs compile once): every defense, the paper's two-layer AttNet, the cat-and-mouse
  sequence and the curve along training at η = 0.3, checkpoints written (``resume``)."""
  root = tmp_path_factory.mktemp("adversarial_defense")
  fake_mnist(root / "data")
  cfg = bench.Config(
    etas=(0.3,), cat_etas=(0.3,), curve_etas=(0.3,), attacker_layers=2, clean_steps=4,
    defense_steps=4, curve_every=2, attacker_steps=2, chunk=2, test_size=40, pgd_test=20,
    eval_batch=20, pgd_steps=3, cat_rounds=1, cat_steps=2,
  )  # fmt: skip
  records = bench.run_suite(root / "out", cfg, data_dir=str(root / "data"), resume=True)
  return root, cfg, records


def test_benchmark_quick_path_runs_end_to_end_and_resumes(suite):
  root, cfg, records = suite
  out = root / "out"
  saved = json.loads((out / "adversarial_defense.json").read_text())
  assert saved["records"] == records
  assert saved["meta"]["config"]["defenses"] == [d.name for d in training.DEFENSES]
  for defense in training.DEFENSES:
    rows = [r for r in records if r["defense"] == defense.name]
    assert {r["attack"] for r in rows} >= {"clean", "fgsm", "pgd40", "readapted"}
    for r in rows:
      assert set(r) >= {"defense", "attack", "eta", "accuracy"}
      assert 0.0 <= r["accuracy"] <= 1.0
      assert r["eta"] == (None if r["attack"] == "clean" else 0.3)
  assert {r["attack"] for r in records if r["defense"] == "minimax_k5"} >= {"own_beams"}
  cat = [r for r in records if r["defense"] == "cat_and_mouse"]
  assert [r["mover"] for r in cat] == ["start", "attacker", "classifier", "final", "final"]
  assert [r["round"] for r in cat] == [0, 1, 1, 1, 1]
  text = (out / "adversarial_defense.md").read_text()
  assert "Goal (K = 5 beats" in text and "Cat and mouse" in text and "| minimax_k5 |" in text
  assert "0.890 Madry" in text  # PGD training's published PGD-40 accuracy at η = 0.3
  assert (out / "adversarial_defense.png").stat().st_size > 0
  # Every training is checkpointed: a resumed run reloads them and ends with the same numbers.
  again = bench.run_suite(out, cfg, data_dir=str(root / "data"), resume=True)
  assert again == records


def test_paper_protocol_config_and_its_table(suite):
  cfg = bench.config(protocol="paper")
  assert cfg.etas == report.PAPER_ETAS == (0.3, 0.4, 0.5, 0.6) and cfg.attacker_layers == 2
  assert {d.name for d in cfg.defenses} >= {"fgsm", "minimax_k1", "minimax_k5"}
  assert cfg.curve_etas == (0.3,) and cfg.defenses[-1] is training.minimax_defense(5)
  bench.check_config(cfg)
  assert bench.config(protocol="paper", iters=150).curve_every == 50  # any --iters divides
  bench.check_config(bench.config(protocol="paper", iters=150))
  with pytest.raises(ValueError, match="protocol"):
    bench.config(protocol="papers")
  # the suite's run: the paper's attacker (two hidden layers), the curve at η = 0.3
  root, run_cfg, records = suite
  meta = json.loads((root / "out" / "adversarial_defense.json").read_text())["meta"]
  assert [(c["defense"], c["steps"]) for c in meta["curves"]] == [
    (d.name, s) for d in training.DEFENSES[1:] for s in (2, 4)
  ]
  final = meta["curves"][-1]
  assert final["readapted"] == bench.lookup(records, "minimax_k5", 0.3, "readapted")
  state = (
    training.minimax_defense(5)
    .trainer(run_cfg)
    .init(jax.random.key(0), adv.init_classifier(jax.random.key(0)))
  )
  assert len(state.beams["more"]) == 1  # AttNet: 784-300-300-784
  # the one report, at the paper's protocol: Table 5's cells beside ours, the paper's goal
  meta["config"]["protocol"] = "paper"
  text = report.report(records, meta)
  ours = bench.lookup(records, "minimax_k5", 0.3, "fgsm")
  assert f"{ours:.4f} (0.782 H&M)" in text  # FGSM-curr: 1 - 0.218
  assert "Goal (at η = 0.3, K = 5 at or above 95%" in text and "784-300-300-784" in text
  assert "## Along training at η = 0.3" in text
  assert len(report.plot(records, meta).axes) == 5  # 3 attacks, cat and mouse, the curve
