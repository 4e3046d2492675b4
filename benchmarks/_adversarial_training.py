"""The adversarial_defense suite's config, trainers, defenses and chunk program. A trainer is
``cfg -> kbeam_jax.Solver``: ``init(key, u)``, ``step(state, x, y, eta, key, other) -> (state,
value)``, ``key`` for a random attack (PGD's start), ``other`` the frozen opponent."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import kbeam_jax
from benchmarks import _common
from benchmarks._adversarial_report import PAPER_ETAS
from kbeam_jax import games, minimax, nn
from kbeam_jax.tasks import adversarial


def classifier_training(attack: str, cfg: Config, *, decay: bool = False) -> kbeam_jax.Solver:
  """Adam on the classifier's loss on the images of ``attack`` (``network``: ``other``'s);
  ``decay``: cosine decay to a tenth over clean_steps."""
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
  """An attacker network ascending the game value (no saturation penalty) against ``other``."""
  game = adversarial.objective(*adversarial.graphdefs(attacker_layers=cfg.attacker_layers))
  loss = lambda p, x, y, eta, u: -game(u, p[0], x, y, eta)
  play = games.gradient_play([loss], optax.adam(cfg.attacker_lr))

  def step(state, x, y, eta, key, u):
    state, info = play.step(state, x, y, eta, u)
    return state, -info.losses[0]

  return kbeam_jax.Solver(lambda key, v: play.init((v,)), step)


def minimax_training(num_beams: int, cfg: Config) -> kbeam_jax.Solver:
  """``minimax.kbeam`` (Adam for the classifier and every beam) against ``num_beams`` fresh
  attackers; value: the strongest beam's."""
  classifier, attacker = adversarial.graphdefs(attacker_layers=cfg.attacker_layers)
  f = adversarial.objective(classifier, attacker, penalty=cfg.penalty)
  leader, follower = optax.adam(cfg.lr), optax.adam(cfg.beam_lr)
  solver = minimax.kbeam(f, leader, follower, ascent_steps=cfg.ascent_steps, rule=cfg.rule)
  make = functools.partial(adversarial.Attacker, layers=cfg.attacker_layers)

  def init(key, u):
    k_beams, k_solver = jax.random.split(key)
    return solver.init(k_solver, u, nn.stack_modules(make, k_beams, num_beams)[1], num_beams)

  def step(state, x, y, eta, key, other):
    state, info = solver.step(state, x, y, eta)
    return state, jnp.max(info.values)

  return kbeam_jax.Solver(init, step)


Trainer = Callable[["Config"], kbeam_jax.Solver]
CLEAN: Trainer = functools.partial(classifier_training, "clean", decay=True)
VERSUS: Trainer = functools.partial(classifier_training, "network")  # the cat and mouse


class Defense(NamedTuple):
  """A defense: its name, its trainer of the clean classifier (None: the clean classifier
  itself) and its number of attacker beams (evaluated as ``own_beams``)."""

  name: str
  trainer: Trainer | None = None
  num_beams: int = 0

  def trained(self, state: Any) -> tuple[Any, Any]:  # the classifier, the beams (or None)
    return (state.u, state.beams) if self.num_beams else (state.players[0], None)


NONE = Defense("none")
FGSM = Defense("fgsm", functools.partial(classifier_training, "fgsm"))
PGD = Defense("pgd", functools.partial(classifier_training, "pgd"))


@functools.cache
def minimax_defense(num_beams: int) -> Defense:
  if num_beams < 1:
    raise ValueError(f"K (the number of attacker beams) must be >= 1, got {num_beams}.")
  return Defense(f"minimax_k{num_beams}", functools.partial(minimax_training, num_beams), num_beams)


DEFENSES = (NONE, FGSM, PGD, minimax_defense(1), minimax_defense(5))


class Config(NamedTuple):
  """Sizes and hyperparameters of one run (hashable: it keys the compiled programs)."""

  etas: tuple[float, ...] = (0.1, 0.2, 0.3)
  defenses: tuple[Defense, ...] = DEFENSES
  batch: int = 64
  lr: float = 1e-3  # the classifier, in every defense
  beam_lr: float = 1e-2  # the minimax defense's attacker beams (the follower)
  penalty: float = 0.1  # the beams' tanh-saturation penalty (adversarial.objective)
  ascent_steps: int = 1  # ascent steps per beam per K-beam step
  rule: minimax.Rule = minimax.Best()  # K-beam's descent rule over the beams (a value)
  attacker_lr: float = 1e-3  # the re-adapted and the cat-and-mouse attackers
  pgd_steps: int = 40
  clean_steps: int = 3000
  defense_steps: int = 300
  attacker_steps: int = 1000
  chunk: int = 100
  test_size: int = 10_000
  pgd_test: int = 500
  eval_batch: int = 500
  cat_etas: tuple[float, ...] = (0.3,)
  cat_rounds: int = 4
  cat_steps: int = 300
  train_size: int | None = None  # None: every training image
  attacker_layers: int = 1  # hidden layers (300 units) of every attacker network
  curve_etas: tuple[float, ...] = ()  # η at which the defenses are evaluated along training
  curve_every: int = 500  # ... every this many steps
  protocol: str = "default"  # names the outputs and the goal: adversarial_defense[_paper].*


# --protocol paper: Hamm & Mehra's Table 5, every attacker their AttNet 784-300-300-784.
PAPER = dict(
  etas=PAPER_ETAS, defenses=(NONE, FGSM, minimax_defense(1), minimax_defense(5)),
  attacker_layers=2, defense_steps=2500, cat_etas=(), curve_etas=(0.3,), protocol="paper",
)  # fmt: skip
QUICK = dict(
  clean_steps=100, defense_steps=10, attacker_steps=20, chunk=10, test_size=500, pgd_test=100,
  eval_batch=100, cat_rounds=2, cat_steps=10,
)  # fmt: skip
QUICK_PAPER = dict(QUICK, defense_steps=20, curve_every=10)  # one point along the curve


def config(quick: bool = False, iters: int | None = None, protocol: str = "default") -> Config:
  """The run of ``protocol``; ``quick``: a smoke check, not a result; ``iters``: the defense
  steps (segments and chunks made to divide them)."""
  if protocol not in ("default", "paper"):
    raise ValueError(f"protocol must be 'default' or 'paper', got {protocol!r}.")
  cfg = Config(**PAPER) if protocol == "paper" else Config()
  if quick:
    cfg = cfg._replace(**(QUICK_PAPER if protocol == "paper" else QUICK))
  if iters is not None:
    every = math.gcd(cfg.curve_every, iters)
    cfg = cfg._replace(defense_steps=iters, curve_every=every, chunk=math.gcd(cfg.chunk, every))
  return cfg


def check_config(cfg: Config) -> None:
  for eta in cfg.etas + cfg.cat_etas:
    adversarial.check_eta(eta)
  for d in cfg.defenses:
    if not isinstance(d, Defense):
      what = "Defense values (NONE, FGSM, PGD, minimax_defense(K))"
      raise TypeError(f"defenses are {what}, got {d!r}.")
  steps = ("clean_steps", "defense_steps", "attacker_steps", "cat_steps")
  curved, chunk, every, tests = bool(cfg.curve_etas), cfg.chunk, cfg.curve_every, cfg.test_size
  checks = [  # (failed, message)
    *((getattr(cfg, n) < chunk or getattr(cfg, n) % chunk,
       f"{n}={getattr(cfg, n)} must be a positive multiple of chunk={chunk}") for n in steps),
    (curved and cfg.defense_steps % every,
     f"defense_steps={cfg.defense_steps} must be a multiple of curve_every={every}"),
    (curved and every % chunk, f"curve_every={every} must be a multiple of chunk={chunk}"),
    (cfg.attacker_layers < 1, f"attacker_layers must be >= 1, got {cfg.attacker_layers}"),
    (cfg.pgd_test > tests, f"pgd_test={cfg.pgd_test} must be at most test_size={tests} (PGD-40 "
     "runs on the first pgd_test of the test digits loaded)"),
    (tests % cfg.eval_batch or cfg.pgd_test % cfg.eval_batch, f"test_size={tests} and pgd_test="
     f"{cfg.pgd_test} must be multiples of eval_batch={cfg.eval_batch} (one compiled evaluation)"),
  ]  # fmt: skip
  for failed, message in checks:
    if failed:
      raise ValueError(message + ".")
  minimax_training(1, cfg)  # the rule, ascent_steps and the step sizes, checked now


@functools.cache
def chunk_fn(trainer: Trainer, cfg: Config):
  """``(carry, x, y, eta, other) -> (carry, mean value)``, ``carry = (state, key)``:
  ``cfg.chunk`` steps of ``trainer(cfg)``, each on a random batch of ``(x, y)``."""
  solver = trainer(cfg)

  def step(state, key, x_all, y_all, eta, other):
    k_batch, k_attack = jax.random.split(key)
    i = jax.random.randint(k_batch, (cfg.batch,), 0, x_all.shape[0])
    return solver.step(state, x_all[i], y_all[i], eta, k_attack, other)

  chunk = _common.keyed_steps(step, cfg.chunk)

  def mean_chunk(carry, *args):
    carry, values = chunk(carry, *args)
    return carry, jnp.mean(values)

  return jax.jit(mean_chunk)
