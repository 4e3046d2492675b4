"""Machine vs machine: the minimax defense against adversarial examples (Hamm & Mehra 2017).

``python -m benchmarks adversarial_defense [--quick] [--iters N] [--resume] [--protocol paper]``

MNIST classifiers defended by nothing, FGSM or PGD adversarial training, or the game against
K = 1 and K = 5 attacker networks, evaluated clean, under FGSM, PGD-40 and a re-adapted
attacker network; then the cat-and-mouse sequence. Writes
``adversarial_defense[_paper].{json,md,png}``.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import _adversarial_report, _common
from benchmarks._adversarial_report import lookup as lookup  # the suite's face: re-exported
from benchmarks._adversarial_report import plot_cat_and_mouse as plot_cat_and_mouse
from benchmarks._adversarial_training import (
  CLEAN,
  VERSUS,
  Config,
  Defense,
  Trainer,
  attacker_training,
  check_config,
  chunk_fn,
  config,
)
from kbeam_jax import data, nn
from kbeam_jax.tasks import adversarial


def load(data_dir: str | None, cfg: Config) -> dict[str, np.ndarray]:
  """Training and test digits as float32 ``(N, 28, 28, 1)`` in [0, 1] and int32 labels."""
  train, test = data.load_mnist("train", data_dir), data.load_mnist("test", data_dir)
  need, n = max(cfg.test_size, cfg.pgd_test), cfg.train_size
  if test.images.shape[0] < need:
    raise ValueError(f"need {need} MNIST test images, found {test.images.shape[0]}.")
  return {
    "x_train": adversarial.to_images(train.images[:n]),
    "y_train": train.labels[:n].astype(np.int32),
    "x_test": adversarial.to_images(test.images[: cfg.test_size]),
    "y_test": test.labels[: cfg.test_size].astype(np.int32),
  }  # fmt: skip


@dataclasses.dataclass
class Study:
  """What a run's trainings and evaluations share: the config, the digits as device arrays,
  the seed, the checkpoints' folder (None: none), ``resume``, and the trainings so far."""

  cfg: Config
  d: dict[str, jax.Array]
  seed: int = 0
  out_dir: Path | None = None
  resume: bool = False
  runs: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # name, steps, train_s


def train(
  s: Study, trainer: Trainer, name: str, state: Any, key: jax.Array, eta: float, steps: int,
  other: Any = None,
) -> Any:  # fmt: skip
  """The state after ``steps`` of ``trainer`` from ``state`` against the frozen ``other``."""
  chunk = chunk_fn(trainer, s.cfg)
  other = jnp.zeros(()) if other is None else other
  args = (s.d["x_train"], s.d["y_train"], jnp.float32(eta), other)
  ckpt = None if s.out_dir is None else s.out_dir / "checkpoints" / name
  (state, _), _, timing = _common.train_in_chunks(
    lambda carry: chunk(carry, *args), (state, key), steps // s.cfg.chunk, checkpoint=ckpt,
    resume=s.resume, desc=name,
  )  # fmt: skip
  s.runs.append({"name": name, "steps": steps, "train_s": timing["run_s"]})
  return state


@functools.cache
def _counters(pgd_steps: int, attacker_layers: int) -> dict[str, Any]:
  """Jitted ``correct(u, x, y, eta, key, v)`` counts under every attack (compiled once)."""
  classifier, attacker = adversarial.graphdefs(attacker_layers=attacker_layers)

  def counter(attack):
    def count(u, x, y, eta, key, v):
      logits = adversarial.logits_fn(classifier, u)(attack(u, x, y, eta, key, v))
      return jnp.sum(jnp.argmax(logits, -1) == y)

    return jax.jit(count)

  attacks = adversarial.attacks(classifier, attacker, pgd_steps=pgd_steps)
  return {name: counter(attack) for name, attack in attacks.items()}


def accuracy(
  s: Study, attack: str, u: Any, eta: float, *, v: Any = None, key: Any = None, n: int | None = None
) -> float:
  """Accuracy of ``u`` on the first ``n`` (None: all) test digits under ``attack`` at ``eta``
  (``clean``, ``fgsm``, ``pgd`` or ``network`` with the attacker ``v``)."""
  fn = _counters(s.cfg.pgd_steps, s.cfg.attacker_layers)[attack]
  x, y, b, correct = s.d["x_test"][:n], s.d["y_test"][:n], s.cfg.eval_batch, 0
  key, v = jax.random.key(0) if key is None else key, jnp.zeros(()) if v is None else v
  for i in range(0, len(x), b):
    key, k = jax.random.split(key)
    correct += int(fn(u, x[i : i + b], y[i : i + b], eta, k, v))
  return correct / len(x)


def readapted_attacker(s: Study, u: Any, eta: float, name: str) -> Any:
  """A fresh attacker (the same initial weights for every classifier) trained
  ``attacker_steps`` steps against the frozen classifier ``u``."""
  key = jax.random.key(s.seed + 1000)
  v = adversarial.init_attacker(key, layers=s.cfg.attacker_layers)
  state = attacker_training(s.cfg).init(key, v)
  key = jax.random.fold_in(key, 1)
  return train(s, attacker_training, name, state, key, eta, s.cfg.attacker_steps, u).players[0]


def evaluate(s: Study, u: Any, eta: float, name: str, beams: Any = None) -> dict[str, float]:
  """Accuracies of ``u`` at ``eta``: clean, FGSM, PGD-40, re-adapted attacker, and the worst
  of the minimax defense's own final ``beams`` if given."""
  acc = {
    "clean": accuracy(s, "clean", u, eta), "fgsm": accuracy(s, "fgsm", u, eta),
    "pgd40": accuracy(s, "pgd", u, eta, key=jax.random.key(s.seed + 2000), n=s.cfg.pgd_test),
  }  # fmt: skip
  v = readapted_attacker(s, u, eta, f"{name}_readapted")
  acc["readapted"] = accuracy(s, "network", u, eta, v=v)
  if beams is not None:
    K = jax.tree.leaves(beams)[0].shape[0]
    acc["own_beams"] = min(accuracy(s, "network", u, eta, v=nn.unstack(beams, k)) for k in range(K))
  return acc


def show(what: str, acc: dict[str, float]) -> None:
  print(f"[adversarial_defense] {what}: " + ", ".join(f"{a} {v:.4f}" for a, v in acc.items()))


def defend(s: Study, defense: Defense, u0: Any, key: jax.Array, eta: float):
  """``(accuracies, curve)`` of ``defense`` trained from ``u0`` at ``eta``; at an η of
  ``curve_etas`` trained in segments of ``curve_every`` steps, evaluated after each."""
  name, cfg = f"adv_{defense.name}_eta{eta}", s.cfg
  if defense.trainer is None:
    acc = evaluate(s, u0, eta, name)
    show(f"{defense.name} η={eta}", acc)
    return acc, []
  state, curve = defense.trainer(cfg).init(key, u0), []
  curved = eta in cfg.curve_etas
  segments = cfg.defense_steps // cfg.curve_every if curved else 1
  for i in range(segments):
    steps = (i + 1) * cfg.defense_steps // segments
    tag, k = (f"{name}_to{steps}", jax.random.fold_in(key, i)) if curved else (name, key)
    state = train(s, defense.trainer, tag, state, k, eta, cfg.defense_steps // segments)
    last = steps == cfg.defense_steps
    u, beams = defense.trained(state)
    acc = evaluate(s, u, eta, name if last else f"{name}_at{steps}", beams)
    curve += [{"defense": defense.name, "eta": eta, "steps": steps, **acc}] if curved else []
    show(f"{defense.name} η={eta}" + ("" if last else f" after {steps} steps"), acc)
  return acc, curve


def cat_and_mouse(s: Study, u0: Any, eta: float) -> list[dict[str, Any]]:
  """Classifier and attacker take turns, each trained against the other's last move; then a
  fresh attacker against the last classifier."""
  tag, key, u, v, cfg = f"cat_eta{eta}", jax.random.key(s.seed + 3000), u0, None, s.cfg
  records = []

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
    state = train(s, attacker_training, f"{tag}_attacker{r}", state, k_a, eta, cfg.cat_steps, u)
    v = state.players[0]
    record(2 * r - 1, "attacker", f"attacker_{r}", accuracy(s, "network", u, eta, v=v))
    state = VERSUS(cfg).init(k_c, u)
    u = train(s, VERSUS, f"{tag}_classifier{r}", state, k_c, eta, cfg.cat_steps, v).players[0]
    record(2 * r, "classifier", f"attacker_{r}", accuracy(s, "network", u, eta, v=v))
  fresh = readapted_attacker(s, u, eta, f"{tag}_readapted")
  record(2 * cfg.cat_rounds, "final", "readapted", accuracy(s, "network", u, eta, v=fresh))
  record(2 * cfg.cat_rounds, "final", "clean", accuracy(s, "clean", u, eta))
  return records


def run_suite(
  out_dir: Path, cfg: Config | None = None, *, seed: int = 0, resume: bool = False,
  data_dir: str | None = None, d: dict[str, np.ndarray] | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
  """Every defense at every η, then the cat-and-mouse sequence; writes the report and returns
  the records. ``d`` (as ``load`` returns it) replaces MNIST."""
  cfg = Config() if cfg is None else cfg
  check_config(cfg)
  start = time.perf_counter()
  d = load(data_dir, cfg) if d is None else d
  s = Study(cfg, jax.tree.map(jnp.asarray, d), seed, out_dir, resume)
  k_init, k_clean, k_defense = jax.random.split(jax.random.key(seed), 3)
  state = CLEAN(cfg).init(k_init, adversarial.init_classifier(k_init))
  u0 = train(s, CLEAN, "adv_none", state, k_clean, cfg.etas[0], cfg.clean_steps).players[0]
  records, curves = [], []
  for eta in cfg.etas:
    for defense in cfg.defenses:
      acc, curve = defend(s, defense, u0, k_defense, eta)
      curves += curve
      records += [{
        "defense": defense.name, "train_eta": None if defense.trainer is None else eta,
        "attack": attack, "eta": None if attack == "clean" else eta, "accuracy": value,
        "test_images": cfg.pgd_test if attack == "pgd40" else cfg.test_size,
      } for attack, value in acc.items()]  # fmt: skip
  for eta in cfg.cat_etas:
    records += cat_and_mouse(s, u0, eta)
  meta = {
    "config": {**cfg._asdict(), "defenses": [x.name for x in cfg.defenses], "rule": repr(cfg.rule)},
    "seed": seed, "wall_s": time.perf_counter() - start,
    "train_images": int(d["x_train"].shape[0]), "runs": s.runs, "curves": curves,
    "environment": _common.environment(),
  }  # fmt: skip
  text, fig = _adversarial_report.report(records, meta), _adversarial_report.plot(records, meta)
  name = "adversarial_defense" + ("_paper" if cfg.protocol == "paper" else "")
  _common.publish(out_dir, name, records, meta, text, fig)
  return records


def main(args) -> None:
  run_suite(
    args.out, config(args.quick, args.iters, args.protocol), seed=args.seed, resume=args.resume
  )
