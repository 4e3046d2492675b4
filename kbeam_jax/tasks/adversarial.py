"""Adversarial examples as a minimax game: a classifier against bounded attackers.

Machine vs machine (Hamm & Mehra 2017): a classifier ``u`` (the leader, min) and an
attacker ``v`` (the follower, max) play

``f(u, v) = E_{(x, y)} CE(c_u(x'_v), y)``,  ``x'_v = clip(x + η tanh(a_v(x)), 0, 1)``,

the cross-entropy of the classifier on attacked inputs, with pixels in [0, 1] and every
perturbation in the L∞ ball of radius η. The network attacker ``a_v`` is a small
generator; K of them stacked with ``kbeam_jax.nn.stack_modules`` are the beams of
``minimax.kbeam``, and the minimax defense is the leader's side of that game. The
gradient attacks FGSM (Goodfellow et al. 2015) and PGD (Madry et al. 2018) are the
per-example attacks the adversarial-training baselines train on and every defense is
evaluated against.

Models: the classifier ``(N, 28, 28, 1) → conv 5×5×16 → ReLU → max-pool 2 → conv 5×5×32
→ ReLU → max-pool 2 → 100 ReLU → 10`` (``kbeam_jax.nn.Conv``, fast inside ``lax.scan`` on
the CPU); the attacker ``784 → 300 ReLU → 784`` (an MLP generator, the whole image in
view, ``a_v(x)`` unbounded and squashed by ``tanh``), or with ``layers=2`` the paper's
three-layer ``784 → 300 → 300 → 784``. Other sizes: ``graphdefs(**sizes)``,
``init_classifier(key, ...)`` and ``init_attacker(key, ...)`` take the same keywords.

η travels as an argument of every function here (a Python float, or an array inside
``jit``), so one compiled program serves every perturbation size.

References: Hamm & Mehra, Machine vs Machine: Minimax-Optimal Defense Against Adversarial
Examples, NIPS 2017 Workshop on Machine Deception; Goodfellow, Shlens & Szegedy,
Explaining and Harnessing Adversarial Examples, ICLR 2015; Madry et al., Towards Deep
Learning Models Resistant to Adversarial Attacks, ICLR 2018; Hamm & Noh, K-Beam Minimax,
ICML 2018.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kbeam_jax import nn as kbeam_nn
from kbeam_jax._checks import check_steps
from kbeam_jax._tree import PyTree
from kbeam_jax.tasks._classifiers import cross_entropy as cross_entropy

LogitsFn = Callable[[jax.Array], jax.Array]
IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10


class Classifier(nnx.Module):
  """``(N, 28, 28, 1) → (N, 10)`` logits: two valid 5×5 convolutions with ReLU and 2×2
  max-pool, then ``512 → hidden → 10`` with ReLU.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from kbeam_jax.tasks import adversarial
    >>> adversarial.Classifier(nnx.Rngs(0))(jnp.zeros((2, 28, 28, 1))).shape
    (2, 10)
  """

  def __init__(self, rngs: nnx.Rngs, channels: tuple[int, int] = (16, 32), hidden: int = 100):
    c1, c2 = channels
    self.conv1 = kbeam_nn.Conv(1, c1, (5, 5), rngs=rngs)
    self.conv2 = kbeam_nn.Conv(c1, c2, (5, 5), rngs=rngs)
    self.hidden = nnx.Linear(4 * 4 * c2, hidden, rngs=rngs)
    self.out = nnx.Linear(hidden, NUM_CLASSES, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = kbeam_nn.max_pool2(jax.nn.relu(self.conv1(x)))
    h = kbeam_nn.max_pool2(jax.nn.relu(self.conv2(h)))
    return self.out(jax.nn.relu(self.hidden(h.reshape(h.shape[0], -1))))


class Attacker(nnx.Module):
  """The generator ``a_v``: ``(N, 28, 28, 1) → 784 → hidden ReLU (× layers) → 784 → (N, 28,
  28, 1)``.

  Its output is unbounded; ``attack`` turns it into a perturbation of size at most η.
  ``layers=1`` (the default) is one hidden layer; ``layers=2`` is Hamm & Mehra's AttNet,
  "a three-layer fully-connected network with 300 hidden units per layer" read as three
  layers of weights.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from kbeam_jax.tasks import adversarial
    >>> adversarial.Attacker(nnx.Rngs(0))(jnp.zeros((2, 28, 28, 1))).shape
    (2, 28, 28, 1)
    >>> len(adversarial.Attacker(nnx.Rngs(0), layers=2).more)
    1
  """

  def __init__(self, rngs: nnx.Rngs, hidden: int = 300, layers: int = 1):
    if layers < 1:
      raise ValueError(f"layers (hidden layers of the attacker) must be >= 1, got {layers}.")
    pixels = int(np.prod(IMAGE_SHAPE))
    self.hidden = nnx.Linear(pixels, hidden, rngs=rngs)
    self.more = nnx.List([nnx.Linear(hidden, hidden, rngs=rngs) for _ in range(layers - 1)])
    self.out = nnx.Linear(hidden, pixels, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = jax.nn.relu(self.hidden(x.reshape(x.shape[0], -1)))
    for layer in self.more:
      h = jax.nn.relu(layer(h))
    return self.out(h).reshape(x.shape)


def graphdefs(
  *,
  channels: tuple[int, int] = (16, 32),
  hidden: int = 100,
  attacker_hidden: int = 300,
  attacker_layers: int = 1,
) -> tuple[nnx.GraphDef, nnx.GraphDef]:
  """Graph definitions of ``Classifier(channels, hidden)`` and ``Attacker(attacker_hidden,
  attacker_layers)`` (default: the default sizes).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from kbeam_jax.tasks import adversarial
    >>> classifier, attacker = adversarial.graphdefs()
    >>> u = adversarial.init_classifier(jax.random.key(0))
    >>> adversarial.logits_fn(classifier, u)(jnp.zeros((2, 28, 28, 1))).shape
    (2, 10)
  """
  shape = lambda make: nnx.split(nnx.eval_shape(make), nnx.Param)[0]
  return (
    shape(lambda: Classifier(nnx.Rngs(0), channels, hidden)),
    shape(lambda: Attacker(nnx.Rngs(0), attacker_hidden, attacker_layers)),
  )


def init_classifier(
  key: jax.Array, *, channels: tuple[int, int] = (16, 32), hidden: int = 100
) -> PyTree:
  """Parameters of a freshly initialized ``Classifier`` as a pure pytree."""
  return nnx.as_pure(nnx.split(Classifier(nnx.Rngs(key), channels, hidden), nnx.Param)[1])


def init_attacker(key: jax.Array, *, hidden: int = 300, layers: int = 1) -> PyTree:
  """Parameters of a freshly initialized ``Attacker`` as a pure pytree.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from kbeam_jax.tasks import adversarial
    >>> _, attacker = adversarial.graphdefs()
    >>> v = adversarial.init_attacker(jax.random.key(0))
    >>> x = jnp.full((2, 28, 28, 1), 0.5)
    >>> bool(jnp.all(jnp.abs(adversarial.attack(attacker, v, x, 0.1) - x) <= 0.1 + 1e-6))
    True
  """
  return nnx.as_pure(nnx.split(Attacker(nnx.Rngs(key), hidden, layers), nnx.Param)[1])


def to_images(images: Any) -> np.ndarray:
  """uint8 digits ``(N, 28, 28)`` (as ``load_mnist`` returns them) to float32
  ``(N, 28, 28, 1)`` in [0, 1].

  Examples:
    >>> import numpy as np
    >>> from kbeam_jax.tasks import adversarial
    >>> x = adversarial.to_images(np.full((2, 28, 28), 255, np.uint8))
    >>> x.shape, x.dtype, float(x.max())
    ((2, 28, 28, 1), dtype('float32'), 1.0)
  """
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise TypeError(f"images must be uint8 pixels 0..255, got dtype {images.dtype}.")
  if images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE[:2]:
    raise ValueError(f"images must have shape (N, 28, 28), got {images.shape}.")
  return images[..., None].astype(np.float32) / 255.0


def check_eta(eta: Any) -> None:
  """Raises unless a concrete η lies in (0, 1] (the pixels' range); traced values pass.

  Examples:
    >>> from kbeam_jax.tasks import adversarial
    >>> adversarial.check_eta(1.5)
    Traceback (most recent call last):
    ...
    ValueError: eta (the L∞ radius of the attack, pixels in [0, 1]) must lie in (0, 1], got eta=1.5.
  """
  if isinstance(eta, jax.core.Tracer):
    return
  value = np.asarray(eta)
  if value.shape != () or not (0.0 < float(value) <= 1.0):  # NaN fails too
    raise ValueError(
      f"eta (the L∞ radius of the attack, pixels in [0, 1]) must lie in (0, 1], got eta={eta}."
    )


def perturb(x: jax.Array, a: jax.Array, eta: Any) -> jax.Array:
  """The network attack's output map ``clip(x + η tanh(a), 0, 1)``.

  Every pixel moves by at most η and stays in [0, 1], whatever ``a`` is.

  Examples:
    >>> import jax.numpy as jnp
    >>> from kbeam_jax.tasks import adversarial
    >>> adversarial.perturb(jnp.array([0.0, 0.5, 1.0]), jnp.array([-9.0, 9.0, 9.0]), 0.1)
    Array([0. , 0.6, 1. ], dtype=float32)
  """
  check_eta(eta)
  return jnp.clip(x + jnp.asarray(eta, x.dtype) * jnp.tanh(a), 0.0, 1.0)


def attack(attacker: nnx.GraphDef, v: PyTree, x: jax.Array, eta: Any) -> jax.Array:
  """The network attacker ``x' = clip(x + η tanh(a_v(x)), 0, 1)`` with parameters ``v``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from kbeam_jax.tasks import adversarial
    >>> _, attacker = adversarial.graphdefs()
    >>> v = adversarial.init_attacker(jax.random.key(0))
    >>> x = jax.random.uniform(jax.random.key(1), (4, 28, 28, 1))
    >>> x_adv = adversarial.attack(attacker, v, x, 0.3)
    >>> bool(jnp.max(jnp.abs(x_adv - x)) <= 0.3 + 1e-6)
    True
  """
  return perturb(x, nnx.merge(attacker, v)(x), eta)


def _project(x_adv: jax.Array, x: jax.Array, eta: jax.Array) -> jax.Array:
  """Onto the L∞ ball of radius η around ``x`` intersected with [0, 1]."""
  return jnp.clip(jnp.clip(x_adv, x - eta, x + eta), 0.0, 1.0)


def fgsm(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, eta: Any) -> jax.Array:
  """Fast gradient sign method: ``clip(x + η sign(∇_x CE(logits_fn(x), y)), 0, 1)``.

  Args:
    logits_fn: ``x -> logits`` of the attacked classifier (its parameters closed over).
    x: images in [0, 1], any shape ``logits_fn`` takes.
    y: integer labels.
    eta: the L∞ radius, in (0, 1].

  Returns:
    The adversarial images, ``x``'s shape, at most η from ``x`` and in [0, 1].

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from kbeam_jax.tasks import adversarial
    >>> w = jax.random.normal(jax.random.key(0), (784, 10))
    >>> logits_fn = lambda x: x.reshape(x.shape[0], -1) @ w
    >>> x = jax.random.uniform(jax.random.key(1), (8, 28, 28, 1))
    >>> y = jnp.argmax(logits_fn(x), -1)
    >>> x_adv = adversarial.fgsm(logits_fn, x, y, 0.1)
    >>> loss = lambda x: adversarial.cross_entropy(logits_fn(x), y)
    >>> bool(loss(x_adv) > loss(x))
    True

  References:
    Goodfellow, Shlens & Szegedy, Explaining and Harnessing Adversarial Examples, ICLR 2015.
  """
  check_eta(eta)
  eta = jnp.asarray(eta, x.dtype)
  g = jax.grad(lambda z: cross_entropy(logits_fn(z), y))(x)
  return jax.lax.stop_gradient(jnp.clip(x + eta * jnp.sign(g), 0.0, 1.0))


def pgd(
  logits_fn: LogitsFn,
  x: jax.Array,
  y: jax.Array,
  eta: Any,
  *,
  num_steps: int = 40,
  step_size: Any = None,
  key: jax.Array | None = None,
) -> jax.Array:
  """Projected gradient ascent on the cross-entropy in the L∞ ball (Madry et al. 2018).

  ``x_{t+1} = Π(x_t + α sign(∇_x CE(logits_fn(x_t), y)))``, ``Π`` the projection onto
  ``{x' : |x' - x|_∞ <= η, 0 <= x' <= 1}``; with ``key`` the start is uniform in the
  ball (Madry et al.'s random start), else ``x`` itself. Runs in one ``lax.scan``.

  Args:
    logits_fn: ``x -> logits`` of the attacked classifier.
    x: images in [0, 1].
    y: integer labels.
    eta: the L∞ radius, in (0, 1].
    num_steps: ascent steps (Madry et al.: 40 on MNIST).
    step_size: α; default ``2.5 η / num_steps`` (so the steps can cross the ball and back).
    key: optional ``jax.random.key`` for the random start.

  Returns:
    The adversarial images, at most η from ``x`` and in [0, 1].

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from kbeam_jax.tasks import adversarial
    >>> w = jax.random.normal(jax.random.key(0), (784, 10))
    >>> logits_fn = lambda x: jnp.tanh(x.reshape(x.shape[0], -1) @ w)
    >>> x = jax.random.uniform(jax.random.key(1), (8, 28, 28, 1))
    >>> y = jnp.argmax(logits_fn(x), -1)
    >>> x_pgd = adversarial.pgd(logits_fn, x, y, 0.1, num_steps=10, key=jax.random.key(2))
    >>> x_fgsm = adversarial.fgsm(logits_fn, x, y, 0.1)
    >>> loss = lambda x: adversarial.cross_entropy(logits_fn(x), y)
    >>> bool(loss(x_pgd) >= loss(x_fgsm)), bool(jnp.max(jnp.abs(x_pgd - x)) <= 0.1 + 1e-6)
    (True, True)

  References:
    Madry, Makelov, Schmidt, Tsipras & Vladu, Towards Deep Learning Models Resistant to
    Adversarial Attacks, ICLR 2018.
  """
  check_eta(eta)
  num_steps = check_steps("num_steps", num_steps)
  eta = jnp.asarray(eta, x.dtype)
  alpha = 2.5 * eta / max(num_steps, 1) if step_size is None else jnp.asarray(step_size, x.dtype)
  grad = jax.grad(lambda z: cross_entropy(logits_fn(z), y))
  start = x
  if key is not None:
    start = _project(x + jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0) * eta, x, eta)

  def body(x_adv, _):
    return _project(x_adv + alpha * jnp.sign(grad(x_adv)), x, eta), None

  x_adv, _ = jax.lax.scan(body, start, length=num_steps)
  return jax.lax.stop_gradient(x_adv)


def attacks(
  classifier: nnx.GraphDef, attacker: nnx.GraphDef, *, pgd_steps: int = 40
) -> dict[str, Callable[..., jax.Array]]:
  """Every attack under one signature, ``attack(u, x, y, eta, key, v) -> x'`` (the classifier
  ``u``, the key of PGD's random start, the attacker network's ``v``; each ignores what it
  does not use): ``clean`` (``x`` itself), ``fgsm``, ``pgd`` (``pgd_steps`` steps from a
  random start) and ``network`` (``attack`` with ``v``).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from kbeam_jax.tasks import adversarial
    >>> table = adversarial.attacks(*adversarial.graphdefs(), pgd_steps=3)
    >>> u = adversarial.init_classifier(jax.random.key(0))
    >>> v = adversarial.init_attacker(jax.random.key(1))
    >>> x, y, key = jnp.full((2, 28, 28, 1), 0.5), jnp.arange(2), jax.random.key(2)
    >>> {name: bool(jnp.max(jnp.abs(a(u, x, y, 0.1, key, v) - x)) <= 0.1 + 1e-6)
    ...  for name, a in table.items()}
    {'clean': True, 'fgsm': True, 'pgd': True, 'network': True}
  """
  logits = lambda u: logits_fn(classifier, u)
  return {
    "clean": lambda u, x, y, eta, key, v: x,
    "fgsm": lambda u, x, y, eta, key, v: fgsm(logits(u), x, y, eta),
    "pgd": lambda u, x, y, eta, key, v: pgd(logits(u), x, y, eta, num_steps=pgd_steps, key=key),
    "network": lambda u, x, y, eta, key, v: attack(attacker, v, x, eta),
  }


def logits_fn(classifier: nnx.GraphDef, u: PyTree) -> LogitsFn:
  """``x -> logits`` of the classifier with parameters ``u``."""
  model = nnx.merge(classifier, u)
  return lambda x: model(x)


def saturation(a: jax.Array, limit: float = 2.0) -> jax.Array:
  """``mean(max(|a| - limit, 0)²)``: how far the attacker's pre-activations sit in the flat
  tails of ``tanh`` (``tanh'(2) = 0.07``), where its gradient vanishes.

  Examples:
    >>> import jax.numpy as jnp
    >>> from kbeam_jax.tasks import adversarial
    >>> adversarial.saturation(jnp.array([0.5, -1.9, 3.0, -4.0]))
    Array(1.25, dtype=float32)
  """
  return jnp.mean(jax.nn.relu(jnp.abs(a) - limit) ** 2)


def objective(
  classifier: nnx.GraphDef, attacker: nnx.GraphDef, *, penalty: float = 0.0, limit: float = 2.0
) -> Callable[[PyTree, PyTree, jax.Array, jax.Array, Any], jax.Array]:
  """The game value ``f(u, v, x, y, eta) = CE(c_u(clip(x + η tanh(a_v(x)), 0, 1)), y)
  - penalty · saturation(a_v(x), limit)``.

  The classifier ``u`` minimizes it, the attacker ``v`` maximizes it: pass it to
  ``minimax.kbeam`` with ``(x, y, eta)`` as the step's arguments. The optional penalty
  depends on ``v`` only, so ``∇_u f`` is the classifier's loss gradient whatever its
  weight; it keeps a beam's pre-activations out of ``tanh``'s flat tails, where a beam
  that once saturated stops following the classifier (its gradient is ``tanh' ≈ 0``).
  Perturbations up to ``tanh(limit) η`` cost nothing.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import kbeam_jax
    >>> from kbeam_jax import minimax, nn
    >>> from kbeam_jax.tasks import adversarial
    >>> classifier, attacker = adversarial.graphdefs()
    >>> f = adversarial.objective(classifier, attacker, penalty=0.1)
    >>> solver = minimax.kbeam(f, optax.adam(1e-3), optax.adam(1e-3))
    >>> _, beams = nn.stack_modules(adversarial.Attacker, jax.random.key(0), 3)
    >>> u = adversarial.init_classifier(jax.random.key(1))
    >>> state = solver.init(jax.random.key(2), u, beams, 3)
    >>> x = jax.random.uniform(jax.random.key(3), (8, 28, 28, 1))
    >>> y = jnp.arange(8)
    >>> state, info = kbeam_jax.run(solver.step, state, 2, x, y, 0.2)
    >>> info.values.shape
    (2, 3)
  """
  if not penalty >= 0.0:
    raise ValueError(f"penalty must be >= 0, got penalty={penalty}.")
  if not limit > 0.0:
    raise ValueError(f"limit must be > 0, got limit={limit}.")

  def f(u, v, x, y, eta):
    a = nnx.merge(attacker, v)(x)
    value = cross_entropy(nnx.merge(classifier, u)(perturb(x, a, eta)), y)
    return value - penalty * saturation(a, limit) if penalty else value

  return f


def classification_loss(classifier: nnx.GraphDef) -> Callable[..., jax.Array]:
  """``loss(u, x, y)``: cross-entropy of the classifier on the images as given.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from kbeam_jax.tasks import adversarial
    >>> classifier, _ = adversarial.graphdefs()
    >>> loss = adversarial.classification_loss(classifier)
    >>> u = adversarial.init_classifier(jax.random.key(0))
    >>> loss(u, jnp.zeros((4, 28, 28, 1)), jnp.arange(4)).shape
    ()
  """
  return lambda u, x, y: cross_entropy(nnx.merge(classifier, u)(x), y)


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Fraction of rows of ``logits`` whose arg-max is the label.

  Examples:
    >>> import jax.numpy as jnp
    >>> from kbeam_jax.tasks import adversarial
    >>> float(adversarial.accuracy(jnp.array([[2.0, 1.0], [0.0, 3.0]]), jnp.array([0, 0])))
    0.5
  """
  return jnp.mean(jnp.argmax(logits, axis=-1) == labels)
