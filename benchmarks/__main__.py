"""``python -m benchmarks SUITE [options]``: run one benchmark suite, or ``all``.

Each suite module has ``main(args)`` taking the parsed arguments below; ``all`` runs the
suites that need no data files (the README's main job). Every argument is checked before
any work starts; ``python -m benchmarks SUITE --help`` describes one suite: what it
measures, its run time on 2 CPU cores, the data it reads and the options it takes.

JAX's persistent compilation cache is on: compiled programs are kept in
``~/.cache/kbeam_jax/jax`` (or ``$KBEAM_JAX_COMPILE_CACHE``, or ``--compile-cache DIR``)
and a second run loads them instead of compiling; ``--no-compile-cache`` turns it off.
JAX keeps no program that holds a host callback, so the programs that contain
``kbeam_jax.run``'s warning (``run(..., warn=True)``, the default) compile again.
``--devices N`` (or a list ``1,2,8``) runs the suites that train networks on N devices;
on a CPU it asks XLA for N virtual host devices, which show that the sharded programs
give the same numbers, not how they scale (they share the same cores).
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Suite:
  """What ``--help`` says about a suite, and the options it takes."""

  title: str  # one line for the listing in the main --help
  description: str
  # wall time on 2 CPU cores: full runs as measured for the reports in docs/pages/benchmarks/
  # (idle machine; a range where a second, slower machine took longer); --quick as upper
  # bounds, measured while other jobs loaded the machine (load average about 7)
  time: str
  data: str  # files read from KBEAM_JAX_DATA ("" for none)
  # --trials and --iters: the suite's defaults (full run, --quick), filled into the parsed
  # arguments before the suite runs, or a text when the suite resolves them itself (None: the
  # suite has no such option)
  trials: tuple[int, int] | None = None
  iters: tuple[int, int] | str | None = None
  resume: bool = False  # checkpoints every training run (--resume)
  photos: bool = False  # --photos DIR
  devices: bool = False  # --devices N[,N...]
  study: bool = False  # the 2D study's --paper and --spread
  protocols: tuple[str, ...] = ()  # --protocol's choices, the default first
  protocol_help: str = ""


DEFAULT_COMPILE_CACHE = Path("~/.cache/kbeam_jax/jax")


MNIST = "mnist/ (train and t10k IDX files, gzip or raw)"
SUITES = {
  "surfaces": Suite(
    "2D minimax surfaces, GDA vs K-beam (K-beam paper, Table 1)",
    "the K-beam paper's 2D minimax surfaces (Table 1): error |u_T - u*| of GDA, alternating "
    "GDA, optimistic GDA, extragradient and K-beam K = 1..10 with every ε-rule",
    "full 80 s; --quick (10 trials, 2 surfaces) under 1 min",
    "",
    trials=(100, 10),
    study=True,
    protocols=("clean", "authors", "both"),
    protocol_help="'authors' reproduces the authors' code (beams carried over K = 2 -> 5 -> "
    "10, Alt-GD max step first, 999 updates)",
  ),
  "bilevel_synthetic": Suite(
    "synthetic bilevel problems, every hypergradient method (penalty paper)",
    "synthetic bilevel problems (the penalty paper's two, a continuum of lower solutions, a "
    "badly scaled lower level): error of RMD, FMD, ApproxGrad, CG, Neumann and the penalty "
    "method after 2000 outer steps",
    "full 1.5 min; --quick under 1 min (compilation dominates)",
    "",
    trials=(20, 5),
  ),
  "bilevel_scaling": Suite(
    "time and memory of one hypergradient vs T and dim(v)",
    "time and memory of one hypergradient of each method against the inner steps T and "
    "dim(v), with fitted exponents",
    "full 5 to 6 min; --quick under 3 min",
    "",
  ),
  "games": Suite(
    "N-player games: naive, CO, SGA, LookAhead, LOLA, SOS, CGD, Stackelberg, three levels",
    "learning dynamics on the games of the literature (matching pennies, a bilinear game, "
    "the tandem game, the iterated prisoner's dilemma, a leader-follower game, a three-level "
    "program), every solver from 100 random starts vmapped: share at the equilibrium, final "
    "metric, steps, time per step, beside the published outcome",
    "full about 40 s; --quick under 1 min",
    "",
    trials=(100, 100),
  ),
  "gan_mog": Suite(
    "GAN on a mixture of 7 Gaussians, GDA vs K-beam",
    "the K-beam paper's GAN on a mixture of 7 Gaussians: JSD, modes covered and sample "
    "quality for GDA and K-beam K = 1, 2, 5, 10",
    "full (10 trials × 50,000 iterations) about 2 h (17 times the 7.4 min measured with "
    "--trials 3 --iters 10000); --quick (K = 1, i.e. alternating GDA, and K = 5; 3 × 5,000) "
    "under 1.5 min",
    "",
    trials=(10, 3),
    iters=(50_000, 5_000),
    resume=True,
    devices=True,
  ),
  "kbeam_rules": Suite(
    "the cost of a K-beam step under each direction rule",
    "the cost of a K-beam step under each direction rule (best, random, min_norm, kiwiel) "
    "on the scalar 2D problem and a GAN-sized step, beside rule best",
    "full 30 to 50 s; --quick under 1 min",
    "",
  ),
  "privacy": Suite(
    "minimax filter on GENKI faces",
    "the minimax filter on GENKI faces (Hamm, JMLR 2017): expression kept, gender hidden, "
    "for linear and 2-layer filters solved by K-beam, Kiwiel's rule and alternating GDA",
    "full 4 min; --quick under 2.5 min",
    "genki/genki.mat",
    trials=(3, 1),
    iters=(2_000, 500),
    resume=True,
  ),
  "domain_adaptation": Suite(
    "DANN MNIST -> MNIST-M, K domain classifiers as beams",
    "the DANN game MNIST -> MNIST-M with K = 1, 2, 5 domain classifiers as beams, beside "
    "source-only and target-trained bounds",
    "full (10,000 iterations) about 1.5 h (2.5 times the 35 min measured with --iters 4000); "
    "--quick (20) under 3.5 min",
    MNIST + "; photographs from --photos DIR or scikit-learn's sample images",
    iters=(10_000, 20),
    resume=True,
    photos=True,
    devices=True,
  ),
  "denoising": Suite(
    "importance weights for noisy MNIST labels (bilevel)",
    "importance weights for noisy MNIST labels (penalty, ApproxGrad, RMD, naive): test "
    "accuracy of the retrained classifier, precision and recall of the flagged points",
    "full 5 min; --quick under 1.5 min",
    MNIST,
    trials=(1, 1),
    resume=True,
  ),
  "poisoning": Suite(
    "data poisoning of a softmax classifier on MNIST (bilevel)",
    "data poisoning of a softmax classifier on MNIST, untargeted and targeted 3 -> 8, with "
    "10 to 60 poison points (penalty, ApproxGrad, CG, RMD, naive, label flip)",
    "full 2.7 min; --quick under 2.5 min",
    MNIST,
    trials=(1, 1),
    resume=True,
  ),
  "fewshot": Suite(
    "few-shot learning: sinusoids and MNIST (bilevel)",
    "few-shot learning as a bilevel problem: sinusoid regression and 5-way MNIST with "
    "rotations (RMD, ApproxGrad, penalty, naive, joint, untrained)",
    "full 9.6 min; --quick under 5 min",
    MNIST,
    trials=(1, 1),
    resume=True,
  ),
  "adversarial_defense": Suite(
    "minimax defense against adversarial examples on MNIST (machine vs machine)",
    "adversarial examples on MNIST: a CNN classifier defended by nothing, FGSM or PGD-40 "
    "adversarial training, or the minimax game against K = 1 and K = 5 network attackers "
    "(K-beam); evaluated clean, under FGSM, PGD-40 and a re-adapted attacker network at "
    "eta = 0.1, 0.2, 0.3, and the cat-and-mouse sequence",
    "full 16 min; --protocol paper 45 min per seed (one core each); --quick under 2 min",
    MNIST,
    iters="300 defense steps per eta, 2500 with --protocol paper (--quick: 10, and 20 with "
    "--protocol paper)",
    resume=True,
    protocols=("default", "paper"),
    protocol_help="'paper' is Hamm & Mehra's Table 5: eta 0.3-0.6, FGSM adversarial "
    "training, K = 1 and K = 5 against their 784-300-300-784 attacker network, 2500 steps, "
    "evaluated under FGSM and a re-adapted attacker network (adversarial_defense_paper.*)",
  ),
}
ALL = [name for name, suite in SUITES.items() if not suite.data]


def _count(flag: str, least: int = 1):
  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{flag} takes a whole number, got {text!r}") from None
    if value < least:
      default = f" (leave {flag} out for the suite's default)" if least else ""
      raise argparse.ArgumentTypeError(f"{flag} must be at least {least}, got {value}{default}")
    return value

  return parse


def _epilog(names: list[str]) -> str:
  lines = []
  for name in names:
    s = SUITES[name]
    lines += [
      f"{name}: {s.description}.",
      f"  run time on 2 CPU cores: {s.time} (--quick: measured on a busy machine)",
      f"  data: {s.data + ' (under $KBEAM_JAX_DATA)' if s.data else 'none'}",
    ]
  return "\n".join(lines)


HELP = {  # every option's help, {} filled in per suite
  "--quick": "few trials and iterations: a smoke check for CI",
  "--out": "output folder, created if missing (default: results)",
  "--seed": "first random seed (default: 0)",
  "--compile-cache": "folder of JAX's persistent compilation cache (default "
  f"$KBEAM_JAX_COMPILE_CACHE or {DEFAULT_COMPILE_CACHE})",
  "--no-compile-cache": "compile everything afresh, cache nothing",
  "--trials": "trials (seeds) per method (default {})",
  "--iters": "training iterations (default {})",
  "--resume": "checkpoint every training run in --out and continue from the checkpoints there "
  "(a run interrupted and resumed ends with the numbers of a straight run); without it "
  "nothing is checkpointed",
  "--photos": "a directory of photographs for the MNIST-M patches (default: scikit-learn's "
  "sample images)",
  "--devices": "device counts to time the K-beam step on, e.g. 1,2,8 (virtual CPU devices when "
  "there is no accelerator: they show the numbers agree, not the speed-up)",
  "--paper": "only the paper's six methods on its four surfaces, 100 trials, timed end to end "
  "beside the NumPy reference loop",
  "--spread": "trials of the long-run means and the spread of 100-trial means (default "
  "10,000, 20 × --trials with --quick; 0 with --paper)",
  "--protocol": "{}",
}


def _options(names: list[str]) -> list[tuple[str, dict]]:
  """The options the suites ``names`` take, as ``(flag, add_argument keywords)``."""
  uses = lambda field: [n for n in names if getattr(SUITES[n], field)]
  default = lambda field: "; ".join(
    f"{n}: {_default(getattr(SUITES[n], field))}" for n in uses(field)
  )
  flag = dict(action="store_true")
  table = [
    ("--quick", True, flag), ("--out", True, dict(type=Path, default=Path("results"))),
    ("--seed", True, dict(type=_count("--seed", 0), default=0)),
    ("--compile-cache", True, dict(type=Path, default=None)), ("--no-compile-cache", True, flag),
    ("--trials", uses("trials"), dict(type=_count("--trials"), fill=default("trials"))),
    ("--iters", uses("iters"), dict(type=_count("--iters"), fill=default("iters"))),
    ("--resume", uses("resume"), flag), ("--photos", uses("photos"), dict(type=Path)),
    ("--devices", uses("devices"), dict(type=_devices)), ("--paper", uses("study"), flag),
    ("--spread", uses("study"), dict(type=_count("--spread", 0))),
  ]  # fmt: skip
  for suite in (SUITES[n] for n in uses("protocols")):  # one suite takes --protocol
    choices = suite.protocols
    fill = f"{suite.protocol_help} (default: {choices[0]})"
    table.append(("--protocol", True, dict(choices=choices, default=choices[0], fill=fill)))
  keywords = lambda name, fill=None, **kw: dict(kw, help=HELP[name].format(fill))
  return [(name, keywords(name, **kw)) for name, taken, kw in table if taken]


def _parser() -> argparse.ArgumentParser:
  prog = "kbeam-benchmarks" if Path(sys.argv[0]).name == "kbeam-benchmarks" else None
  parser = argparse.ArgumentParser(
    prog=prog or "python -m benchmarks",
    description="Run a benchmark suite: it prints a table and writes SUITE.json, SUITE.md "
    "and SUITE.png to --out. `python -m benchmarks SUITE --help` shows one suite's options, "
    "run times and data. Data files are read from the folder $KBEAM_JAX_DATA names (e.g. "
    "KBEAM_JAX_DATA=/path/to/data); nothing is downloaded.",
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  title = "suites (run time of a full run on 2 CPU cores; SUITE --help for more)"
  sub = parser.add_subparsers(dest="suite", metavar="SUITE", required=True, title=title)
  for name in [*SUITES, "all"]:
    names = ALL if name == "all" else [name]
    if name == "all":
      short = long = "the suites that need no data files: " + ", ".join(ALL)
    else:
      suite = SUITES[name]
      data = suite.data.split(" (")[0] if suite.data else "none"
      full = re.sub(r" \(.*?\)", "", suite.time.split(";")[0])
      short, long = f"{suite.title}; {full}; data: {data}", suite.description
    p = sub.add_parser(
      name, help=short, description=f"python -m benchmarks {name}: {long}.",
      epilog=_epilog(names), formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.set_defaults(trials=None, iters=None, resume=False, photos=None, devices=None,
                   paper=False, protocol=None, spread=None)  # fmt: skip
    for flag, options in _options(names):
      p.add_argument(flag, **options)
  return parser


def _default(value: tuple[int, int] | str) -> str:
  """A suite's default as ``--help`` says it: ``(50_000, 5_000)`` -> ``50,000 (--quick: 5,000)``."""
  if isinstance(value, str):
    return value
  full, quick = value
  return f"{full:,}" if full == quick else f"{full:,} (--quick: {quick:,})"


def suite_args(args: argparse.Namespace, name: str) -> argparse.Namespace:
  """``args`` with the suite's default ``--trials`` / ``--iters`` (full or ``--quick``) where
  they were left out, so that a suite reads them as given."""
  args = argparse.Namespace(**vars(args))
  for option in ("trials", "iters"):
    default = getattr(SUITES[name], option)
    if getattr(args, option) is None and isinstance(default, tuple):
      setattr(args, option, default[args.quick])
  return args


def _devices(text: str) -> tuple[int, ...]:
  """``"1,2,8"`` -> ``(1, 2, 8)``."""
  try:
    counts = tuple(int(x) for x in text.split(","))
  except ValueError:
    counts = ()
  if not counts or min(counts) < 1:
    raise argparse.ArgumentTypeError(
      f"--devices takes device counts >= 1 separated by commas, got {text!r}"
    )
  return counts


def set_device_count(args: argparse.Namespace) -> None:
  """The virtual device count, set before anything imports JAX."""
  if args.devices and "jax" not in sys.modules:
    flag = f"--xla_force_host_platform_device_count={max(args.devices)}"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()


def setup_compile_cache(args: argparse.Namespace) -> None:
  """The persistent compilation cache, switched on only once the arguments are valid."""
  import jax

  if args.no_compile_cache:
    args.compile_cache = None
    return
  folder = args.compile_cache or Path(
    os.environ.get("KBEAM_JAX_COMPILE_CACHE", str(DEFAULT_COMPILE_CACHE))
  )
  folder = folder.expanduser()
  folder.mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(folder))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  args.compile_cache = folder


def _check_out(parser: argparse.ArgumentParser, out: Path) -> None:
  """``--out`` must be (or become) a writable folder: checked before any work."""
  for folder in (out, *out.parents):
    if folder.exists():
      if not folder.is_dir():
        parser.error(
          f"--out {out}: {folder} is a file, not a folder; pass a folder for the results "
          "(e.g. --out results)"
        )
      if not os.access(folder, os.W_OK | os.X_OK):
        parser.error(f"--out {out}: cannot write in {folder} (permission denied)")
      return


def _check_data(parser: argparse.ArgumentParser, suites: list[str]) -> None:
  """The data files a suite reads must exist before it starts computing."""
  from kbeam_jax import data

  need = {"privacy": [("genki.mat", "genki")]}
  mnist = [
    (f"{p}-{k}", "mnist")
    for p in ("train", "t10k")
    for k in ("images-idx3-ubyte", "labels-idx1-ubyte")
  ]
  for name in suites:
    for file, subdir in need.get(name, mnist if SUITES[name].data else []):
      try:
        data.find_file([file + ".gz", file] if subdir == "mnist" else file, subdir)
      except FileNotFoundError as e:
        message = str(e).replace(" (or pass data_dir=... to the loader)", "")
        parser.error(
          f"{name} reads {SUITES[name].data}: {message} For example: "
          f"KBEAM_JAX_DATA=/path/to/data python -m benchmarks {name}"
        )


def suite_module(name: str):
  """The module ``benchmarks.<name>``; importing it starts the suite's work (JAX, data)."""
  return importlib.import_module(f"benchmarks.{name}")


def main(argv: list[str] | None = None) -> int:
  parser = _parser()
  args = parser.parse_args(argv)
  suites = ALL if args.suite == "all" else [args.suite]
  set_device_count(args)  # first: before anything imports JAX
  _check_out(parser, args.out)
  _check_data(parser, suites)
  if args.photos is not None and not args.photos.is_dir():
    parser.error(f"--photos {args.photos}: not a folder; pass a directory of photographs")
  setup_compile_cache(args)
  for suite in suites:
    start, began = time.perf_counter(), time.time() - 1.0
    suite_module(suite).main(suite_args(args, suite))
    report = suite
    if args.devices and SUITES[suite].devices:
      report = f"{suite}_devices"
    elif args.protocol == "paper":
      report = f"{suite}_paper"
    print((args.out / f"{report}.md").read_text())
    files = [args.out / f"{report}.{e}" for e in ("json", "md", "png")]
    written = ",".join(f.suffix[1:] for f in files if f.exists() and f.stat().st_mtime >= began)
    print(
      f"[{suite}] done in {time.perf_counter() - start:.1f} s; "
      f"results in {args.out}/{report}.{{{written}}}"
    )
  return 0


if __name__ == "__main__":
  sys.exit(main())
