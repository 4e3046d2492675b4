"""The adversarial_defense suite's report and figure, from the records and ``meta`` alone."""

from __future__ import annotations

from typing import Any

from benchmarks import _common

Records = list[dict[str, Any]]
COLUMNS = {"clean": "clean", "fgsm": "FGSM", "pgd40": "PGD-40",
           "readapted": "re-adapted attacker", "own_beams": "own beams"}  # fmt: skip
PAPER_ETAS = (0.3, 0.4, 0.5, 0.6)
BASELINES = ("none", "fgsm", "pgd")  # the defenses K = 5 must beat (the default goal)
# Hamm & Mehra 2017, Table 5 (MNIST): test error at PAPER_ETAS under FGSM-curr (our fgsm) and
# AttNet-curr (our readapted); only the cells quoted in our notes.
PAPER_TABLE5 = {
  ("minimax_k5", "fgsm"): (0.218, 0.238, 0.342, 0.299),
  ("minimax_k5", "readapted"): (0.020, 0.552, 1.000, 1.000),
  ("minimax_k1", "readapted"): (0.104, None, None, None),
  ("fgsm", "readapted"): (0.965, None, None, None),
}
# (defense, attack, η) -> (published accuracy, source): Madry et al. 2018, Table 1 (for scale
# only), and Table 5 above as 1 - test error.
PUBLISHED = {("pgd", "pgd40", 0.3): (0.89, "Madry"), **{
  (defense, attack, eta): (1 - error, "H&M") for (defense, attack), errors in PAPER_TABLE5.items()
  for eta, error in zip(PAPER_ETAS, errors, strict=True) if error is not None
}}  # fmt: skip


def lookup(records: Records, defense: str, eta: float, attack: str) -> float | None:
  """The accuracy under ``attack`` of ``defense`` trained (``none``: evaluated) at ``eta``."""
  for r in records:
    if r["defense"] == defense and r["attack"] == attack and r["train_eta"] in (None, eta):
      if attack == "clean" or r["eta"] == eta:
        return r["accuracy"]
  return None


def _fmt(a: float | None) -> str:
  return "-" if a is None else f"{a:.4f}"


def goal(records: Records, protocol: str, etas: list[float]) -> str:
  """The protocol's goal, met or not."""
  ours = lambda eta, attack: lookup(records, "minimax_k5", eta, attack)
  if protocol == "paper":
    readapted, clean = ours(0.3, "readapted"), ours(0.3, "clean")
    met = readapted is not None and clean is not None and readapted >= 0.95 and clean >= 0.98
    what = "at η = 0.3, K = 5 at or above 95% against the re-adapted attacker, clean at or "
    what, detail = what + "above 98%", f"Re-adapted {_fmt(readapted)}, clean {_fmt(clean)}"
  else:
    beats, clean = {}, {e: ours(e, "clean") for e in etas}
    for e in etas:
      k5, others = ours(e, "readapted"), [lookup(records, d, e, "readapted") for d in BASELINES]
      beats[e] = k5 is not None and all(k5 > o for o in others if o is not None)
    met = all(beats.values()) and all(c is not None and c >= 0.98 for c in clean.values())
    what = "K = 5 beats none / FGSM / PGD adversarial training against the re-adapted attacker "
    what += "at every η, clean >= 98%"
    detail = "Beats: " + ", ".join(f"η={e}: {'yes' if b else 'no'}" for e, b in beats.items())
    detail += "; clean: " + ", ".join(f"η={e}: {_fmt(c)}" for e, c in clean.items())
  return f"Goal ({what}): **{'met' if met else 'not met'}**. {detail}."


def report(records: Records, meta: dict[str, Any]) -> str:
  cfg = meta["config"]
  layers = "-".join(["784"] + ["300"] * cfg["attacker_layers"] + ["784"])
  sections = [
    f"# Adversarial examples: the minimax defense ({cfg['protocol']} protocol, MNIST, "
    f"seed {meta['seed']}, {meta['wall_s'] / 60:.1f} min on {meta['environment']['device']})",
    f"Every defense fine-tunes the clean classifier ({cfg['clean_steps']} steps) for "
    f"{cfg['defense_steps']} steps at its η (batch {cfg['batch']}, Adam {cfg['lr']}): fgsm "
    f"and pgd train on FGSM and PGD-{cfg['pgd_steps']} images; minimax_kK plays the game "
    f"against K attacker networks, the beams of K-beam (Adam {cfg['beam_lr']}, "
    f"{cfg['ascent_steps']} ascent step(s), rule {cfg['rule']}, saturation penalty "
    f"{cfg['penalty']}; K = 1 is alternating descent-ascent); none is the clean classifier. "
    f"Every attacker network is fully connected, {layers}. Clean, FGSM and re-adapted: "
    f"{cfg['test_size']} test digits; PGD-40 (random start, step 2.5η/40): the first "
    f"{cfg['pgd_test']}. Re-adapted attacker (the paper's AttNet-curr; FGSM is its "
    f"FGSM-curr): a fresh attacker network trained {cfg['attacker_steps']} steps (Adam "
    f"{cfg['attacker_lr']}) against the frozen classifier, from the same initial weights "
    "for every classifier. Own beams: the worst of the minimax defense's final attackers "
    "(a static evaluation).",
  ]
  defenses = [d for d in cfg["defenses"] if any(r["defense"] == d for r in records)]

  def cell(defense: str, eta: float, attack: str) -> str:
    ours, pub = _fmt(lookup(records, defense, eta, attack)), PUBLISHED.get((defense, attack, eta))
    return ours if pub is None else f"{ours} ({pub[0]:.3f} {pub[1]})"

  for eta in cfg["etas"]:
    cells = {h: lambda d, a=a, e=eta: cell(d, e, a) for a, h in COLUMNS.items()}
    sections += [f"## Accuracy at η = {eta}", _common.table(defenses, {"defense": str, **cells})]
  sections.append(
    "In parentheses, published accuracies: Madry, Madry et al. 2018 (a large CNN after "
    "100k iterations of PGD adversarial training; for scale, our runs are far shorter); "
    "H&M, Hamm & Mehra 2017, Table 5 (1 - test error; only the cells our notes quote)."
  )
  for eta in cfg["cat_etas"]:
    cat = [r for r in records if r["defense"] == "cat_and_mouse" and r["eta"] == eta]
    seq = [r for r in cat if r["mover"] in ("attacker", "classifier")]
    final = {r["attack"]: r["accuracy"] for r in cat if r["mover"] == "final"}
    head = f"## Cat and mouse at η = {eta} ({cfg['cat_steps']} steps per move)"
    sections += [head, _common.table(seq, {
      "move": lambda r: r["move"], "who moved": lambda r: f"{r['mover']} (round {r['round']})",
      "accuracy against the current attacker": lambda r: _fmt(r["accuracy"]),
    }), f"The last classifier: clean {_fmt(final.get('clean'))}, against a fresh re-adapted "
      f"attacker {_fmt(final.get('readapted'))}."]  # fmt: skip
  for eta in cfg["curve_etas"]:
    points = [c for c in meta["curves"] if c["eta"] == eta]
    sections += [f"## Along training at η = {eta} (accuracy)", _common.table(points, {
      "defense": lambda c: c["defense"], "steps": lambda c: c["steps"],
      **{h: lambda c, a=a: _fmt(c.get(a)) for a, h in COLUMNS.items()},
    })]  # fmt: skip
  if "minimax_k5" in defenses:
    sections.append(goal(records, cfg["protocol"], cfg["etas"]))
  return "\n\n".join(sections)


def plot(records: Records, meta: dict[str, Any]):
  import matplotlib.pyplot as plt

  cfg = meta["config"]
  defenses = [d for d in cfg["defenses"] if any(r["defense"] == d for r in records)]
  panels = [("readapted", "re-adapted attacker"), ("pgd40", "PGD-40"), ("fgsm", "FGSM")]
  n = len(panels) + len(cfg["cat_etas"]) + len(cfg["curve_etas"])
  fig, axes = plt.subplots(1, n, figsize=(5 * n, 3.8))
  for ax, (attack, title) in zip(axes, panels, strict=False):
    for i, defense in enumerate(defenses):
      acc = [lookup(records, defense, eta, attack) for eta in cfg["etas"]]
      ax.plot(cfg["etas"], acc, marker="o", color=f"C{i}", label=defense)
      pub = [(e, PUBLISHED[defense, attack, e][0]) for e in cfg["etas"]
             if (defense, attack, e) in PUBLISHED]  # fmt: skip
      if pub:
        ax.plot(*zip(*pub, strict=True), "x", ms=9, color=f"C{i}", label=f"{defense} (published)")
    ax.set(xlabel="η", ylabel="test accuracy", title=f"against {title}", ylim=(0, 1.02))
    ax.legend(fontsize=7)
  cat_axes = axes[len(panels) : len(panels) + len(cfg["cat_etas"])]
  for ax, eta in zip(cat_axes, cfg["cat_etas"], strict=True):
    plot_cat_and_mouse(ax, records, eta, defenses)
  for ax, eta in zip(axes[n - len(cfg["curve_etas"]) :], cfg["curve_etas"], strict=True):
    for i, defense in enumerate(defenses):
      pts = [c for c in meta["curves"] if c["defense"] == defense and c["eta"] == eta]
      for key, what, style in (("readapted", "re-adapted", {"marker": "o"}),
                               ("own_beams", "own beams", {"ls": "--"})):  # fmt: skip
        if pts and key in pts[0]:
          ax.plot([c["steps"] for c in pts], [c[key] for c in pts], color=f"C{i}",
                  label=f"{defense} vs {what}", **style)  # fmt: skip
    ax.set(xlabel="defense steps", ylabel="test accuracy", title=f"along training, η = {eta}",
           ylim=(0, 1))  # fmt: skip
    ax.legend(fontsize=7)
  return fig


def plot_cat_and_mouse(ax: Any, records: Records, eta: float, defenses: list[str]) -> None:
  """Accuracy along the cat-and-mouse sequence, the defenses' re-adapted accuracy beside."""
  moves = lambda r: r["defense"] == "cat_and_mouse" and r["eta"] == eta and r["mover"] != "final"
  seq = [r for r in records if moves(r)]
  ax.plot([r["move"] for r in seq], [r["accuracy"] for r in seq], marker="o", color="black")
  for r in seq:
    if r["mover"] != "start":
      ax.annotate(r["mover"][0].upper(), (r["move"], r["accuracy"]), fontsize=7,
                  xytext=(3, 3), textcoords="offset points")  # fmt: skip
  for i, defense in enumerate(defenses):
    acc = lookup(records, defense, eta, "readapted")
    if acc is not None and defense != "none":
      ax.axhline(acc, ls=":", lw=1, color=f"C{i}", label=f"{defense} vs re-adapted")
  ax.set(xlabel="move (A: attacker retrained, C: classifier retrained)",
         ylabel="accuracy against the latest attacker", title=f"cat and mouse, η = {eta}",
         ylim=(0, 1))  # fmt: skip
  ax.legend(fontsize=7)
