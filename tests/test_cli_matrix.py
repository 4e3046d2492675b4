"""Every documented flag of every benchmark suite, at quick sizes: a flag that crashes (as
``surfaces --protocol authors`` once did) cannot go unnoticed.

These runs take minutes (each suite's ``--quick`` run with its options), so they carry the
``cli`` mark and stay out of the default ``python -m pytest``; ``.ci/run`` runs them as its
benchmark smoke check with ``python -m pytest -m cli``. Each case asserts the report the
suite promises; ``--resume`` cases run twice and must end with the same numbers.
"""

import json
import os
from pathlib import Path

import pytest
from test_benchmark_runner import run_devices

from benchmarks import __main__ as cli

pytestmark = pytest.mark.cli

ROOT = Path(__file__).parent.parent
DATA = os.environ.get("KBEAM_JAX_DATA")
needs_data = pytest.mark.skipif(
  not DATA or not Path(DATA, "mnist").is_dir(),
  reason="needs $KBEAM_JAX_DATA with the MNIST (and GENKI) files",
)

CASES = [
  ("surfaces", ["--quick", "--protocol", "authors"]),
  ("surfaces", ["--quick", "--protocol", "both", "--spread", "15"]),
  ("surfaces", ["--quick", "--paper"]),
  ("surfaces", ["--quick", "--trials", "4", "--seed", "1"]),
  ("bilevel_synthetic", ["--quick", "--trials", "2"]),
  ("bilevel_scaling", ["--quick"]),
  ("games", ["--quick", "--trials", "3", "--seed", "2"]),
  ("gan_mog", ["--trials", "1", "--iters", "300", "--resume"]),
  ("gan_mog", ["--quick", "--trials", "1"]),
  ("kbeam_rules", ["--quick"]),
  pytest.param(
    "privacy", ["--quick", "--iters", "30", "--trials", "1", "--resume"], marks=needs_data
  ),
  pytest.param("domain_adaptation", ["--quick", "--iters", "7", "--resume"], marks=needs_data),
  pytest.param("denoising", ["--quick", "--trials", "1", "--resume"], marks=needs_data),
  pytest.param("poisoning", ["--quick", "--trials", "1", "--resume"], marks=needs_data),
  pytest.param("fewshot", ["--quick", "--trials", "1", "--resume"], marks=needs_data),
  pytest.param("adversarial_defense", ["--quick", "--iters", "5", "--resume"], marks=needs_data),
  pytest.param(
    "adversarial_defense", ["--quick", "--protocol", "paper", "--iters", "4"], marks=needs_data
  ),
]


def run(suite: str, flags: list[str], out: Path) -> dict:
  assert cli.main([suite, *flags, "--out", str(out), "--no-compile-cache"]) == 0
  stem = f"{suite}_paper" if "paper" in flags else suite  # --protocol paper's own files
  for ext in ("json", "md"):
    assert (out / f"{stem}.{ext}").exists(), f"{stem}.{ext} missing"
  report = (out / f"{stem}.md").read_text()
  assert " nan " not in report.lower() and "issue" not in report.lower(), report
  return json.loads((out / f"{stem}.json").read_text())


def numbers(records):
  """The records without their wall-clock times."""
  drop = ("seconds", "_s", "ms_", "us_", "time")
  if isinstance(records, dict):
    return {k: numbers(v) for k, v in records.items() if not any(d in k for d in drop)}
  if isinstance(records, list):
    return [numbers(r) for r in records]
  return records


@pytest.mark.parametrize("suite, flags", CASES)
def test_flags_run_and_report(suite, flags, tmp_path):
  first = run(suite, flags, tmp_path)
  if "--resume" in flags:
    assert (tmp_path / "checkpoints").is_dir() or any(tmp_path.glob("*checkpoints"))
    again = run(suite, flags, tmp_path)  # continues from the finished checkpoints
    assert numbers(again["records"]) == numbers(first["records"])
  else:
    assert not any(tmp_path.glob("*checkpoints")), "checkpoints written without --resume"


def test_no_checkpoints_without_resume(tmp_path):
  run("gan_mog", ["--trials", "1", "--iters", "200"], tmp_path)
  assert not any(tmp_path.glob("*checkpoints"))


@needs_data
def test_photos_folder(tmp_path):
  from PIL import Image

  photos = tmp_path / "photos"
  photos.mkdir()
  Image.new("RGB", (64, 48), (200, 30, 90)).save(photos / "one.png")
  run("domain_adaptation", ["--quick", "--iters", "4", "--photos", str(photos)], tmp_path / "o")


@needs_data
def test_devices_flag(tmp_path):
  """(gan_mog's ``--devices`` is in tests/test_benchmark_runner.py.)"""
  run_devices("domain_adaptation", tmp_path)
