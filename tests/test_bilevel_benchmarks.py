"""The bilevel benchmark suites' pieces at a tiny size."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kbeam_jax
from benchmarks import _bilevel, bilevel_scaling, bilevel_synthetic


@pytest.mark.parametrize("method", ["cg", "penalty_al"])
def test_synthetic_methods_reach_the_solution(method):
  u0 = jnp.full((bilevel_synthetic.DIM,), 3.0)
  v0 = jnp.full((bilevel_synthetic.DIM,), -2.0)
  errors, _, _ = jax.jit(bilevel_synthetic.run_method("sum", method, 5, 1500))(u0, v0)
  assert float(errors[-1]) < 1e-2 * float(errors[0])


def test_only_the_penalty_method_selects_the_solution_in_a_continuum():
  """``g = |Av - Bu|²`` with a wide ``A``: every method converges, but only the penalty
  method picks the lower solution that minimizes ``f`` (measured: CG ends at distance
  ~6 from the optimistic solution, the augmented penalty at ~0.06)."""
  ku, kv = jax.random.split(jax.random.key(0))
  u0 = jax.random.uniform(ku, (bilevel_synthetic.DIM,), minval=-5.0, maxval=5.0)
  v0 = jax.random.uniform(kv, (bilevel_synthetic.DIM,), minval=-5.0, maxval=5.0)
  run = lambda m: jax.jit(bilevel_synthetic.run_method("continuum", m, 5, 2000))(u0, v0)
  (cg, *_), (penalty, *_) = run("cg"), run("penalty_al")
  assert float(penalty[-1]) < 0.2 < 2.0 < float(cg[-1])


def test_truncation_bias_of_rmd_shrinks_with_T():
  """With warm starts RMD's fixed point is biased by the T-step truncation, less for larger T."""
  u0 = jnp.full((bilevel_synthetic.DIM,), 3.0)
  v0 = jnp.full((bilevel_synthetic.DIM,), -2.0)
  final = [
    float(jax.jit(bilevel_synthetic.run_method("sum", "rmd", T, 1500))(u0, v0)[0][-1])
    for T in (1, 5, 20)
  ]
  assert final[0] > final[1] > final[2] > 0


def test_naive_gd_stalls_on_the_difference_problem():
  """``∇_u f = -2(u - v)`` vanishes at ``v = u``: without ``dv/du`` u never moves to 0."""
  u0 = jnp.full((bilevel_synthetic.DIM,), 3.0)
  v0 = jnp.full((bilevel_synthetic.DIM,), 3.0)
  naive, *_ = jax.jit(bilevel_synthetic.run_method("difference", "gd", 10, 300))(u0, v0)
  rmd, *_ = jax.jit(bilevel_synthetic.run_method("difference", "rmd", 10, 300))(u0, v0)
  assert float(naive[-1]) > 0.5 * float(naive[0])
  assert float(rmd[-1]) < 1e-3 * float(rmd[0])


def test_synthetic_records_the_divergence_run_warns_of(monkeypatch):
  """A case whose steps flag divergence is counted in its record and named in the report,
  and no SolverWarning leaves the suite (the default inner step 0.1 is unstable on
  ``scaled_default``, whose curvatures reach 100)."""
  import warnings

  monkeypatch.setattr(bilevel_synthetic, "METHODS", ("cg", "penalty"))
  keep = ("sum", "scaled_default")
  monkeypatch.setattr(
    bilevel_synthetic, "PROBLEMS", {k: bilevel_synthetic.PROBLEMS[k] for k in keep}
  )
  with warnings.catch_warnings():
    warnings.simplefilter("error", kbeam_jax.SolverWarning)
    records, _ = bilevel_synthetic.run_suite(2, 20, 0, repeats=1, ts=(10,))
  by = {(r["problem"], r["method"]): r for r in records}
  assert by["scaled_default", "penalty"]["diverging_trials"] == 2
  assert 0 < by["scaled_default", "penalty"]["diverging_steps"] <= 20
  assert by["sum", "cg"]["diverging_trials"] == 0
  meta = dict(
    iterations=20, trials=2, outer_lr=0.05, inner_lr=0.1, penalty_lr=0.01, penalty_max_gamma=20.0,
    box=5.0, environment=dict(device="cpu", backend="cpu", jax="0"),
  )  # fmt: skip
  text = bilevel_synthetic.markdown(records, meta)
  assert "penalty T = 10 in 2/2 trials" in text and "cg T = 10 in" not in text


def test_unknown_problem():
  with pytest.raises(KeyError, match="known: sum, difference, continuum"):
    bilevel_synthetic.problem("banana")


def test_scaling_measurement_and_slope():
  r = bilevel_scaling.measure("rmd", 5, 50, repeats=1)
  assert r["seconds"] > 0 and r["peak_bytes"] > 50 * 4
  # RMD stores the trajectory: its temporaries grow with T, FMD's do not.
  rmd_long = bilevel_scaling.measure("rmd", 200, 50, repeats=1)
  fmd_short = bilevel_scaling.measure("fmd", 5, 50, repeats=1)
  fmd_long = bilevel_scaling.measure("fmd", 200, 50, repeats=1)
  assert rmd_long["temp_bytes"] > 10 * r["temp_bytes"]
  assert fmd_long["temp_bytes"] < 2 * fmd_short["temp_bytes"] + 1024
  np.testing.assert_allclose(bilevel_scaling.slope([1, 10, 100], [2, 20, 200]), 1.0)


def test_peer_rows_measure_both_sides_at_equal_accuracy():
  pytest.importorskip("jaxopt")
  from benchmarks import _peers

  ridge = _peers.ridge_row(repeats=1)
  for k in ("jaxopt", "ours_closed_form", "ours_lbfgs", "ours_2000_steps"):
    assert ridge[f"{k}_seconds"] > 0 and ridge[f"{k}_error"] < 1e-4, (k, ridge)
  row = _peers.hypergradient_row(bilevel_scaling.problem, 10, 100, 10, 0.4, 1, "separable")
  assert row["jaxopt_error"] < 1e-4 and row["cg_error"] < 1e-4
  outer = _peers.outer_row(bilevel_scaling.problem, 100, 5, 10, 0.4, 5, 0.5, 1)
  np.testing.assert_allclose(outer["ours_loss"], outer["jaxopt_loss"], rtol=1e-6)


@pytest.mark.parametrize("method", ["cg", "penalty"])
def test_chunked_training_is_one_uninterrupted_run(method, tmp_path):
  """``_bilevel.train`` (denoising's and poisoning's loop): chunks of ``kbeam_jax.run``
  from a warm start end where one run of all the steps ends, with the upper objective of
  every step and the record's timing fields."""
  f = lambda u, v, c: jnp.sum((v - c) ** 2) + jnp.sum(u**2)
  g = lambda u, v, c: jnp.sum((v - u) ** 2)
  cfg = dict(outer_steps=6, chunk=2, inner_steps=3, inner_lr=0.2, solve_steps=5, warmup=20,
             penalty_lr=0.05)  # fmt: skip
  args, u0 = (jnp.ones(3),), jnp.full(3, 2.0)
  solver = _bilevel.bilevel_solver(method, f, g, cfg, optax.sgd(0.1))
  v0 = _bilevel.warm_start(g, u0, jnp.zeros(3), args, cfg)
  np.testing.assert_allclose(v0, u0, atol=1e-3)  # the lower problem solved at u0
  key = jax.random.key(0)
  state, curve, timing = _bilevel.train(
    solver, u0, v0, args, cfg, key=key, label=("t", method), out_dir=tmp_path, resume=False
  )
  whole, info = jax.jit(lambda s: kbeam_jax.run(solver.step, s, 6, *args))(solver.init(key, u0, v0))
  np.testing.assert_allclose(state.u, whole.u, rtol=1e-6)
  np.testing.assert_allclose(curve, info.value, rtol=1e-6)
  assert timing["outer_steps"] == 6 and timing["seconds"] >= 0
  assert not (tmp_path / "checkpoints").exists()  # checkpoints only with --resume


@pytest.mark.parametrize("name", list(bilevel_synthetic.PROBLEMS))
def test_each_problem_is_passed_exactly_as_a_quadratic(name):
  """The programs see every problem as ``(H, b, c)``: objective and gradient agree with the
  problem's own functions at a random point; a non-quadratic is refused."""
  p = bilevel_synthetic.problem(name)
  data = bilevel_synthetic.arguments(p)
  u, v = jax.random.uniform(jax.random.key(7), (2, bilevel_synthetic.DIM), minval=-5, maxval=5)
  for q, fn in ((data["f"], p.f), (data["g"], p.g)):
    mine = lambda u, v, q=q: bilevel_synthetic.value(q, u, v)
    np.testing.assert_allclose(mine(u, v), fn(u, v), rtol=1e-5, atol=1e-4)
    for a, b in zip(jax.grad(mine, (0, 1))(u, v), jax.grad(fn, (0, 1))(u, v), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="not a quadratic"):
    bilevel_synthetic.quadratic(lambda u, v: jnp.sum(u**4) + jnp.sum(v**2))
