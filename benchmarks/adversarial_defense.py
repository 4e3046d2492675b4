"""Machine vs machine: the minimax defense against adversarial examples (Hamm & Mehra 2017).

``python -m benchmarks adversarial_defense [--quick] [--iters N] [--resume] [--out results]``

MNIST (``KBEAM_JAX_DATA``), pixels in [0, 1], L∞ perturbations of size η in {0.1, 0.2,
0.3}; the classifier and the network attacker of ``kbeam_jax.tasks.adversarial``; batch
64; Adam with step 1e-3 for the classifier in every defense and for the evaluation's
attackers, 1e-2 for the minimax defense's beams (the follower ten times faster than the
leader), whose tanh-saturation penalty is 0.1 (``adversarial.objective``).

1. ``none``: the classifier trained on clean images (``clean_steps``). Every defense
   starts from it and trains ``defense_steps`` more steps, separately at each η:
2. ``fgsm`` / ``pgd``: adversarial training, every batch replaced by its FGSM / PGD-40
   (random start) images against the current classifier (ordinary optax training);
3. ``minimax_k1`` / ``minimax_k5``: the game ``min_u max_v f(u, v)`` of
   ``adversarial.objective`` solved by ``minimax.kbeam`` with K = 1 (alternating
   descent-ascent) and K = 5 network attackers as beams (``nn.stack_modules``).

Every final classifier is evaluated at its η (``none`` at every η): clean accuracy
(``test_size`` test digits), FGSM, PGD-40 with a random start (the first ``pgd_test``
test digits), and the re-adapted attacker: a fresh attacker network (the same initial
weights for every classifier) trained ``attacker_steps`` steps from scratch against the
frozen classifier on the training images, then applied to the test digits. The minimax
defenses are also evaluated against their own final beams (the static evaluation).

The cat-and-mouse sequence at each η of ``cat_etas``: from ``none``, an attacker is
trained against the classifier, the classifier is retrained on that attacker, the
attacker retrained (warm-started) against the new classifier, ... (``cat_rounds`` rounds
of ``cat_steps`` steps per move), then a fresh attacker is trained against the last
classifier.

Every training runs in checkpointed chunks of ``chunk`` steps (one compiled
``lax.scan`` each); ``--resume`` continues from the checkpoints in ``--out``.
Writes ``adversarial_defense.json``, ``.md`` and ``.png``.
"""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import _common
from kbeam_jax import data, minimax, nn
from kbeam_jax.tasks import adversarial

ETAS = (0.1, 0.2, 0.3)
DEFENSES = ("none", "fgsm", "pgd", "minimax_k1", "minimax_k5")
ATTACKS = ("clean", "fgsm", "pgd40", "readapted")
NON_MINIMAX = ("none", "fgsm", "pgd")
# Madry et al. 2018 (Table 1, MNIST, η = 0.3, white-box PGD): their large CNN after 100k
# iterations of PGD-40 adversarial training. Shown for scale only.
PUBLISHED = {("pgd", "pgd40", 0.3): 0.89}


class Config(NamedTuple):
  """Sizes and hyperparameters of one run (hashable: it keys the compiled programs)."""

  etas: tuple[float, ...] = ETAS
  defenses: tuple[str, ...] = DEFENSES
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
  protocol: str = "default"  # names the outputs: adversarial_defense[_paper].json


# Hamm & Mehra 2017, Table 5 (MNIST): test error at η = 0.3, 0.4, 0.5, 0.6 under FGSM
# against the current classifier (FGSM-curr) and under an attacker network trained against
# the current classifier (AttNet-curr). Only the cells quoted in our notes; the others are
# left blank rather than guessed.
PAPER_ETAS = (0.3, 0.4, 0.5, 0.6)
PAPER_TABLE5 = {
  ("minimax_k5", "fgsm"): (0.218, 0.238, 0.342, 0.299),
  ("minimax_k5", "readapted"): (0.020, 0.552, 1.000, 1.000),
  ("minimax_k1", "readapted"): (0.104, None, None, None),
  ("fgsm", "readapted"): (0.965, None, None, None),
}


def paper_config() -> Config:
  """The paper's protocol (``--protocol paper``): η in {0.3, 0.4, 0.5, 0.6}; defenses FGSM
  adversarial training, alternating descent-ascent (K = 1) and the minimax defense (K =
  5); every attacker the paper's AttNet, a fully connected 784-300-300-784 network
  (``attacker_layers=2``: "three layers" read as three layers of weights); 2,500 defense
  steps, where our η = 0.3 curve (docs/pages/benchmarks/adversarial_defense.md) saw the
  re-adapted attacker's accuracy level off; the defenses evaluated along training at η = 0.3."""
  return Config(
    etas=PAPER_ETAS,
    defenses=("none", "fgsm", "minimax_k1", "minimax_k5"),
    attacker_layers=2,
    defense_steps=2500,
    cat_etas=(),
    curve_etas=(0.3,),
    protocol="paper",
  )


def config(quick: bool = False, iters: int | None = None, protocol: str = "default") -> Config:
  """The default run (or ``protocol="paper"``), or ``quick``: a smoke check (tiny steps;
  not a result)."""
  if protocol not in ("default", "paper"):
    raise ValueError(f"protocol must be 'default' or 'paper', got {protocol!r}.")
  cfg = paper_config() if protocol == "paper" else Config()
  if quick:
    cfg = cfg._replace(
      clean_steps=100,
      defense_steps=10,
      attacker_steps=20,
      chunk=10,
      test_size=500,
      pgd_test=100,
      eval_batch=100,
      cat_rounds=2,
      cat_steps=10,
    )
  if quick and protocol == "paper":
    cfg = cfg._replace(defense_steps=20, curve_every=10)  # one point along the curve
  if iters is not None:  # segments and chunks that divide any iters (and the other counts)
    curve_every = math.gcd(cfg.curve_every, iters)
    cfg = cfg._replace(
      defense_steps=iters, curve_every=curve_every, chunk=math.gcd(cfg.chunk, curve_every)
    )
  return cfg


def check_config(cfg: Config) -> None:
  """Raises on sizes or names the suite cannot run, before anything trains."""
  for eta in cfg.etas + cfg.cat_etas:
    adversarial.check_eta(eta)
  for defense in cfg.defenses:
    if defense.startswith("minimax_k") and defense[len("minimax_k") :].isdigit():
      if _num_beams(defense) < 1:
        raise ValueError(f"K (the number of attacker beams) must be >= 1, got {defense!r}.")
    elif defense not in DEFENSES:
      raise KeyError(
        f"unknown defenses [{defense!r}]; known: none, fgsm, pgd, minimax_k<K> (K >= 1)."
      )
  for name in ("clean_steps", "defense_steps", "attacker_steps", "cat_steps"):
    steps = getattr(cfg, name)
    if steps < cfg.chunk or steps % cfg.chunk:
      raise ValueError(f"{name}={steps} must be a positive multiple of chunk={cfg.chunk}.")
  if cfg.curve_etas and cfg.defense_steps % cfg.curve_every:
    raise ValueError(
      f"defense_steps={cfg.defense_steps} must be a multiple of curve_every={cfg.curve_every}."
    )
  if cfg.curve_etas and cfg.curve_every % cfg.chunk:
    raise ValueError(f"curve_every={cfg.curve_every} must be a multiple of chunk={cfg.chunk}.")
  if cfg.attacker_layers < 1:
    raise ValueError(f"attacker_layers must be >= 1, got {cfg.attacker_layers}.")
  if cfg.pgd_test > cfg.test_size:
    raise ValueError(
      f"pgd_test={cfg.pgd_test} must be at most test_size={cfg.test_size} (PGD-40 runs on "
      "the first pgd_test of the test digits loaded)."
    )
  minimax_solver(cfg)  # the rule, ascent_steps and the step sizes, checked now
  if cfg.test_size % cfg.eval_batch or cfg.pgd_test % cfg.eval_batch:
    raise ValueError(
      f"test_size={cfg.test_size} and pgd_test={cfg.pgd_test} must be multiples of "
      f"eval_batch={cfg.eval_batch} (one compiled evaluation per attack)."
    )


def load(data_dir: str | None, cfg: Config) -> dict[str, np.ndarray]:
  """Training and test digits as float32 ``(N, 28, 28, 1)`` in [0, 1] and int32 labels."""
  train, test = data.load_mnist("train", data_dir), data.load_mnist("test", data_dir)
  n = train.images.shape[0] if cfg.train_size is None else cfg.train_size
  if test.images.shape[0] < max(cfg.test_size, cfg.pgd_test):
    raise ValueError(
      f"need {max(cfg.test_size, cfg.pgd_test)} MNIST test images, found {test.images.shape[0]}."
    )
  return {
    "x_train": adversarial.to_images(train.images[:n]),
    "y_train": train.labels[:n].astype(np.int32),
    "x_test": adversarial.to_images(test.images[: cfg.test_size]),
    "y_test": test.labels[: cfg.test_size].astype(np.int32),
  }


# --- Training programs: one compiled chunk of ``cfg.chunk`` steps per kind ---------------


def minimax_solver(cfg: Config):
  """``minimax.kbeam`` on ``adversarial.objective``: Adam for the classifier and for
  every beam; rule ``best`` steps the classifier against the strongest attacker."""
  classifier, attacker = adversarial.graphdefs(attacker_layers=cfg.attacker_layers)
  f = adversarial.objective(classifier, attacker, penalty=cfg.penalty)
  leader, follower = optax.adam(cfg.lr), optax.adam(cfg.beam_lr)
  return minimax.kbeam(f, leader, follower, ascent_steps=cfg.ascent_steps, rule=cfg.rule)


def optimizer(kind: str, cfg: Config) -> optax.GradientTransformation:
  """Adam for the attackers and the classifier; the clean pre-training decays its step
  along a cosine to a tenth."""
  if kind == "attacker":
    return optax.adam(cfg.attacker_lr)
  if kind == "clean":
    return optax.adam(optax.cosine_decay_schedule(cfg.lr, cfg.clean_steps, alpha=0.1))
  return optax.adam(cfg.lr)


def _num_beams(kind: str) -> int:
  return int(kind.split("_k")[1])


def init_state(kind: str, key: jax.Array, cfg: Config, u: Any = None, v: Any = None) -> Any:
  """The training state of ``kind``: ``(params, opt_state)`` or a ``KBeamState``.

  ``kind``: ``clean``, ``fgsm``, ``pgd``, ``versus`` (the classifier against a fixed
  attacker), ``minimax_k<K>`` (these from the classifier ``u``) or ``attacker`` (from
  the attacker ``v``, or a fresh one drawn from ``key``).
  """
  if kind.startswith("minimax_k"):
    K = _num_beams(kind)
    k_beams, k_solver = jax.random.split(key)
    make = functools.partial(adversarial.Attacker, layers=cfg.attacker_layers)
    _, beams = nn.stack_modules(make, k_beams, K)
    return minimax_solver(cfg).init(k_solver, u, beams, K)
  if kind == "attacker":
    v = adversarial.init_attacker(key, layers=cfg.attacker_layers) if v is None else v
    return v, optimizer(kind, cfg).init(v)
  if kind in ("clean", "fgsm", "pgd", "versus"):
    return u, optimizer(kind, cfg).init(u)
  raise KeyError(f"unknown training kind {kind!r}.")


@functools.cache
def chunk_fn(kind: str, cfg: Config):
  """``(carry, x, y, eta, other) -> (carry, mean value)``, ``cfg.chunk`` steps of ``kind``
  in one jitted ``lax.scan``; ``carry = (state, key)``, ``other`` the frozen opponent
  (the classifier for ``attacker``, the attacker for ``versus``, else unused)."""
  classifier, attacker = adversarial.graphdefs(attacker_layers=cfg.attacker_layers)
  loss = adversarial.classification_loss(classifier)
  game = adversarial.objective(classifier, attacker)
  solver = minimax_solver(cfg) if kind.startswith("minimax_k") else None
  opt = optimizer(kind, cfg)

  def attacked(u, x, y, eta, other, key):
    logits = adversarial.logits_fn(classifier, u)
    if kind == "fgsm":
      return adversarial.fgsm(logits, x, y, eta)
    if kind == "pgd":
      return adversarial.pgd(logits, x, y, eta, num_steps=cfg.pgd_steps, key=key)
    if kind == "versus":
      return adversarial.attack(attacker, other, x, eta)
    return x

  def step(state, key, x_all, y_all, eta, other):
    k_batch, k_attack = jax.random.split(key)
    i = jax.random.randint(k_batch, (cfg.batch,), 0, x_all.shape[0])
    x, y = x_all[i], y_all[i]
    if solver is not None:
      state, info = solver.step(state, x, y, eta)
      return state, jnp.max(info.values)
    params, opt_state = state
    if kind == "attacker":
      value, g = jax.value_and_grad(lambda v: -game(other, v, x, y, eta))(params)
      value = -value
    else:
      value, g = jax.value_and_grad(loss)(params, attacked(params, x, y, eta, other, k_attack), y)
    updates, opt_state = opt.update(g, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), value

  @jax.jit
  def chunk(carry, x_all, y_all, eta, other):
    state, key = carry
    key, k = jax.random.split(key)
    state, values = jax.lax.scan(
      lambda s, k: step(s, k, x_all, y_all, eta, other), state, jax.random.split(k, cfg.chunk)
    )
    return (state, key), jnp.mean(values)

  return chunk


def train(
  kind: str,
  name: str,
  state: Any,
  key: jax.Array,
  d: dict[str, jax.Array],
  eta: float,
  num_steps: int,
  cfg: Config,
  *,
  other: Any = None,
  out_dir: Path | None = None,
  resume: bool = False,
) -> tuple[Any, dict[str, Any]]:
  """Runs ``num_steps`` of ``kind`` from ``state`` in checkpointed chunks.

  Returns the final state and ``{"name", "steps", "train_s", "values"}`` (the mean game
  value or loss of every chunk)."""
  chunk = chunk_fn(kind, cfg)
  eta_arr = jnp.float32(eta)
  other = jnp.zeros(()) if other is None else other
  checkpoint = None if out_dir is None else out_dir / "checkpoints" / name
  (state, _), history, timing = _common.train_in_chunks(
    lambda carry: chunk(carry, d["x_train"], d["y_train"], eta_arr, other),
    (state, key),
    num_steps // cfg.chunk,
    checkpoint=checkpoint,
    resume=resume,
    desc=name,
  )
  return state, {"name": name, "steps": num_steps, "train_s": timing["run_s"], "values": history}


def classifier_params(state: Any) -> Any:
  return state.u if isinstance(state, minimax.KBeamState) else state[0]


# --- Evaluation ---------------------------------------------------------------------------


@functools.cache
def _counters(pgd_steps: int, attacker_layers: int):
  """Jitted ``correct(u, x, y, eta, key, v)`` counts for every attack (compiled once)."""
  classifier, attacker = adversarial.graphdefs(attacker_layers=attacker_layers)

  def count(u, x_adv, y):
    return jnp.sum(jnp.argmax(adversarial.logits_fn(classifier, u)(x_adv), -1) == y)

  def with_attack(make):
    return jax.jit(lambda u, x, y, eta, key, v: count(u, make(u, x, y, eta, key, v), y))

  logits = lambda u: adversarial.logits_fn(classifier, u)
  return {
    "clean": with_attack(lambda u, x, y, eta, key, v: x),
    "fgsm": with_attack(lambda u, x, y, eta, key, v: adversarial.fgsm(logits(u), x, y, eta)),
    "pgd40": with_attack(
      lambda u, x, y, eta, key, v: adversarial.pgd(
        logits(u), x, y, eta, num_steps=pgd_steps, key=key
      )
    ),
    "network": with_attack(lambda u, x, y, eta, key, v: adversarial.attack(attacker, v, x, eta)),
  }


def accuracy(
  attack: str,
  u: Any,
  x: np.ndarray,
  y: np.ndarray,
  eta: float,
  cfg: Config,
  *,
  v: Any = None,
  key: jax.Array | None = None,
) -> float:
  """Accuracy of the classifier ``u`` on ``(x, y)`` under ``attack`` at ``eta``
  (``clean``, ``fgsm``, ``pgd40`` or ``network`` with the attacker ``v``)."""
  fn = _counters(cfg.pgd_steps, cfg.attacker_layers)[attack]
  key = jax.random.key(0) if key is None else key
  v = jnp.zeros(()) if v is None else v
  b, correct = cfg.eval_batch, 0
  for i in range(0, len(x), b):
    key, k = jax.random.split(key)
    correct += int(fn(u, jnp.asarray(x[i : i + b]), jnp.asarray(y[i : i + b]), eta, k, v))
  return correct / len(x)


def readapted_attacker(
  u: Any,
  eta: float,
  d: dict[str, Any],
  cfg: Config,
  name: str,
  seed: int,
  *,
  out_dir: Path | None = None,
  resume: bool = False,
) -> tuple[Any, dict[str, Any]]:
  """A fresh attacker (the same initial weights for every classifier) trained
  ``attacker_steps`` steps against the frozen classifier ``u``."""
  key = jax.random.key(seed + 1000)
  state = init_state("attacker", key, cfg)
  state, run = train(
    "attacker", name, state, jax.random.fold_in(key, 1), d, eta, cfg.attacker_steps, cfg,
    other=u, out_dir=out_dir, resume=resume,
  )  # fmt: skip
  return state[0], run


def evaluate(
  u: Any,
  eta: float,
  d: dict[str, Any],
  cfg: Config,
  name: str,
  seed: int,
  *,
  beams: Any = None,
  out_dir: Path | None = None,
  resume: bool = False,
) -> tuple[dict[str, float], dict[str, Any]]:
  """Accuracies of ``u`` at ``eta``: clean, FGSM, PGD-40, re-adapted attacker, and the
  minimax defense's own final beams (the worst of them) if ``beams`` is given."""
  x, y = d["x_test_np"], d["y_test_np"]
  key = jax.random.key(seed + 2000)
  acc = {
    "clean": accuracy("clean", u, x, y, eta, cfg),
    "fgsm": accuracy("fgsm", u, x, y, eta, cfg),
    "pgd40": accuracy("pgd40", u, x[: cfg.pgd_test], y[: cfg.pgd_test], eta, cfg, key=key),
  }
  v, run = readapted_attacker(u, eta, d, cfg, f"{name}_readapted", seed, out_dir=out_dir,
                              resume=resume)  # fmt: skip
  acc["readapted"] = accuracy("network", u, x, y, eta, cfg, v=v)
  if beams is not None:
    K = jax.tree.leaves(beams)[0].shape[0]
    acc["own_beams"] = min(
      accuracy("network", u, x, y, eta, cfg, v=nn.unstack(beams, k)) for k in range(K)
    )
  return acc, run


# --- The study --------------------------------------------------------------------------


def show(what: str, acc: dict[str, float]) -> None:
  """One progress line: ``what`` and its accuracies."""
  print(f"[adversarial_defense] {what}: " + ", ".join(f"{a} {v:.4f}" for a, v in acc.items()))


def train_defense(
  defense: str,
  name: str,
  u0: Any,
  key: jax.Array,
  d: dict[str, Any],
  eta: float,
  cfg: Config,
  seed: int,
  **kw: Any,
) -> tuple[Any, list[dict[str, Any]], list[dict[str, Any]]]:
  """``cfg.defense_steps`` of ``defense`` from the classifier ``u0``: ``(state, runs,
  curve)``. At an η of ``cfg.curve_etas`` it trains in segments of ``cfg.curve_every``
  steps and evaluates the classifier after each but the last (``evaluate``; the last is
  the caller's final evaluation): the curve's points ``{"defense", "eta", "steps", ...
  accuracies}``."""
  state = init_state(defense, key, cfg, u=u0)
  if eta not in cfg.curve_etas:
    state, run = train(defense, name, state, key, d, eta, cfg.defense_steps, cfg, **kw)
    return state, [run], []
  runs, curve = [], []
  for i in range(cfg.defense_steps // cfg.curve_every):
    steps = (i + 1) * cfg.curve_every
    state, run = train(
      defense, f"{name}_to{steps}", state, jax.random.fold_in(key, i), d, eta,
      cfg.curve_every, cfg, **kw,
    )  # fmt: skip
    runs.append(run)
    if steps < cfg.defense_steps:
      acc, run = evaluate(
        classifier_params(state), eta, d, cfg, f"{name}_at{steps}", seed,
        beams=getattr(state, "beams", None), **kw,
      )  # fmt: skip
      runs.append(run)
      curve.append({"defense": defense, "eta": eta, "steps": steps, **acc})
      show(f"{defense} η={eta} after {steps} steps", acc)
  return state, runs, curve


def cat_and_mouse(
  u0: Any,
  eta: float,
  d: dict[str, Any],
  cfg: Config,
  seed: int,
  *,
  out_dir: Path | None = None,
  resume: bool = False,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
  """Classifier and attacker take turns, each trained against the other's last move."""
  x, y = d["x_test_np"], d["y_test_np"]
  tag = f"cat_eta{eta}"
  records, runs = [], []
  u, v = u0, None
  key = jax.random.key(seed + 3000)
  record = lambda move, mover, r, attack, acc: {
    "defense": "cat_and_mouse", "train_eta": eta, "attack": attack, "eta": eta,
    "accuracy": acc, "move": move, "mover": mover, "round": r,
  }  # fmt: skip
  records.append(record(0, "start", 0, "clean", accuracy("clean", u, x, y, eta, cfg)))
  for r in range(1, cfg.cat_rounds + 1):
    key, k_a, k_c = jax.random.split(key, 3)
    state = init_state("attacker", k_a, cfg, v=v)
    state, run = train(
      "attacker", f"{tag}_attacker{r}", state, k_a, d, eta, cfg.cat_steps, cfg,
      other=u, out_dir=out_dir, resume=resume,
    )  # fmt: skip
    v = state[0]
    runs.append(run)
    records.append(
      record(2 * r - 1, "attacker", r, f"attacker_{r}", accuracy("network", u, x, y, eta, cfg, v=v))
    )
    state, run = train(
      "versus", f"{tag}_classifier{r}", init_state("versus", k_c, cfg, u=u), k_c, d, eta,
      cfg.cat_steps, cfg, other=v, out_dir=out_dir, resume=resume,
    )  # fmt: skip
    u = state[0]
    runs.append(run)
    records.append(
      record(2 * r, "classifier", r, f"attacker_{r}", accuracy("network", u, x, y, eta, cfg, v=v))
    )
  fresh, run = readapted_attacker(u, eta, d, cfg, f"{tag}_readapted", seed, out_dir=out_dir,
                                  resume=resume)  # fmt: skip
  runs.append(run)
  last, r = 2 * cfg.cat_rounds, cfg.cat_rounds
  records.append(
    record(last, "final", r, "readapted", accuracy("network", u, x, y, eta, cfg, v=fresh))
  )
  records.append(record(last, "final", r, "clean", accuracy("clean", u, x, y, eta, cfg)))
  return records, runs


def run_suite(
  out_dir: Path,
  cfg: Config | None = None,
  *,
  seed: int = 0,
  resume: bool = False,
  data_dir: str | None = None,
  d: dict[str, np.ndarray] | None = None,
) -> list[dict[str, Any]]:
  """Trains and evaluates every defense at every η, runs the cat-and-mouse sequence,
  writes the JSON, markdown and figure; returns the records.

  ``d`` (``x_train``, ``y_train``, ``x_test``, ``y_test`` as ``load`` returns them)
  replaces MNIST when given."""
  cfg = Config() if cfg is None else cfg
  check_config(cfg)
  start = time.perf_counter()
  d = load(data_dir, cfg) if d is None else d
  dev = {
    "x_train": jnp.asarray(d["x_train"]),
    "y_train": jnp.asarray(d["y_train"]),
    "x_test_np": np.asarray(d["x_test"]),
    "y_test_np": np.asarray(d["y_test"]),
  }
  key = jax.random.key(seed)
  k_init, k_clean, k_defense = jax.random.split(key, 3)
  kw = dict(out_dir=out_dir, resume=resume)
  state = init_state("clean", k_init, cfg, u=adversarial.init_classifier(k_init))
  eta = cfg.etas[0]  # unused by clean training
  state, run = train("clean", "adv_none", state, k_clean, dev, eta, cfg.clean_steps, cfg, **kw)
  u0, runs, records, curves = state[0], [run], [], []

  def add(defense, train_eta, eta, acc):
    for attack, value in acc.items():
      records.append(
        {
          "defense": defense,
          "train_eta": train_eta,
          "attack": attack,
          "eta": None if attack == "clean" else eta,
          "accuracy": value,
          "test_images": cfg.pgd_test if attack == "pgd40" else cfg.test_size,
        }
      )

  for eta in cfg.etas:
    for defense in cfg.defenses:
      name = f"adv_{defense}_eta{eta}"
      if defense == "none":
        u, beams = u0, None
      else:
        state, defense_runs, curve = train_defense(
          defense, name, u0, k_defense, dev, eta, cfg, seed, **kw
        )
        runs += defense_runs
        u = classifier_params(state)
        beams = state.beams if isinstance(state, minimax.KBeamState) else None
      acc, run = evaluate(u, eta, dev, cfg, name, seed, beams=beams, **kw)
      runs.append(run)
      add(defense, None if defense == "none" else eta, eta, acc)
      if defense != "none" and eta in cfg.curve_etas:
        curves += curve + [{"defense": defense, "eta": eta, "steps": cfg.defense_steps, **acc}]
      show(f"{defense} η={eta}", acc)
  for eta in cfg.cat_etas:
    cat, cat_runs = cat_and_mouse(u0, eta, dev, cfg, seed, **kw)
    records += cat
    runs += cat_runs
  meta = {
    "config": {**cfg._asdict(), "rule": repr(cfg.rule)},
    "seed": seed,
    "wall_s": time.perf_counter() - start,
    "train_images": int(d["x_train"].shape[0]),
    "runs": [{k: r[k] for k in ("name", "steps", "train_s")} for r in runs],
    "curves": curves,
    "environment": _common.environment(),
  }
  stem = "adversarial_defense" + ("_paper" if cfg.protocol == "paper" else "")
  _common.write_json(out_dir / f"{stem}.json", records, meta)
  if cfg.protocol == "paper":
    report_paper(records, out_dir / f"{stem}.md", meta)
    plot_paper(records, curves, out_dir / f"{stem}.png", cfg)
  else:
    report(records, out_dir, meta)
    plot(records, out_dir, cfg)
  return records


# --- Report -------------------------------------------------------------------------------


def lookup(records: list[dict[str, Any]], defense: str, eta: float, attack: str) -> float | None:
  """The accuracy under ``attack`` of ``defense`` trained at ``eta`` (``none``: evaluated
  at ``eta``), or None if the records hold none."""
  for r in records:
    if r["defense"] == defense and r["attack"] == attack and r["train_eta"] in (None, eta):
      if attack == "clean" or r["eta"] == eta:
        return r["accuracy"]
  return None


def goal(records: list[dict[str, Any]], etas: tuple[float, ...], minimax_defense: str) -> dict:
  """Whether ``minimax_defense`` beats every non-minimax defense against the re-adapted
  attacker at every η, and keeps clean accuracy >= 98%, computed from the records."""
  beats, clean = {}, {}
  for eta in etas:
    ours = lookup(records, minimax_defense, eta, "readapted")
    others = [lookup(records, d, eta, "readapted") for d in NON_MINIMAX]
    others = [o for o in others if o is not None]
    beats[eta] = ours is not None and all(ours > o for o in others)
    clean[eta] = lookup(records, minimax_defense, eta, "clean")
  clean_ok = all(c is not None and c >= 0.98 for c in clean.values())
  return {"beats": beats, "clean": clean, "met": all(beats.values()) and clean_ok}


def report(records: list[dict[str, Any]], out_dir: Path, meta: dict[str, Any]) -> str:
  cfg = meta["config"]
  fmt = lambda a: "-" if a is None else f"{a:.4f}"
  sections = [
    f"# Adversarial examples: the minimax defense (MNIST, seed {meta['seed']}, "
    f"{meta['wall_s'] / 60:.1f} min on {meta['environment']['device']})",
    f"Every defense fine-tunes the clean classifier ({cfg['clean_steps']} steps) for "
    f"{cfg['defense_steps']} steps at its η (batch {cfg['batch']}, Adam {cfg['lr']}; the "
    f"K-beam beams Adam {cfg['beam_lr']}, {cfg['ascent_steps']} ascent step(s), rule "
    f"{cfg['rule']}, saturation penalty {cfg['penalty']}). "
    f"Clean, FGSM and re-adapted: {cfg['test_size']} test digits; PGD-40 (random start, "
    f"step 2.5η/40): the first {cfg['pgd_test']}. Re-adapted attacker: a fresh attacker "
    f"network trained {cfg['attacker_steps']} steps (Adam {cfg['attacker_lr']}) against the "
    "frozen classifier, from the same initial weights for every classifier. "
    "own beams: the worst of the minimax defense's final attackers (a static evaluation).",
  ]
  defenses = [d for d in cfg["defenses"] if any(r["defense"] == d for r in records)]
  for eta in cfg["etas"]:
    rows = []
    for defense in defenses:
      cells = [lookup(records, defense, eta, a) for a in ATTACKS + ("own_beams",)]
      pub = PUBLISHED.get((defense, "pgd40", eta))
      rows.append(
        [defense] + [fmt(c) for c in cells] + ["-" if pub is None else f"{pub:.2f} (Madry)"]
      )
    sections += [
      f"## η = {eta}",
      _common.markdown_table(
        [
          "defense",
          "clean",
          "FGSM",
          "PGD-40",
          "re-adapted attacker",
          "own beams",
          "published PGD-40",
        ],
        rows,
      ),  # fmt: skip
    ]
  for eta in cfg["cat_etas"]:
    cat = [r for r in records if r["defense"] == "cat_and_mouse" and r["eta"] == eta]
    seq = [r for r in cat if r["mover"] in ("attacker", "classifier")]
    final = {r["attack"]: r["accuracy"] for r in cat if r["mover"] == "final"}
    sections += [
      f"## Cat and mouse at η = {eta} ({cfg['cat_steps']} steps per move)",
      _common.markdown_table(
        ["move", "who moved", "accuracy against the current attacker"],
        [[r["move"], f"{r['mover']} (round {r['round']})", fmt(r["accuracy"])] for r in seq],
      ),
      f"The last classifier: clean {fmt(final.get('clean'))}, against a fresh re-adapted "
      f"attacker {fmt(final.get('readapted'))}.",
    ]
  if "minimax_k5" in defenses:
    g = goal(records, tuple(cfg["etas"]), "minimax_k5")
    verdict = "met" if g["met"] else "not met"
    sections.append(
      f"Goal (K = 5 beats none / FGSM / PGD adversarial training against the re-adapted "
      f"attacker at every η, clean >= 98%): **{verdict}**. Beats: "
      + ", ".join(f"η={e}: {'yes' if b else 'no'}" for e, b in g["beats"].items())
      + "; clean: "
      + ", ".join(f"η={e}: {fmt(c)}" for e, c in g["clean"].items())
      + "."
    )
  sections.append(
    "Published (Madry et al. 2018): 89% under PGD at η = 0.3 with a large CNN after 100k "
    "iterations of PGD adversarial training; shown for scale, our runs are far shorter."
  )
  text = "\n\n".join(sections)
  (out_dir / "adversarial_defense.md").write_text(text + "\n")
  return text


def report_paper(records: list[dict[str, Any]], path: Path, meta: dict[str, Any]) -> str:
  """Our test errors beside the paper's Table 5, cell for cell; the beams against the
  evaluation attacker; the η = 0.3 curve; the goal at η = 0.3."""
  cfg, etas = meta["config"], tuple(meta["config"]["etas"])
  err = lambda a: "-" if a is None else f"{1 - a:.3f}"
  names = {"fgsm": "FGSM adv. training", "minimax_k1": "alt. descent-ascent (K = 1)",
           "minimax_k5": "minimax (K-beam, K = 5)", "none": "no defense"}  # fmt: skip
  defenses = [d for d in cfg["defenses"] if any(r["defense"] == d for r in records)]
  rows = []
  for defense in defenses:
    for attack, label in (("fgsm", "FGSM-curr"), ("readapted", "AttNet-curr")):
      paper = PAPER_TABLE5.get((defense, attack), (None,) * len(PAPER_ETAS))
      cells = []
      for eta in etas:
        pub = paper[PAPER_ETAS.index(eta)] if eta in PAPER_ETAS else None
        ours = err(lookup(records, defense, eta, attack))
        cells.append(f"{ours} ({'-' if pub is None else f'{pub:.3f}'})")
      rows.append([names.get(defense, defense), label, *cells])
  beams = [
    [names.get(d, d)]
    + [
      f"{lookup(records, d, eta, 'own_beams'):.4f} / {lookup(records, d, eta, 'readapted'):.4f}"
      for eta in etas
    ]
    for d in defenses
    if d.startswith("minimax_k") and lookup(records, d, etas[0], "own_beams") is not None
  ]
  sections = [
    f"# The minimax defense at the paper's protocol (MNIST, seed {meta['seed']}, "
    f"{meta['wall_s'] / 60:.1f} min on {meta['environment']['device']})",
    f"Every defense fine-tunes the clean classifier ({cfg['clean_steps']} steps) for "
    f"{cfg['defense_steps']} steps at its η (batch {cfg['batch']}, Adam {cfg['lr']}; K-beam's "
    f"beams Adam {cfg['beam_lr']}, {cfg['ascent_steps']} ascent step(s), rule {cfg['rule']}). "
    f"Attackers: AttNet, fully connected 784-300-300-784 ({cfg['attacker_layers']} hidden "
    f"layers). AttNet-curr: a fresh AttNet trained {cfg['attacker_steps']} steps (Adam "
    f"{cfg['attacker_lr']}) against the final classifier; FGSM-curr: FGSM against it. "
    f"{cfg['test_size']} test digits.",
    "## Test error, ours (Hamm & Mehra 2017, Table 5)",
    _common.markdown_table(["defense", "attack", *[f"η = {e}" for e in etas]], rows),
    "Blank published cells: not quoted in our notes.",
  ]
  if beams:
    sections += [
      "## The beams against the evaluation attacker (accuracy: worst own beam / AttNet-curr)",
      _common.markdown_table(["defense", *[f"η = {e}" for e in etas]], beams),
    ]
  for eta in cfg["curve_etas"]:
    points = [c for c in meta["curves"] if c["eta"] == eta]
    if points:
      sections += [
        f"## Along training at η = {eta} (accuracy)",
        _common.markdown_table(
          ["defense", "steps", "clean", "FGSM-curr", "AttNet-curr", "own beams"],
          [
            [
              names.get(c["defense"], c["defense"]),
              c["steps"],
              f"{c['clean']:.4f}",
              f"{c['fgsm']:.4f}",
              f"{c['readapted']:.4f}",
              "-" if "own_beams" not in c else f"{c['own_beams']:.4f}",
            ]
            for c in points
          ],  # fmt: skip
        ),
      ]
  if "minimax_k5" in defenses and 0.3 in etas:
    readapted = lookup(records, "minimax_k5", 0.3, "readapted")
    clean = lookup(records, "minimax_k5", 0.3, "clean")
    met = readapted >= 0.95 and clean >= 0.98
    sections.append(
      f"Goal at η = 0.3 (K = 5 at or above 95% against AttNet-curr, clean at or above 98%): "
      f"**{'met' if met else 'not met'}** (AttNet-curr {readapted:.4f}, clean {clean:.4f})."
    )
  text = "\n\n".join(sections)
  path.write_text(text + "\n")
  return text


def plot_paper(
  records: list[dict[str, Any]], curves: list[dict[str, Any]], path: Path, cfg: Config
) -> None:
  """Test error against η under FGSM-curr and AttNet-curr (the paper's cells as crosses),
  and accuracy along training at the curve's η."""
  import matplotlib.pyplot as plt

  defenses = [d for d in cfg.defenses if any(r["defense"] == d for r in records)]
  fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
  for ax, (attack, title) in zip(
    axes[:2], (("fgsm", "FGSM-curr"), ("readapted", "AttNet-curr")), strict=True
  ):
    for i, defense in enumerate(defenses):
      acc = [lookup(records, defense, eta, attack) for eta in cfg.etas]
      ax.plot(cfg.etas, [1 - a for a in acc], marker="o", color=f"C{i}", label=defense)
      paper = PAPER_TABLE5.get((defense, attack))
      if paper:
        pts = [(e, p) for e, p in zip(PAPER_ETAS, paper, strict=True) if p is not None]
        ax.plot(*zip(*pts, strict=True), "x", ms=9, color=f"C{i}", label=f"{defense} (paper)")
    ax.set(xlabel="η", ylabel="test error", title=f"under {title}", ylim=(0, 1.02))
    ax.legend(fontsize=7)
  for i, defense in enumerate(defenses):
    pts = [c for c in curves if c["defense"] == defense]
    if pts:
      axes[2].plot([c["steps"] for c in pts], [c["readapted"] for c in pts], marker="o",
                   color=f"C{i}", label=f"{defense} vs AttNet-curr")  # fmt: skip
      if "own_beams" in pts[0]:
        axes[2].plot([c["steps"] for c in pts], [c["own_beams"] for c in pts], ls="--",
                     color=f"C{i}", label=f"{defense} vs own beams")  # fmt: skip
  eta = cfg.curve_etas[0] if cfg.curve_etas else None
  axes[2].set(xlabel="defense steps", ylabel="test accuracy", title=f"along training, η = {eta}",
              ylim=(0, 1))  # fmt: skip
  axes[2].legend(fontsize=7)
  _common.save_figure(fig, path)


def plot(records: list[dict[str, Any]], out_dir: Path, cfg: Config) -> None:
  import matplotlib.pyplot as plt

  defenses = [d for d in cfg.defenses if any(r["defense"] == d for r in records)]
  panels = [("readapted", "re-adapted attacker"), ("pgd40", "PGD-40")]
  fig, axes = plt.subplots(1, 2 + len(cfg.cat_etas), figsize=(5 * (2 + len(cfg.cat_etas)), 3.8))
  for ax, (attack, title) in zip(axes, panels, strict=False):
    for defense in defenses:
      acc = [lookup(records, defense, eta, attack) for eta in cfg.etas]
      ax.plot(cfg.etas, acc, marker="o", label=defense)
    ax.set(xlabel="η", ylabel="test accuracy", title=f"against {title}", ylim=(0, 1))
    ax.legend(fontsize=7)
  for ax, eta in zip(axes[2:], cfg.cat_etas, strict=True):
    plot_cat_and_mouse(ax, records, eta, defenses)
  _common.save_figure(fig, out_dir / "adversarial_defense.png")


def plot_cat_and_mouse(
  ax: Any, records: list[dict[str, Any]], eta: float, defenses: list[str]
) -> None:
  """Accuracy along the cat-and-mouse sequence, the defenses' re-adapted accuracy beside."""
  seq = [
    r
    for r in records
    if r["defense"] == "cat_and_mouse" and r["eta"] == eta and r["mover"] != "final"
  ]
  ax.plot([r["move"] for r in seq], [r["accuracy"] for r in seq], marker="o", color="black")
  for r in seq:
    if r["mover"] != "start":
      ax.annotate(r["mover"][0].upper(), (r["move"], r["accuracy"]), fontsize=7,
                  xytext=(3, 3), textcoords="offset points")  # fmt: skip
  for i, defense in enumerate(defenses):
    acc = lookup(records, defense, eta, "readapted")
    if acc is not None and defense != "none":
      color = f"C{i}"
      ax.axhline(acc, ls=":", lw=1, color=color, label=f"{defense} vs re-adapted")
  ax.set(
    xlabel="move (A: attacker retrained, C: classifier retrained)",
    ylabel="accuracy against the latest attacker",
    title=f"cat and mouse, η = {eta}",
    ylim=(0, 1),
  )
  ax.legend(fontsize=7)


def main(args) -> None:
  """``--quick``: a smoke check of every step (tiny training; not a result)."""
  cfg = config(args.quick, args.iters, args.protocol)
  run_suite(args.out, cfg, seed=args.seed, resume=args.resume)
