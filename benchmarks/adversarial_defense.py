"""Machine vs machine: the minimax defense against adversarial examples (Hamm & Mehra 2017).

``python -m benchmarks adversarial_defense [--quick] [--iters N] [--resume] [--out results]``

MNIST (``KBEAM_JAX_DATA``), pixels in [0, 1], L∞ perturbations of size η in {0.1, 0.2,
0.3}; the classifier, the network attacker and the attacks of ``kbeam_jax.tasks.adversarial``;
batch 64; Adam with step 1e-3 for the classifier in every defense and for the evaluation's
attackers, 1e-2 for the minimax defense's beams (the follower ten times faster than the
leader), whose tanh-saturation penalty is 0.1 (``adversarial.objective``).

The defenses are values (``Defense``: a name, a trainer, a number of beams), and every
trainer is a ``kbeam_jax.Solver`` that one chunk program drives (``_adversarial_training``):

1. ``NONE``: the classifier trained on clean images (``clean_steps``). Every defense
   starts from it and trains ``defense_steps`` more steps, separately at each η:
2. ``FGSM`` / ``PGD``: adversarial training (one-player ``games.gradient_play``), every
   batch replaced by its FGSM / PGD-40 (random start) images against the current classifier;
3. ``minimax_defense(1)`` / ``minimax_defense(5)``: the game ``min_u max_v f(u, v)`` of
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
``--protocol paper``: Hamm & Mehra's Table 5 protocol (``paper_config``). Writes
``adversarial_defense[_paper].json``, ``.md`` and ``.png`` (``_adversarial_report``).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import _common
from benchmarks._adversarial_report import PAPER_ETAS, plot, report
from benchmarks._adversarial_report import lookup as lookup  # the suite's face: re-exported
from benchmarks._adversarial_report import plot_cat_and_mouse as plot_cat_and_mouse
from benchmarks._adversarial_training import (
  CLEAN,
  DEFENSES,
  FGSM,
  NONE,
  VERSUS,
  Defense,
  Trainer,
  attacker_training,
  chunk_fn,
  minimax_defense,
  minimax_solver,
)
from kbeam_jax import data, minimax, nn
from kbeam_jax.tasks import adversarial

ETAS = (0.1, 0.2, 0.3)


class Config(NamedTuple):
  """Sizes and hyperparameters of one run (hashable: it keys the compiled programs)."""

  etas: tuple[float, ...] = ETAS
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


def paper_config() -> Config:
  """The paper's protocol (``--protocol paper``): η in {0.3, 0.4, 0.5, 0.6}; defenses FGSM
  adversarial training, alternating descent-ascent (K = 1) and the minimax defense (K =
  5); every attacker the paper's AttNet, a fully connected 784-300-300-784 network
  (``attacker_layers=2``: "three layers" read as three layers of weights); 2,500 defense
  steps, where our η = 0.3 curve (docs/pages/benchmarks/adversarial_defense.md) saw the
  re-adapted attacker's accuracy level off; the defenses evaluated along training at η = 0.3."""
  return Config(
    etas=PAPER_ETAS,
    defenses=(NONE, FGSM, minimax_defense(1), minimax_defense(5)),
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
      clean_steps=100, defense_steps=10, attacker_steps=20, chunk=10, test_size=500,
      pgd_test=100, eval_batch=100, cat_rounds=2, cat_steps=10,
    )  # fmt: skip
  if quick and protocol == "paper":
    cfg = cfg._replace(defense_steps=20, curve_every=10)  # one point along the curve
  if iters is not None:  # segments and chunks that divide any iters (and the other counts)
    curve_every = math.gcd(cfg.curve_every, iters)
    cfg = cfg._replace(
      defense_steps=iters, curve_every=curve_every, chunk=math.gcd(cfg.chunk, curve_every)
    )
  return cfg


def check_config(cfg: Config) -> None:
  """Raises on sizes or defenses the suite cannot run, before anything trains."""
  for eta in cfg.etas + cfg.cat_etas:
    adversarial.check_eta(eta)
  for defense in cfg.defenses:
    if not isinstance(defense, Defense):
      raise TypeError(
        f"defenses are Defense values (NONE, FGSM, PGD, minimax_defense(K)), got {defense!r}."
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


# --- The one training driver ---------------------------------------------------------------


class Study(NamedTuple):
  """What every training and evaluation of a run shares: the config, the digits (device
  arrays ``x_train``, ``y_train``, ``x_test``, ``y_test``), the seed, and the checkpoints'
  folder (``out_dir``, None: no checkpoints) and whether to resume from them."""

  cfg: Config
  d: dict[str, jax.Array]
  seed: int = 0
  out_dir: Path | None = None
  resume: bool = False


def train(
  s: Study, trainer: Trainer, name: str, state: Any, key: jax.Array, eta: float, steps: int,
  other: Any = None,
) -> tuple[Any, dict[str, Any]]:  # fmt: skip
  """Runs ``steps`` of ``trainer`` from ``state`` (``trainer(cfg).init(key, u)``) in
  checkpointed chunks. Returns the final state and ``{"name", "steps", "train_s",
  "values"}`` (the mean value of every chunk)."""
  chunk = chunk_fn(trainer, s.cfg)
  other = jnp.zeros(()) if other is None else other
  args = (s.d["x_train"], s.d["y_train"], jnp.float32(eta), other)
  (state, _), history, timing = _common.train_in_chunks(
    lambda carry: chunk(carry, *args),
    (state, key),
    steps // s.cfg.chunk,
    checkpoint=None if s.out_dir is None else s.out_dir / "checkpoints" / name,
    resume=s.resume,
    desc=name,
  )
  return state, {"name": name, "steps": steps, "train_s": timing["run_s"], "values": history}


# --- Evaluation ---------------------------------------------------------------------------


@functools.cache
def _counters(pgd_steps: int, attacker_layers: int) -> dict[str, Callable]:
  """Jitted ``correct(u, x, y, eta, key, v)`` counts under every attack (compiled once)."""
  classifier, attacker = adversarial.graphdefs(attacker_layers=attacker_layers)

  def counter(attack):
    def count(u, x, y, eta, key, v):
      logits = adversarial.logits_fn(classifier, u)(attack(u, x, y, eta, key, v))
      return jnp.sum(jnp.argmax(logits, -1) == y)

    return jax.jit(count)

  table = adversarial.attacks(classifier, attacker, pgd_steps=pgd_steps)
  return {name: counter(attack) for name, attack in table.items()}


def accuracy(
  s: Study, attack: str, u: Any, eta: float, *, v: Any = None, key: Any = None, n: int | None = None
) -> float:
  """Accuracy of the classifier ``u`` on the first ``n`` (None: all) test digits under
  ``attack`` at ``eta`` (``clean``, ``fgsm``, ``pgd`` or ``network`` with the attacker ``v``)."""
  fn = _counters(s.cfg.pgd_steps, s.cfg.attacker_layers)[attack]
  x, y = s.d["x_test"][:n], s.d["y_test"][:n]
  key = jax.random.key(0) if key is None else key
  v = jnp.zeros(()) if v is None else v
  b, correct = s.cfg.eval_batch, 0
  for i in range(0, len(x), b):
    key, k = jax.random.split(key)
    correct += int(fn(u, x[i : i + b], y[i : i + b], eta, k, v))
  return correct / len(x)


def readapted_attacker(s: Study, u: Any, eta: float, name: str) -> tuple[Any, dict[str, Any]]:
  """A fresh attacker (the same initial weights for every classifier) trained
  ``attacker_steps`` steps against the frozen classifier ``u``."""
  key = jax.random.key(s.seed + 1000)
  v = adversarial.init_attacker(key, layers=s.cfg.attacker_layers)
  state = attacker_training(s.cfg).init(key, v)
  state, run = train(
    s, attacker_training, name, state, jax.random.fold_in(key, 1), eta, s.cfg.attacker_steps, u
  )
  return state.players[0], run


def evaluate(
  s: Study, u: Any, eta: float, name: str, beams: Any = None
) -> tuple[dict[str, float], dict[str, Any]]:
  """Accuracies of ``u`` at ``eta``: clean, FGSM, PGD-40, re-adapted attacker, and the
  minimax defense's own final beams (the worst of them) if ``beams`` is given."""
  key = jax.random.key(s.seed + 2000)
  acc = {
    "clean": accuracy(s, "clean", u, eta),
    "fgsm": accuracy(s, "fgsm", u, eta),
    "pgd40": accuracy(s, "pgd", u, eta, key=key, n=s.cfg.pgd_test),
  }
  v, run = readapted_attacker(s, u, eta, f"{name}_readapted")
  acc["readapted"] = accuracy(s, "network", u, eta, v=v)
  if beams is not None:
    K = jax.tree.leaves(beams)[0].shape[0]
    acc["own_beams"] = min(accuracy(s, "network", u, eta, v=nn.unstack(beams, k)) for k in range(K))
  return acc, run


# --- The study --------------------------------------------------------------------------


def show(what: str, acc: dict[str, float]) -> None:
  """One progress line: ``what`` and its accuracies."""
  print(f"[adversarial_defense] {what}: " + ", ".join(f"{a} {v:.4f}" for a, v in acc.items()))


def defend(
  s: Study, defense: Defense, u0: Any, key: jax.Array, eta: float
) -> tuple[dict[str, float], list[dict[str, Any]], list[dict[str, Any]]]:
  """Trains ``defense`` from the clean classifier ``u0`` at ``eta`` (``defense_steps``) and
  evaluates it: ``(accuracies, runs, curve)``. At an η of ``curve_etas`` it trains in
  segments of ``curve_every`` steps and evaluates after each: the curve's points
  ``{"defense", "eta", "steps", ... accuracies}``, the last one the final evaluation."""
  name, cfg = f"adv_{defense.name}_eta{eta}", s.cfg
  if defense.trainer is None:
    acc, run = evaluate(s, u0, eta, name)
    show(f"{defense.name} η={eta}", acc)
    return acc, [run], []
  state = defense.trainer(cfg).init(key, u0)
  curved = eta in cfg.curve_etas
  segments = cfg.defense_steps // cfg.curve_every if curved else 1
  runs, curve = [], []
  for i in range(segments):
    steps = (i + 1) * cfg.defense_steps // segments
    tag, k = (f"{name}_to{steps}", jax.random.fold_in(key, i)) if curved else (name, key)
    state, run = train(s, defense.trainer, tag, state, k, eta, cfg.defense_steps // segments)
    last = steps == cfg.defense_steps
    u, beams = defense.trained(state)
    acc, eval_run = evaluate(s, u, eta, name if last else f"{name}_at{steps}", beams)
    runs += [run, eval_run]
    curve += [{"defense": defense.name, "eta": eta, "steps": steps, **acc}] if curved else []
    show(f"{defense.name} η={eta}" + ("" if last else f" after {steps} steps"), acc)
  return acc, runs, curve


def cat_and_mouse(
  s: Study, u0: Any, eta: float
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
  """Classifier and attacker take turns, each trained against the other's last move."""
  tag, key, u, v, cfg = f"cat_eta{eta}", jax.random.key(s.seed + 3000), u0, None, s.cfg
  records, runs = [], []

  def record(move, mover, attack, acc):
    records.append({
      "defense": "cat_and_mouse", "train_eta": eta, "attack": attack, "eta": eta,
      "accuracy": acc, "move": move, "mover": mover, "round": (move + 1) // 2,
    })  # fmt: skip

  record(0, "start", "clean", accuracy(s, "clean", u, eta))
  for r in range(1, cfg.cat_rounds + 1):
    key, k_a, k_c = jax.random.split(key, 3)
    v = adversarial.init_attacker(k_a, layers=cfg.attacker_layers) if v is None else v
    state = attacker_training(cfg).init(k_a, v)
    state, run_a = train(
      s, attacker_training, f"{tag}_attacker{r}", state, k_a, eta, cfg.cat_steps, u
    )
    v = state.players[0]
    record(2 * r - 1, "attacker", f"attacker_{r}", accuracy(s, "network", u, eta, v=v))
    state = VERSUS(cfg).init(k_c, u)
    state, run_c = train(s, VERSUS, f"{tag}_classifier{r}", state, k_c, eta, cfg.cat_steps, v)
    u = state.players[0]
    record(2 * r, "classifier", f"attacker_{r}", accuracy(s, "network", u, eta, v=v))
    runs += [run_a, run_c]
  fresh, run = readapted_attacker(s, u, eta, f"{tag}_readapted")
  runs.append(run)
  record(2 * cfg.cat_rounds, "final", "readapted", accuracy(s, "network", u, eta, v=fresh))
  record(2 * cfg.cat_rounds, "final", "clean", accuracy(s, "clean", u, eta))
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
  s = Study(cfg, jax.tree.map(jnp.asarray, d), seed, out_dir, resume)
  k_init, k_clean, k_defense = jax.random.split(jax.random.key(seed), 3)
  state = CLEAN(cfg).init(k_init, adversarial.init_classifier(k_init))
  state, run = train(s, CLEAN, "adv_none", state, k_clean, cfg.etas[0], cfg.clean_steps)
  u0, runs, records, curves = state.players[0], [run], [], []
  for eta in cfg.etas:
    for defense in cfg.defenses:
      acc, defense_runs, curve = defend(s, defense, u0, k_defense, eta)
      runs += defense_runs
      curves += curve
      for attack, value in acc.items():
        records.append({
          "defense": defense.name, "train_eta": None if defense.trainer is None else eta,
          "attack": attack, "eta": None if attack == "clean" else eta, "accuracy": value,
          "test_images": cfg.pgd_test if attack == "pgd40" else cfg.test_size,
        })  # fmt: skip
  for eta in cfg.cat_etas:
    cat, cat_runs = cat_and_mouse(s, u0, eta)
    records += cat
    runs += cat_runs
  meta = {
    "config": {
      **cfg._asdict(),
      "defenses": [defense.name for defense in cfg.defenses],
      "rule": repr(cfg.rule),
    },
    "seed": seed,
    "wall_s": time.perf_counter() - start,
    "train_images": int(d["x_train"].shape[0]),
    "runs": [{k: r[k] for k in ("name", "steps", "train_s")} for r in runs],
    "curves": curves,
    "environment": _common.environment(),
  }
  stem = out_dir / ("adversarial_defense" + ("_paper" if cfg.protocol == "paper" else ""))
  _common.write_json(stem.with_suffix(".json"), records, meta)
  report(records, meta, stem.with_suffix(".md"))
  plot(records, meta, stem.with_suffix(".png"))
  return records


def main(args) -> None:
  """``--quick``: a smoke check of every step (tiny training; not a result)."""
  cfg = config(args.quick, args.iters, args.protocol)
  run_suite(args.out, cfg, seed=args.seed, resume=args.resume)
