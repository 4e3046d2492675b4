"""``python -m benchmarks SUITE [--quick] [--out DIR]``, SUITE one of SUITES or ``all``.

Each suite module has ``main(args)`` taking the parsed arguments below; ``all`` runs the
suites that need no data files (the README's main job).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

# suite name -> needs data files (from KBEAM_JAX_DATA)
SUITES = {
  "surfaces": False,
  "bilevel_synthetic": False,
  "bilevel_scaling": False,
  "gan_mog": False,
  "privacy": True,
  "domain_adaptation": True,
  "denoising": True,
  "poisoning": True,
  "fewshot": True,
  "adversarial_defense": True,
}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
  parser.add_argument("suite", choices=tuple(SUITES) + ("all",), help="which suite to run")
  parser.add_argument(
    "--quick",
    action="store_true",
    help="few trials and no repeats: a smoke check for CI (about a minute)",
  )
  parser.add_argument("--out", type=Path, default=Path("results"), help="output folder")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--trials", type=int, default=None, help="override the trial count")
  parser.add_argument(
    "--iters", type=int, default=None, help="override the iteration count (suites that train)"
  )
  parser.add_argument(
    "--resume", action="store_true", help="continue from the checkpoints in --out if present"
  )
  parser.add_argument(
    "--photos",
    type=Path,
    default=None,
    help="domain_adaptation: a directory of photographs for the MNIST-M patches "
    "(default: scikit-learn's sample images)",
  )
  args = parser.parse_args(argv)

  if args.suite == "all":
    suites = [s for s, needs_data in SUITES.items() if not needs_data]
  else:
    suites = [args.suite]
  for suite in suites:
    start = time.perf_counter()
    importlib.import_module(f"benchmarks.{suite}").main(args)
    print((args.out / f"{suite}.md").read_text())
    print(
      f"[{suite}] done in {time.perf_counter() - start:.1f} s; "
      f"results in {args.out}/{suite}.{{json,md,png}}"
    )
  return 0


if __name__ == "__main__":
  sys.exit(main())
