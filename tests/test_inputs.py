"""Bad input gives an error that names the problem."""

import jax
import jax.numpy as jnp
import optax
import pytest
from _cases import K, game, stacked_beams, u0, v0

import kbeam_jax
from kbeam_jax import minimax

sgd = optax.sgd(0.1)


def test_k_below_one():
  solver = minimax.kbeam(game, sgd, sgd)
  with pytest.raises(ValueError, match=r"K \(the number of beams\) must be >= 1, got K=0"):
    solver.init(jax.random.key(0), u0(), lambda key: v0(), 0)


def test_k_not_an_int():
  with pytest.raises(TypeError, match="K .* must be a Python int"):
    minimax.kbeam(game, sgd, sgd).init(jax.random.key(0), u0(), lambda key: v0(), 2.0)


@pytest.mark.parametrize("rule", [minimax.Random, minimax.MinNorm, minimax.Kiwiel])
@pytest.mark.parametrize("bad", [-0.1, float("nan"), "0.1"])
def test_bad_epsilon(rule, bad):
  with pytest.raises(ValueError, match=rf"{rule.__name__}.epsilon must be a finite number >= 0"):
    rule(bad)


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(armijo=0.0), r"Kiwiel.armijo must be a number in \(0, 1\)"),
    (dict(backtrack=1.0), r"Kiwiel.backtrack must be a number in \(0, 1\)"),
    (dict(max_backtracks=0), "Kiwiel.max_backtracks must be an int >= 1"),
  ],
)
def test_bad_kiwiel_options(kwargs, message):
  with pytest.raises(ValueError, match=message):
    minimax.Kiwiel(0.1, **kwargs)


@pytest.mark.parametrize("make", [minimax.kbeam, minimax.scale_by_kbeam])
def test_a_rule_string_names_the_rule_value(make):
  first = game if make is minimax.kbeam else sgd
  second = (sgd, sgd) if make is minimax.kbeam else (stacked_beams(),)
  with pytest.raises(TypeError, match=r"Rules are values now: rule=minimax.Kiwiel\(epsilon\)"):
    make(first, *second, rule="kiwiel")
  with pytest.raises(TypeError, match=r"not the class: rule=minimax.MinNorm"):
    make(first, *second, rule=minimax.MinNorm)
  with pytest.raises(TypeError, match=r"rule must be minimax.Best\(\)"):
    make(first, *second, rule="steepest")


@pytest.mark.parametrize(
  "kwargs, fix",
  [
    (dict(epsilon=0.1), r"no longer takes epsilon=; pass rule=minimax.MinNorm\(epsilon\)"),
    (dict(num_ascent=2), "no longer takes num_ascent=; pass ascent_steps="),
    (dict(armijo=0.1), r"pass rule=minimax.Kiwiel\(epsilon, armijo=...\)"),
    (dict(steps=3), "unexpected keyword argument 'steps'"),
  ],
)
def test_an_old_keyword_names_the_new_one(kwargs, fix):
  with pytest.raises(TypeError, match=fix):
    minimax.kbeam(game, sgd, sgd, **kwargs)
  with pytest.raises(TypeError, match=fix):
    minimax.scale_by_kbeam(sgd, stacked_beams(), **kwargs)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_ascent_steps_below_one(bad):
  with pytest.raises(ValueError, match="ascent_steps .* must be an int >= 1"):
    minimax.kbeam(game, sgd, sgd, ascent_steps=bad)


def test_beams_with_the_wrong_leading_axis():
  solver = minimax.kbeam(game, sgd, sgd)
  with pytest.raises(ValueError, match=r"leading axis of size K=4.*\[0\] has shape \(3, 2\)"):
    solver.init(jax.random.key(0), u0(), stacked_beams(), 4)
  with pytest.raises(ValueError, match="leading axis of size K=3"):
    solver.init(jax.random.key(0), u0(), v0(), K)  # one v instead of K stacked beams


def test_non_scalar_objective():
  vector_game = lambda u, v: jnp.stack([game(u, v), game(u, v)])
  solver = minimax.kbeam(vector_game, sgd, sgd)
  state = solver.init(jax.random.key(0), u0(), stacked_beams(), K)
  with pytest.raises(ValueError, match=r"objective f\(u, v\) must return a scalar.*\(2,\)"):
    solver.step(state)
  gda = minimax.simultaneous_gda(vector_game, sgd, sgd)
  with pytest.raises(ValueError, match="must return a scalar"):
    gda.step(gda.init(jax.random.key(0), u0(), v0()))
  tx = minimax.kbeam_sgd(0.1, sgd, stacked_beams())
  with pytest.raises(ValueError, match=r"minimax_fn\(u, v\) must return a scalar"):
    tx.update(u0(), tx.init(u0()), u0(), minimax_fn=vector_game)


def test_mismatched_grads_and_params():
  tx = minimax.kbeam_sgd(0.1, sgd, stacked_beams())
  wrong = {"w": jnp.zeros(2), "b": jnp.zeros(())}  # b is not a list
  with pytest.raises(ValueError, match="grads and params must have the same pytree structure"):
    tx.update(wrong, tx.init(u0()), u0(), minimax_fn=game)


def test_integer_parameters():
  with pytest.raises(TypeError, match="u must hold floating-point arrays.*int32"):
    minimax.kbeam(game, sgd, sgd).init(jax.random.key(0), {"w": jnp.arange(2)}, stacked_beams(), K)


def test_transform_initializer_needs_k_and_key():
  with pytest.raises(ValueError, match="num_beams=K and key"):
    minimax.scale_by_kbeam(sgd, lambda key: v0())


def test_transform_without_params():
  tx = minimax.kbeam_sgd(0.1, sgd, stacked_beams())
  with pytest.raises(ValueError, match="needs params"):
    tx.update(u0(), tx.init(u0()), None, minimax_fn=game)
  with pytest.raises(TypeError, match="minimax_fn"):
    tx.update(u0(), tx.init(u0()), u0())


def test_negative_steps():
  with pytest.raises(ValueError, match="num_steps must be >= 0"):
    kbeam_jax.run(lambda s: (s, None), 0, -1)


def _wrong_shape(tree):
  return jax.tree.map(lambda x: jnp.stack([x, x]), tree)


SOLVER_MAKERS = {
  "kbeam": minimax.kbeam,
  "simultaneous_gda": minimax.simultaneous_gda,
  "alternating_gda": minimax.alternating_gda,
  "optimistic_gda": minimax.optimistic_gda,
  "extragradient": minimax.extragradient,
}


@pytest.mark.parametrize("name", sorted(SOLVER_MAKERS))
@pytest.mark.parametrize("which", ["u", "v"])
def test_projection_that_changes_shapes_is_named(name, which):
  solver = SOLVER_MAKERS[name](game, sgd, sgd, **{f"project_{which}": _wrong_shape})
  if name == "kbeam":
    state = solver.init(jax.random.key(0), u0(), stacked_beams(), K)
  else:
    state = solver.init(jax.random.key(0), u0(), v0())
  with pytest.raises(ValueError, match=rf"project_{which} must return {which} with the same"):
    solver.step(state)


def test_transform_projection_that_changes_shapes_is_named():
  tx = minimax.scale_by_kbeam(sgd, stacked_beams(), project_v=_wrong_shape)
  state = tx.init(u0())
  with pytest.raises(ValueError, match=r"project_v must return v with the same"):
    tx.update(u0(), state, u0(), minimax_fn=game)


@pytest.mark.parametrize(
  "make",
  [
    lambda: minimax.kbeam(game, optax.sgd, sgd),
    lambda: minimax.alternating_gda(game, sgd, optax.adam),
    lambda: minimax.scale_by_kbeam(optax.sgd, stacked_beams()),
    lambda: kbeam_jax.games.gradient_play([game, game], optax.sgd),
  ],
)
def test_an_optimizer_factory_is_refused_at_construction(make):
  with pytest.raises(TypeError, match=r"It is a function: call it to build the optimizer"):
    make()


def test_a_float_is_not_an_optimizer():
  with pytest.raises(TypeError, match="follower must be an optax.GradientTransformation, got 0.1"):
    minimax.kbeam(game, sgd, 0.1)


def test_the_transform_without_its_objective_names_the_fix():
  tx = minimax.scale_by_kbeam(sgd, stacked_beams())
  state = tx.init(u0())
  with pytest.raises(TypeError, match=r"kbeam_jax.nn.TrainState.*update_without_grads"):
    tx.update(None, state, u0())
  with pytest.raises(TypeError, match="minimax_fn must be the objective, a function"):
    tx.update(None, state, u0(), minimax_fn=jnp.ones(3))


def test_a_wrong_objective_signature_names_the_call():
  solver = minimax.kbeam(lambda u, v: game(u, v), sgd, sgd)
  state = solver.init(jax.random.key(0), u0(), stacked_beams(), K)
  with pytest.raises(TypeError) as e:
    solver.step(state, jnp.ones(4))  # an extra batch the objective does not take
  note = " ".join(getattr(e.value, "__notes__", []))
  assert "called the objective f(u, v) with 3 positional arguments" in note
  assert "float32[4]" in note


def test_run_needs_a_step_that_returns_state_and_info():
  with pytest.raises(TypeError, match=r"step must return a pair \(state, info\)"):
    kbeam_jax.run(lambda s: s + 1.0, jnp.zeros(()), 3)


def test_run_warns_once_when_steps_were_skipped():
  f = lambda u, v, x: jnp.sum(u * v * x)
  solver = minimax.kbeam(f, sgd, sgd)
  state = solver.init(jax.random.key(0), jnp.ones(2), jnp.zeros((3, 2)), 3)
  run = jax.jit(lambda s, x: kbeam_jax.run(solver.step, s, 5, x))
  with pytest.warns(kbeam_jax.SolverWarning, match="5 of 5 steps were skipped") as record:
    jax.block_until_ready(run(state, jnp.array([jnp.nan, 1.0])))
  assert len(record) == 1
  import warnings

  with warnings.catch_warnings():
    warnings.simplefilter("error", kbeam_jax.SolverWarning)
    jax.block_until_ready(run(state, jnp.array([1.0, 1.0])))  # a clean run says nothing


def test_run_warns_when_the_bilevel_solver_diverges():
  from kbeam_jax import bilevel

  f = lambda u, v: jnp.sum((v - 1.0) ** 2)
  g = lambda u, v: 0.5 * jnp.sum((v - u) ** 2)
  s = bilevel.solver(f, g, optax.sgd(0.1), bilevel.CG(5), inner_steps=50, inner_lr=2.5)
  with pytest.warns(kbeam_jax.SolverWarning, match="flagged divergence"):
    kbeam_jax.run(s.step, s.init(jax.random.key(0), jnp.array([3.0, 2.0]), jnp.zeros(2)), 2)


def test_stack_modules_wants_a_module_builder():
  from kbeam_jax import nn

  with pytest.raises(TypeError, match="make must be rngs -> module"):
    nn.stack_modules(jnp.ones(3), jax.random.key(0), 2)
  with pytest.raises(TypeError, match=r"must return an nnx.Module, got ShapeDtypeStruct"):
    nn.stack_modules(lambda rngs: jnp.ones(3), jax.random.key(0), 2)


def test_checkpoint_meta_names_the_key_it_cannot_store(tmp_path):
  from kbeam_jax import nn

  with pytest.raises(TypeError, match=r"meta\['note'\] is not"):
    nn.save_checkpoint(tmp_path / "c", {"a": jnp.ones(2)}, step_count=3, note=object())


def test_shard_with_trials_says_the_state_needs_a_trial_axis():
  from kbeam_jax import parallel

  state = minimax.kbeam(game, sgd, sgd).init(jax.random.key(0), u0(), stacked_beams(), K)
  with pytest.raises(ValueError, match=r"trials=True every leaf needs a leading trial axis"):
    parallel.shard(state, parallel.make_mesh(beams=1), trials=True)


def test_checkpoint_load_is_quiet(tmp_path, caplog):
  from kbeam_jax import nn

  nn.save_checkpoint(tmp_path / "c", {"a": jnp.ones(2)}, step_count=3)
  with caplog.at_level("WARNING"):
    state, meta = nn.load_checkpoint(tmp_path / "c", like={"a": jnp.zeros(2)})
  assert meta == {"step_count": 3} and not [r for r in caplog.records if r.name == "absl"]


def test_a_traced_num_active_above_k_fails_when_it_runs():
  solver = minimax.kbeam(game, sgd, sgd)
  init = jax.jit(lambda n: solver.init(jax.random.key(0), u0(), stacked_beams(), K, num_active=n))
  assert int(jnp.sum(init(2).active)) == 2
  with pytest.raises(Exception, match=r"num_active \(the beams in use\) must be from 1 to K=3"):
    jax.block_until_ready(init(8))


def test_checkpoint_with_an_abstract_key_template_and_a_string_leaf(tmp_path):
  from kbeam_jax import nn

  tree = {"k": jax.random.key(3), "a": jnp.ones(2)}
  nn.save_checkpoint(tmp_path / "c", tree)
  restored, _ = nn.load_checkpoint(tmp_path / "c", like=jax.eval_shape(lambda: tree))
  assert (jax.random.key_data(restored["k"]) == jax.random.key_data(tree["k"])).all()
  with pytest.raises(TypeError, match="checkpoints hold arrays .* Put strings .* in the metadata"):
    nn.save_checkpoint(tmp_path / "s", {"a": "abc"})


def test_multisteps_around_kbeam_names_the_fix():
  from flax import nnx

  from kbeam_jax import nn

  model = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
  graphdef, _ = nnx.split(model, nnx.Param)
  tx = optax.MultiSteps(minimax.kbeam_sgd(0.1, sgd, jnp.zeros((3, 2))), 2)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  f = lambda p, v: jnp.sum(nnx.merge(graphdef, p)(jnp.ones((1, 2))) @ v)
  with pytest.raises(ValueError) as e:
    nn.update_without_grads(optimizer, model, minimax_fn=f)
  assert "optax.MultiSteps around K-beam) needs arrays" in " ".join(e.value.__notes__)
