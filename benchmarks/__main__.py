"""``python -m benchmarks SUITE [--quick] [--out DIR]``, SUITE one of SUITES or ``all``.

Each suite module has ``main(args)`` taking the parsed arguments below; ``all`` runs the
suites that need no data files (the README's main job).

JAX's persistent compilation cache is on: compiled programs are kept in
``~/.cache/kbeam_jax/jax`` (or ``$KBEAM_JAX_COMPILE_CACHE``, or ``--compile-cache DIR``)
and a second run loads them instead of compiling; ``--no-compile-cache`` turns it off.
``--devices N`` (or a list ``1,2,8``) runs the suites that train networks on N devices;
on a CPU it asks XLA for N virtual host devices, which show that the sharded programs
give the same numbers, not how they scale (they share the same cores).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path

DEFAULT_COMPILE_CACHE = Path("~/.cache/kbeam_jax/jax")
DEVICE_SUITES = ("gan_mog", "domain_adaptation")  # the suites that take --devices

# suite name -> needs data files (from KBEAM_JAX_DATA)
SUITES = {
  "surfaces": False,
  "bilevel_synthetic": False,
  "bilevel_scaling": False,
  "gan_mog": False,
  "kbeam_rules": False,
  "privacy": True,
  "domain_adaptation": True,
  "denoising": True,
  "poisoning": True,
  "fewshot": True,
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
  parser.add_argument(
    "--paper",
    action="store_true",
    help="surfaces: only the paper's six methods on its four surfaces, 100 trials, timed "
    "end to end beside the NumPy reference loop",
  )
  parser.add_argument(
    "--protocol",
    choices=("clean", "authors", "both"),
    default="clean",
    help="surfaces: 'authors' reproduces the authors' code (beams carried over K = 2 -> 5 "
    "-> 10, Alt-GD max step first, 999 updates)",
  )
  parser.add_argument(
    "--spread",
    type=int,
    default=None,
    help="surfaces: trials of the long-run means and the spread of 100-trial means "
    "(default 10,000; 0 with --paper)",
  )
  parser.add_argument(
    "--devices",
    type=str,
    default=None,
    help="gan_mog, domain_adaptation: device counts to time the K-beam step on, e.g. 1,2,8 "
    "(virtual CPU devices when there is no accelerator)",
  )
  parser.add_argument(
    "--compile-cache",
    type=Path,
    default=None,
    help=f"folder of JAX's persistent compilation cache (default $KBEAM_JAX_COMPILE_CACHE "
    f"or {DEFAULT_COMPILE_CACHE})",
  )
  parser.add_argument(
    "--no-compile-cache", action="store_true", help="compile everything afresh, cache nothing"
  )
  args = parser.parse_args(argv)
  args.devices = parse_devices(args.devices)
  setup_jax(args)

  if args.suite == "all":
    suites = [s for s, needs_data in SUITES.items() if not needs_data]
  else:
    suites = [args.suite]
  for suite in suites:
    start = time.perf_counter()
    importlib.import_module(f"benchmarks.{suite}").main(args)
    report = f"{suite}_devices" if args.devices and suite in DEVICE_SUITES else suite
    print((args.out / f"{report}.md").read_text())
    print(
      f"[{suite}] done in {time.perf_counter() - start:.1f} s; "
      f"results in {args.out}/{report}.{{json,md}}"
    )
  return 0


def parse_devices(text: str | None) -> tuple[int, ...] | None:
  """``"1,2,8"`` -> ``(1, 2, 8)``; None stays None."""
  if text is None:
    return None
  try:
    counts = tuple(int(x) for x in text.split(","))
  except ValueError:
    counts = ()
  if not counts or min(counts) < 1:
    raise SystemExit(f"--devices takes device counts >= 1 separated by commas, got {text!r}.")
  return counts


def setup_jax(args: argparse.Namespace) -> None:
  """Device count and compilation cache, set before JAX starts its backend."""
  if args.devices and "jax" not in sys.modules:
    flag = f"--xla_force_host_platform_device_count={max(args.devices)}"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
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


if __name__ == "__main__":
  sys.exit(main())
