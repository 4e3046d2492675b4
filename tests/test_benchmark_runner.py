"""The benchmark command line checks every argument before any work, and describes each
suite; ``train_in_chunks`` saves checkpoints on a clock and on exit."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest

from benchmarks import __main__ as cli
from benchmarks import _common
from kbeam_jax import nn

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


@pytest.fixture
def no_suite_runs(monkeypatch):
  """Fails the test if a suite module were imported (i.e. work started)."""

  def forbidden(name):
    raise AssertionError(f"{name} was started although the arguments are invalid")

  monkeypatch.setattr(cli, "suite_module", forbidden)


def error_of(argv, capsys):
  with pytest.raises(SystemExit) as exit_:
    cli.main(argv)
  assert exit_.value.code == 2
  return capsys.readouterr().err


@pytest.mark.parametrize(
  "argv, message",
  [
    (["surfaces", "--trials", "0"], "--trials must be at least 1, got 0"),
    (["gan_mog", "--trials", "-1"], "--trials must be at least 1, got -1"),
    (["gan_mog", "--trials", "two"], "--trials takes a whole number, got 'two'"),
    (["gan_mog", "--iters", "0"], "--iters must be at least 1, got 0"),
    (["privacy", "--iters", "-5"], "--iters must be at least 1, got -5"),
    (["surfaces", "--seed", "-1"], "--seed must be at least 0"),
    (["surfaces", "--iters", "10"], "unrecognized arguments: --iters"),  # surfaces has none
    (["bilevel_scaling", "--trials", "3"], "unrecognized arguments: --trials"),
    (["surfaces", "--resume"], "unrecognized arguments: --resume"),
    (["nope"], "invalid choice: 'nope'"),
  ],
)
def test_bad_arguments_fail_before_any_work(argv, message, capsys, no_suite_runs):
  assert message in error_of(argv, capsys)


def test_out_must_be_a_writable_folder(tmp_path, capsys, no_suite_runs):
  (tmp_path / "file").write_text("x")
  err = error_of(["bilevel_synthetic", "--out", str(tmp_path / "file")], capsys)
  assert f"{tmp_path / 'file'} is a file, not a folder" in err
  err = error_of(["all", "--quick", "--out", str(tmp_path / "file" / "sub")], capsys)
  assert "is a file" in err


def test_missing_data_fails_before_any_work(tmp_path, capsys, monkeypatch, no_suite_runs):
  monkeypatch.setenv("KBEAM_JAX_DATA", str(tmp_path))
  monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.cache/kbeam_jax either
  err = error_of(["denoising", "--quick", "--out", str(tmp_path / "o")], capsys)
  assert "denoising reads mnist/" in err and "train-images-idx3-ubyte" in err
  err = error_of(["privacy", "--out", str(tmp_path / "o")], capsys)
  assert "genki.mat not found" in err and str(tmp_path) in err
  err = error_of(["domain_adaptation", "--photos", str(tmp_path / "none")], capsys)
  assert "mnist/" in err  # the data check comes first; --photos is checked too:
  (tmp_path / "mnist").mkdir()
  for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
    for prefix in ("", "t10k"):
      (tmp_path / "mnist" / name.replace("train", prefix or "train")).write_bytes(b"")
  err = error_of(["domain_adaptation", "--photos", str(tmp_path / "none")], capsys)
  assert "--photos" in err and "not a folder" in err


def test_valid_arguments_reach_the_suite(tmp_path, monkeypatch):
  seen = {}

  class Suite:
    @staticmethod
    def main(args):
      seen.update(vars(args))
      (args.out / "gan_mog.md").write_text("table\n")

  monkeypatch.setattr(cli, "suite_module", lambda name: Suite)
  out = tmp_path / "new" / "results"  # created by the suite
  out.mkdir(parents=True)
  # --no-compile-cache: the in-process run must not switch the persistent compilation
  # cache on for the rest of the test session (its entries would outlive the session)
  argv = ["gan_mog", "--trials", "3", "--iters", "7", "--out", str(out), "--no-compile-cache"]
  assert cli.main(argv) == 0
  assert seen["trials"] == 3 and seen["iters"] == 7 and seen["resume"] is False
  assert seen["photos"] is None  # options a suite lacks still read as their defaults


def test_main_help_lists_every_suite_with_time_and_data(capsys):
  with pytest.raises(SystemExit) as exit_:
    cli.main(["--help"])
  assert exit_.value.code == 0
  out = capsys.readouterr().out
  for name in [*cli.SUITES, "all"]:
    assert re.search(rf"^\s+{name}\b", out, flags=re.M), name
  flat = " ".join(out.split())
  assert "full 80 s; data: none" in flat and "data: genki/genki.mat" in flat


@pytest.mark.parametrize("name", sorted(cli.SUITES))
def test_suite_help_and_options_match_the_suite(name, capsys):
  with pytest.raises(SystemExit) as exit_:
    cli.main([name, "--help"])
  assert exit_.value.code == 0
  out = capsys.readouterr().out
  suite = cli.SUITES[name]
  assert suite.description in " ".join(out.split())
  assert "run time on 2 CPU cores: " + suite.time.split(";")[0] in " ".join(out.split())
  assert ("data: none" in out) == (not suite.data)
  # the options offered are exactly those the suite's main reads
  source = (BENCHMARKS / f"{name}.py").read_text()
  for option in ("trials", "iters", "resume", "photos"):
    reads = re.search(rf'args\.{option}\b|getattr\(args, "{option}"', source) is not None
    assert (f"[--{option}" in out) == reads, option


def test_train_in_chunks_saves_on_a_clock_and_on_exit(tmp_path, monkeypatch):
  saves = []
  real_save = nn.save_checkpoint
  monkeypatch.setattr(nn, "save_checkpoint", lambda *a, **k: saves.append(1) or real_save(*a, **k))
  step = lambda s: (s + 1, {"s": s})
  ckpt = tmp_path / "ckpt"
  # a long interval: one save, when the call ends (here after 2 of 5 chunks)
  state, history, _ = _common.train_in_chunks(
    step, jnp.int32(0), 5, checkpoint=ckpt, resume=True, stop_after=2, save_every_s=1e9
  )
  assert len(saves) == 1 and int(state) == 2 and len(history) == 2
  state, history, _ = _common.train_in_chunks(
    step, jnp.int32(0), 5, checkpoint=ckpt, resume=True, save_every_s=0.0
  )
  assert int(state) == 5 and [h["s"] for h in history] == [0, 1, 2, 3, 4]
  assert len(saves) == 1 + 3  # every chunk with save_every_s=0, nothing more at the end

  def failing(s):
    if int(s) == 2:
      raise KeyboardInterrupt
    return step(s)

  with pytest.raises(KeyboardInterrupt):
    _common.train_in_chunks(
      failing, jnp.int32(0), 5, checkpoint=tmp_path / "k", resume=True, save_every_s=1e9
    )
  restored, meta = nn.load_checkpoint(tmp_path / "k", like=jnp.int32(0))
  assert int(restored) == 2 and len(meta["history"]) == 2  # state and history agree


def test_train_in_chunks_writes_nothing_without_resume(tmp_path):
  state, history, _ = _common.train_in_chunks(
    lambda s: (s + 1, {"s": s}), jnp.int32(0), 3, checkpoint=tmp_path / "c", save_every_s=0.0
  )
  assert int(state) == 3 and len(history) == 3 and not any(tmp_path.iterdir())


def run_devices(suite: str, out: Path, timeout: int = 900) -> list[dict]:
  """``python -m benchmarks SUITE --devices 1,2 --quick`` from a plain shell (no XLA_FLAGS),
  in a fresh process; the records of ``SUITE_devices.json``."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  root = Path(__file__).parent.parent
  env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
  argv = [suite, "--devices", "1,2", "--quick", "--no-compile-cache", "--out", str(out)]
  done = subprocess.run(
    [sys.executable, "-m", "benchmarks", *argv],
    env=env,
    cwd=root,
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  rows = json.loads((out / f"{suite}_devices.json").read_text())["records"]
  assert [r["devices"] for r in rows] == [1, 2]
  return rows


def test_devices_flag_starts_jax_with_that_many_devices(tmp_path):
  """The runner asks XLA for two virtual devices before anything imports JAX, and the
  sharded step matches one device."""
  rows = run_devices("gan_mog", tmp_path)
  assert [r["devices"] for r in rows] == [1, 2]
  assert rows[1]["max_abs_diff_u"] < 1e-5


def test_kbeam_benchmarks_runs_from_any_folder(tmp_path, monkeypatch):
  import subprocess
  import sys

  from kbeam_jax import _benchmarks_entry

  code = "import sys; from kbeam_jax._benchmarks_entry import main; sys.exit(main())"
  done = subprocess.run(
    [sys.executable, "-c", code, "games", "--help"], cwd=tmp_path, capture_output=True, text=True
  )
  assert done.returncode == 0 and "--quick" in done.stdout, done.stderr
  # an install without the repository beside it says how to get the suites
  monkeypatch.setattr(_benchmarks_entry, "__file__", str(tmp_path / "kbeam_jax" / "x.py"))
  with pytest.raises(SystemExit, match="clone it and install it editable"):
    _benchmarks_entry.main(["games"])
