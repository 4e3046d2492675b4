"""``python -m benchmarks SUITE [--quick] [--out DIR]``, SUITE one of SUITES or ``all``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

SUITES = ("surfaces", "bilevel_synthetic", "bilevel_scaling")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
  parser.add_argument("suite", choices=SUITES + ("all",), help="which suite to run")
  parser.add_argument(
    "--quick",
    action="store_true",
    help="few trials and no repeats: a smoke check for CI (about a minute)",
  )
  parser.add_argument("--out", type=Path, default=Path("results"), help="output folder")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--trials", type=int, default=None, help="override the trial count")
  args = parser.parse_args(argv)

  suites = SUITES if args.suite == "all" else (args.suite,)
  for suite in suites:
    start = time.perf_counter()
    if suite == "surfaces":
      from benchmarks import surfaces

      trials = args.trials or (10 if args.quick else 100)
      surfaces.run_study(
        args.out,
        trials=trials,
        num_iters=1000,
        seed=args.seed,
        repeats=1 if args.quick else 3,
        names=["seesaw", "anti_saddle"] if args.quick else None,
      )
    elif suite == "bilevel_synthetic":
      from benchmarks import bilevel_synthetic

      bilevel_synthetic.run_suite(
        args.out,
        trials=args.trials or (5 if args.quick else 20),
        num_iters=300 if args.quick else 2000,
        seed=args.seed,
        repeats=1 if args.quick else 3,
      )
    elif suite == "bilevel_scaling":
      from benchmarks import bilevel_scaling

      bilevel_scaling.run_suite(args.out, quick=args.quick, repeats=1 if args.quick else 3)
    print((args.out / f"{suite}.md").read_text())
    print(
      f"[{suite}] done in {time.perf_counter() - start:.1f} s; "
      f"results in {args.out}/{suite}.{{json,md,png}}"
    )
  return 0


if __name__ == "__main__":
  sys.exit(main())
