"""The 2D surfaces task and the surfaces benchmark at a tiny size."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kbeam_jax
from benchmarks import numpy_reference
from benchmarks import surfaces as study
from kbeam_jax import minimax
from kbeam_jax.tasks import surfaces


@pytest.mark.parametrize("name", sorted(surfaces.SURFACES))
def test_u_star_is_the_minimax_point(name):
  s = surfaces.get(name)
  us = jnp.linspace(-0.5, 0.5, 401)
  F = jax.vmap(lambda u: surfaces.max_value(s, u, 401))(us)
  assert abs(float(us[jnp.argmin(F)]) - s.u_star) < 1e-6


@pytest.mark.parametrize("name", sorted(surfaces.SURFACES))
def test_saddle_flag(name):
  """A saddle point exists iff max_u min_v f = min_u max_v f on the box."""
  s = surfaces.get(name)
  grid = jnp.linspace(-0.5, 0.5, 201)
  F = jax.vmap(lambda u: jax.vmap(lambda v: s.f(u, v))(grid))(grid)  # F[u, v]
  gap = float(F.max(axis=1).min() - F.min(axis=0).max())
  assert (gap < 1e-6) == s.has_saddle


@pytest.mark.parametrize("name", sorted(surfaces.SURFACES))
def test_hand_gradients_of_the_numpy_reference(name):
  f, du, dv = numpy_reference.SURFACES[name]
  s = surfaces.get(name)
  for u, v in [(0.3, -0.2), (-0.45, 0.1)]:
    gu, gv = jax.grad(s.f, argnums=(0, 1))(jnp.float32(u), jnp.float32(v))
    np.testing.assert_allclose([du(u, v), dv(u, v)], [gu, gv], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(f(u, v), s.f(u, v), rtol=1e-5, atol=1e-7)


def test_unknown_surface():
  with pytest.raises(KeyError, match="known surfaces"):
    surfaces.get("banana")


def test_study_writes_reports_and_matches_the_numpy_loop(tmp_path):
  records = study.run_study(tmp_path, trials=3, num_iters=40, repeats=1, names=["seesaw"])
  data = json.loads((tmp_path / "surfaces.json").read_text())
  assert len(data["records"]) == len(records) == len(study.methods())
  for r in data["records"]:
    for field in ("surface", "method", "K", "error_mean", "error_std", "trials", "seconds"):
      assert field in r
    assert r["trials"] == 3 and r["seconds"] > 0 and np.isfinite(r["error_mean"])
  timing = data["meta"]["timing"]
  assert timing["max_abs_diff_u"]["seesaw"] < 1e-4  # same algorithm, float32 against float64
  assert timing["programs"] == 3  # GD / Alt-GD / extragradient, OGDA, K-beam: one each
  md = (tmp_path / "surfaces.md").read_text()
  assert "0.235 ± 0.127" in md and "seesaw" in md
  assert (tmp_path / "surfaces.png").stat().st_size > 10_000


def test_authors_protocol_carries_the_beams_over():
  """K = 5 starts from the beams K = 2 left; Alt-GD takes its max step first; 999 updates."""
  names = ["anti_saddle", "seesaw"]
  paper = study.methods(paper=True)
  authors = study.PROTOCOLS["authors"]._replace(num_iters=30)
  clean = study.PROTOCOLS["clean"]._replace(num_iters=30)
  programs = study.Programs(names, paper, [authors, clean])
  assert len(programs.branches[study.GDA]) == 3  # GD, Alt-GD min first, Alt-GD max first
  programs.compile(4)
  keys, u0, beams0 = study.draw_inits(0, 4)
  out = programs.run_protocol("seesaw", paper, authors, keys, u0, beams0)
  by = {m.name: m for m in paper}
  _, after_2 = programs.call("seesaw", by["kbeam_2"], authors, keys, u0, beams0)
  np.testing.assert_array_equal(after_2[:, 2:], beams0[:, 2:])  # inactive beams stayed
  u5, _ = programs.call("seesaw", by["kbeam_5"], authors, keys, u0, after_2)
  np.testing.assert_array_equal(out["kbeam_5"], u5)
  fresh5, _ = programs.call("seesaw", by["kbeam_5"], authors, keys, u0, beams0)
  assert not np.array_equal(out["kbeam_5"], fresh5)
  assert by["alt_gd"].branch(authors) == (minimax.alternating_gda, (("order", "max_first"),))
  min_first = programs.call("seesaw", by["alt_gd"], clean, keys, u0, beams0)[0]
  assert not np.array_equal(out["alt_gd"], min_first)
  # the compiled branch is the library's Alt-GD, max step first, on the first beam
  solver = minimax.alternating_gda(
    surfaces.get("seesaw").f,
    optax.sgd(study.schedule),
    optax.sgd(study.schedule),
    project_u=surfaces.project,
    project_v=surfaces.project,
    order="max_first",
  )
  state, _ = kbeam_jax.run(solver.step, solver.init(keys[1], u0[1], beams0[1, 0]), 30)
  np.testing.assert_allclose(out["alt_gd"][1], state.u, rtol=1e-6, atol=1e-7)


def test_paper_run_with_both_protocols(tmp_path):
  study.run_study(
    tmp_path,
    trials=4,
    num_iters=30,
    paper=True,
    protocols=("clean", "authors"),
    spread=8,
    names=["anti_saddle"],
    numpy_baseline=False,
  )
  data = json.loads((tmp_path / "surfaces.json").read_text())
  assert [r["name"] for r in data["records"]] == list(surfaces.PUBLISHED_METHODS)
  tables = data["meta"]["protocol_tables"]
  assert {t["protocol"] for t in tables} == {"clean", "authors"} and len(tables) == 12
  for t in tables:
    assert t["long_trials"] == 8 and t["blocks"] == 2
    assert t["block_mean_min"] <= t["long_error_mean"] <= t["block_mean_max"]
  assert data["meta"]["timing"]["programs"] == 2  # GD / Alt-GD, and K-beam
  md = (tmp_path / "surfaces.md").read_text()
  assert "Protocol 'authors'" in md and not (tmp_path / "surfaces.png").exists()
