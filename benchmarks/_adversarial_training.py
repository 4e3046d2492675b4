"""The adversarial_defense suite's trainers, every one a ``kbeam_jax.Solver``, its defenses
as values, and the one chunk program that drives any trainer.

A trainer is a function of the run's config (``cfg -> Solver``) whose solver starts with
``init(key, u)`` and steps with ``step(state, x, y, eta, key, other) -> (state, value)``:
``key`` feeds a random attack (PGD's start), ``other`` is the frozen opponent (the attacker
of the classifier's cat-and-mouse moves, the classifier of an attacker's training).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import kbeam_jax
from kbeam_jax import games, minimax, nn
from kbeam_jax.tasks import adversarial

if TYPE_CHECKING:
  from benchmarks.adversarial_defense import Config


def classifier_training(attack: str, cfg: Config, *, decay: bool = False) -> kbeam_jax.Solver:
  """Gradient play (one player, Adam) on the classifier's loss on the images of ``attack``
  (``adversarial.attacks``: clean, fgsm, pgd, or network against the attacker ``other``);
  ``decay``: the step decays along a cosine to a tenth over ``clean_steps``."""
  classifier, attacker = adversarial.graphdefs(attacker_layers=cfg.attacker_layers)
  images = adversarial.attacks(classifier, attacker, pgd_steps=cfg.pgd_steps)[attack]
  loss = adversarial.classification_loss(classifier)
  lr = optax.cosine_decay_schedule(cfg.lr, cfg.clean_steps, alpha=0.1) if decay else cfg.lr
  play = games.gradient_play([lambda p, x, y: loss(p[0], x, y)], optax.adam(lr))

  def step(state, x, y, eta, key, v):
    state, info = play.step(state, images(state.players[0], x, y, eta, key, v), y)
    return state, info.losses[0]

  return kbeam_jax.Solver(lambda key, u: play.init((u,)), step)


def attacker_training(cfg: Config) -> kbeam_jax.Solver:
  """Gradient play (one player, Adam ``attacker_lr``): an attacker network ascending the
  game value (no saturation penalty) against the frozen classifier ``other``."""
  game = adversarial.objective(*adversarial.graphdefs(attacker_layers=cfg.attacker_layers))
  loss = lambda p, x, y, eta, u: -game(u, p[0], x, y, eta)
  play = games.gradient_play([loss], optax.adam(cfg.attacker_lr))

  def step(state, x, y, eta, key, u):
    del key
    state, info = play.step(state, x, y, eta, u)
    return state, -info.losses[0]

  return kbeam_jax.Solver(lambda key, v: play.init((v,)), step)


def minimax_solver(cfg: Config) -> kbeam_jax.Solver:
  """``minimax.kbeam`` on ``adversarial.objective``: Adam for the classifier and for
  every beam; rule ``best`` steps the classifier against the strongest attacker."""
  classifier, attacker = adversarial.graphdefs(attacker_layers=cfg.attacker_layers)
  f = adversarial.objective(classifier, attacker, penalty=cfg.penalty)
  leader, follower = optax.adam(cfg.lr), optax.adam(cfg.beam_lr)
  return minimax.kbeam(f, leader, follower, ascent_steps=cfg.ascent_steps, rule=cfg.rule)


def minimax_training(num_beams: int, cfg: Config) -> kbeam_jax.Solver:
  """``minimax_solver`` against ``num_beams`` fresh attacker networks; its value is the
  game value at the strongest beam."""
  solver = minimax_solver(cfg)
  make = functools.partial(adversarial.Attacker, layers=cfg.attacker_layers)

  def init(key, u):
    k_beams, k_solver = jax.random.split(key)
    return solver.init(k_solver, u, nn.stack_modules(make, k_beams, num_beams)[1], num_beams)

  def step(state, x, y, eta, key, other):
    del key, other
    state, info = solver.step(state, x, y, eta)
    return state, jnp.max(info.values)

  return kbeam_jax.Solver(init, step)


Trainer = Callable[["Config"], kbeam_jax.Solver]
CLEAN: Trainer = functools.partial(classifier_training, "clean", decay=True)
VERSUS: Trainer = functools.partial(classifier_training, "network")  # the cat and mouse


class Defense(NamedTuple):
  """A defense of the study: its name in the records, its trainer of the clean classifier
  (None: the clean classifier itself) and its number of attacker beams (its own attackers,
  evaluated as ``own_beams``; 0: none)."""

  name: str
  trainer: Trainer | None = None
  num_beams: int = 0

  def trained(self, state: Any) -> tuple[Any, Any]:
    """The classifier and the beams (None without) in a state of ``trainer``."""
    return (state.u, state.beams) if self.num_beams else (state.players[0], None)


NONE = Defense("none")
FGSM = Defense("fgsm", functools.partial(classifier_training, "fgsm"))
PGD = Defense("pgd", functools.partial(classifier_training, "pgd"))


@functools.cache
def minimax_defense(num_beams: int) -> Defense:
  """The minimax defense against K = ``num_beams`` attacker networks (one value per K)."""
  if num_beams < 1:
    raise ValueError(f"K (the number of attacker beams) must be >= 1, got {num_beams}.")
  trainer = functools.partial(minimax_training, num_beams)
  return Defense(f"minimax_k{num_beams}", trainer, num_beams)


DEFENSES = (NONE, FGSM, PGD, minimax_defense(1), minimax_defense(5))


@functools.cache
def chunk_fn(trainer: Trainer, cfg: Config):
  """``(carry, x, y, eta, other) -> (carry, mean value)``: ``cfg.chunk`` steps of
  ``trainer(cfg)`` in one jitted ``lax.scan``, each on a batch drawn from ``(x, y)``;
  ``carry = (state, key)``, ``other`` the frozen opponent the step is given. A scan over
  the steps' keys, not ``kbeam_jax.run`` (which hands every step the same arguments), so
  each step draws its batch and its attack's key from the suite's random stream."""
  solver = trainer(cfg)

  def step(state, key, x_all, y_all, eta, other):
    k_batch, k_attack = jax.random.split(key)
    i = jax.random.randint(k_batch, (cfg.batch,), 0, x_all.shape[0])
    return solver.step(state, x_all[i], y_all[i], eta, k_attack, other)

  @jax.jit
  def chunk(carry, x_all, y_all, eta, other):
    state, key = carry
    key, k = jax.random.split(key)
    state, values = jax.lax.scan(
      lambda s, k: step(s, k, x_all, y_all, eta, other), state, jax.random.split(k, cfg.chunk)
    )
    return (state, key), jnp.mean(values)

  return chunk
