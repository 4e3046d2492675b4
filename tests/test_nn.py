"""Flax integration: stacked NNX beams, the linen TrainState adapter, checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen, nnx

import kbeam_jax
from kbeam_jax import minimax, nn


class MLP(nnx.Module):
  def __init__(self, rngs):
    self.a = nnx.Linear(3, 4, rngs=rngs)
    self.b = nnx.Linear(4, 1, rngs=rngs)

  def __call__(self, x):
    return self.b(jnp.tanh(self.a(x)))


def test_stack_modules_builds_independent_beams_and_applies_them_at_once():
  graphdef, beams = nn.stack_modules(MLP, jax.random.key(0), 4)
  assert beams["a"]["kernel"].shape == (4, 3, 4)
  kernels = np.asarray(beams["a"]["kernel"]).reshape(4, -1)
  assert np.linalg.matrix_rank(kernels) == 4  # four different initializations
  x = jax.random.normal(jax.random.key(1), (5, 3))
  out = nn.apply_beams(graphdef, beams, x)
  assert out.shape == (4, 5, 1)
  for k in range(4):  # the same as merging beam k and calling it
    np.testing.assert_allclose(out[k], nnx.merge(graphdef, nn.unstack(beams, k))(x), rtol=1e-6)
  # beam k is the module built from the k-th split key
  ref = nnx.split(MLP(nnx.Rngs(jax.random.split(jax.random.key(0), 4)[2])), nnx.Param)[1]
  np.testing.assert_allclose(nn.unstack(beams, 2)["b"]["kernel"], ref["b"]["kernel"][...])


def test_stack_modules_errors():
  with pytest.raises(ValueError, match="K"):
    nn.stack_modules(MLP, jax.random.key(0), 0)

  class WithStats(nnx.Module):
    def __init__(self, rngs):
      self.norm = nnx.BatchNorm(3, rngs=rngs)

  with pytest.raises(ValueError, match=r"also holds \['BatchStat'\].*nnx.LayerNorm"):
    nn.stack_modules(WithStats, jax.random.key(0), 2)


def test_stacked_nnx_beams_drive_the_kbeam_solver():
  """A follower module as K beams: the solver's max step improves every beam at once."""
  graphdef, beams = nn.stack_modules(MLP, jax.random.key(0), 3)
  x = jax.random.normal(jax.random.key(1), (16, 3))

  def f(u, v):  # the follower fits u * x[:, :1]; the leader shrinks u
    pred = nnx.merge(graphdef, v)(x)[:, 0]
    return -jnp.mean((pred - u * x[:, 0]) ** 2) + 0.1 * u**2

  solver = minimax.kbeam(f, optax.sgd(0.01), optax.adam(0.02))
  state = solver.init(jax.random.key(2), jnp.array(1.0), beams, num_beams=3)
  state, info = kbeam_jax.run(solver.step, state, 200)
  assert info.values.shape == (200, 3)
  assert bool(jnp.all(info.values[-1] > info.values[0]))


class Leader(nnx.Module):
  def __init__(self, rngs, norm=False):
    self.linear = nnx.Linear(2, 2, rngs=rngs)
    self.norm = nnx.BatchNorm(2, rngs=rngs) if norm else None

  def __call__(self, x):
    out = self.linear(x)
    return out if self.norm is None else self.norm(out)


X = jnp.array([[1.0, 0.5], [-0.3, 2.0], [0.7, -1.0]])


def leader_objective(graphdef, rest=()):
  def minimax_fn(params, v):
    out = nnx.merge(graphdef, params, *rest)(X)
    return jnp.mean(out @ v) + 0.5 * jnp.mean(out**2) - 0.5 * jnp.sum(v**2)

  return minimax_fn


def pure_updates(tx, params, minimax_fn, steps):
  """The same updates on plain arrays, outside nnx."""
  opt_state = tx.init(params)
  for _ in range(steps):
    updates, opt_state = tx.update(None, opt_state, params, minimax_fn=minimax_fn)
    params = optax.apply_updates(params, updates)
  return params, opt_state


@pytest.mark.parametrize("chained", [False, True])
def test_nnx_optimizer_update_without_grads(chained):
  """K-beam in nnx.Optimizer with no dummy gradients, its state read as plain arrays."""
  beams = jax.random.normal(jax.random.key(3), (4, 2))
  if chained:
    tx = optax.chain(minimax.scale_by_kbeam(optax.sgd(0.1), beams), optax.adam(0.05))
  else:
    tx = minimax.kbeam_sgd(0.1, optax.sgd(0.1), beams)
  model = Leader(nnx.Rngs(0))
  graphdef, params0 = nnx.split(model, nnx.Param)
  params0 = nnx.as_pure(params0)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer):
    graphdef, _ = nnx.split(model, nnx.Param)
    nn.update_without_grads(optimizer, model, minimax_fn=leader_objective(graphdef))

  for _ in range(5):
    train_step(model, optimizer)
  params, opt_state = pure_updates(tx, params0, leader_objective(graphdef), 5)
  np.testing.assert_allclose(model.linear.kernel[...], params["linear"]["kernel"], rtol=1e-6)
  assert int(optimizer.step[...]) == 5
  certificate = nn.optimizer_state(optimizer, "certificate")
  assert type(certificate) is type(jnp.zeros(())) and certificate.shape == ()  # not OptArray
  np.testing.assert_allclose(certificate, optax.tree.get(opt_state, "certificate"), rtol=1e-5)
  np.testing.assert_allclose(
    nn.optimizer_state(optimizer, "values"), optax.tree.get(opt_state, "values"), rtol=1e-5
  )
  state = nn.optimizer_state(optimizer)
  assert jax.tree.structure(state) == jax.tree.structure(opt_state)
  with pytest.raises(KeyError, match="no field 'certifcate'; its fields are .*'certificate'"):
    nn.optimizer_state(optimizer, "certifcate")


def test_update_without_grads_refuses_transforms_that_need_grads():
  model = Leader(nnx.Rngs(0))
  graphdef, _ = nnx.split(model, nnx.Param)
  f = leader_objective(graphdef)
  with pytest.raises(TypeError, match="needs gradients"):  # sgd passes None through
    nn.update_without_grads(
      nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param), model, minimax_fn=f
    )
  # adam fails inside optax (a note says why) or, at optax 0.2.5, returns None (our error)
  with pytest.raises((TypeError, ValueError)) as err:
    nn.update_without_grads(
      nnx.Optimizer(model, optax.adam(0.1), wrt=nnx.Param), model, minimax_fn=f
    )
  said = str(err.value) + "".join(getattr(err.value, "__notes__", []))
  assert "update_without_grads" in said and "grads" in said


def test_batchnorm_leader_pattern():
  """A leader with BatchNorm: split its statistics out, merge them back in the objective,
  advance them by one forward pass after each update (the pattern on the documentation's home
  page)."""
  beams = jax.random.normal(jax.random.key(3), (4, 2))
  tx = minimax.kbeam_sgd(0.1, optax.sgd(0.1), beams)
  model = Leader(nnx.Rngs(0), norm=True)
  graphdef, params0, rest0 = nnx.split(model, nnx.Param, ...)
  params0, rest0 = nnx.as_pure(params0), nnx.as_pure(rest0)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer):
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)  # rest: the running statistics
    rest = nnx.as_pure(rest)  # plain arrays: the objective runs under vmap and grad
    nn.update_without_grads(optimizer, model, minimax_fn=leader_objective(graphdef, (rest,)))
    model(X)  # training mode: advances the running statistics once per update

  for _ in range(3):
    train_step(model, optimizer)
  # in training mode BatchNorm normalizes by the batch, so the running statistics do not
  # change the objective: the updates equal the pure loop's with the initial statistics
  params, _ = pure_updates(tx, params0, leader_objective(graphdef, (rest0,)), 3)
  np.testing.assert_allclose(model.linear.kernel[...], params["linear"]["kernel"], rtol=1e-6)
  np.testing.assert_allclose(model.norm.scale[...], params["norm"]["scale"], rtol=1e-6)
  # and the statistics moved: after update t, one pass at momentum 0.99 with the batch mean
  expected = jnp.zeros(2)
  for t in (1, 2, 3):
    p_t = pure_updates(tx, params0, leader_objective(graphdef, (rest0,)), t)[0]["linear"]
    expected = 0.99 * expected + 0.01 * jnp.mean(X @ p_t["kernel"] + p_t["bias"][None], 0)
  assert float(jnp.min(jnp.abs(expected))) > 1e-3
  np.testing.assert_allclose(model.norm.mean[...], expected, rtol=1e-5)


def test_linen_train_state_forwards_extra_arguments():
  model = linen.Dense(1)
  x = jax.random.normal(jax.random.key(0), (8, 2))
  params = model.init(jax.random.key(1), x)
  beams = jax.random.normal(jax.random.key(2), (3, 1))
  f = lambda p, v: jnp.mean((model.apply(p, x)[:, 0] - v[0]) ** 2) - 0.5 * jnp.sum(v**2)
  tx = minimax.kbeam_sgd(0.1, optax.sgd(0.1), beams)
  state = nn.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  # the same steps by hand
  opt_state, p = tx.init(params), params
  for _ in range(3):
    state = state.apply_gradients(grads=None, minimax_fn=f)
    updates, opt_state = tx.update(None, opt_state, p, minimax_fn=f)
    p = optax.apply_updates(p, updates)
  assert int(state.step) == 3
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), state.params, p)
  # a dataclass field is still replaced, as in flax's TrainState
  other = lambda *a: None
  state = state.apply_gradients(grads=None, minimax_fn=f, apply_fn=other)
  assert state.apply_fn is other and int(state.step) == 4
  with pytest.raises(TypeError, match="minimax_fn"):  # the transform's own error
    state.apply_gradients(grads=None)


def test_checkpoint_round_trip_with_keys_and_mismatch(tmp_path):
  state = {"w": jnp.arange(6.0).reshape(2, 3), "n": jnp.int32(4), "key": jax.random.key(3)}
  state["opt"] = optax.adam(1e-3).init({"a": jnp.zeros(2)})  # NamedTuples, EmptyState
  state["host"], state["scalar"] = np.ones(2, np.float16), 1.5
  nn.save_checkpoint(tmp_path / "c", state, history=[[0.5, 1.0]], note="x", arr=np.arange(2))
  restored, meta = nn.load_checkpoint(tmp_path / "c", like=state)
  np.testing.assert_array_equal(restored["w"], state["w"])
  assert restored["n"].dtype == jnp.int32
  assert bool(jnp.all(jax.random.key_data(restored["key"]) == jax.random.key_data(state["key"])))
  assert isinstance(restored["host"], np.ndarray) and restored["host"].dtype == np.float16
  assert isinstance(restored["scalar"], jax.Array) and float(restored["scalar"]) == 1.5
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  assert meta == {"history": [[0.5, 1.0]], "note": "x", "arr": [0, 1]}
  with pytest.raises(ValueError, match=r"leaf \['w'\]: shape \(2, 3\)"):
    nn.load_checkpoint(tmp_path / "c", like={**state, "w": jnp.zeros((3, 2))})
  with pytest.raises(ValueError, match=r"missing from the checkpoint: \['v'\]"):
    nn.load_checkpoint(tmp_path / "c", like={"w": state["w"], "v": state["w"]})
  with pytest.raises(TypeError, match="JSON"):
    nn.save_checkpoint(tmp_path / "d", state, bad=object())


def test_checkpoint_restores_by_path_not_position(tmp_path):
  """Renamed keys with the same leaf shapes used to load silently into the wrong keys."""
  saved = {"disc": jnp.zeros(3), "gen": jnp.ones(3)}
  nn.save_checkpoint(tmp_path / "c", saved)
  renamed = {"critic": jnp.zeros(3), "generator": jnp.zeros(3)}  # same shapes, in order
  with pytest.raises(ValueError) as err:
    nn.load_checkpoint(tmp_path / "c", like=renamed)
  message = str(err.value)
  assert "['critic']" in message and "['generator']" in message  # missing
  assert "['disc']" in message and "['gen']" in message  # in the file, not in `like`
  assert str(tmp_path / "c") in message
  # the same keys in another insertion order load by name
  restored, _ = nn.load_checkpoint(
    tmp_path / "c", like={"gen": saved["gen"], "disc": saved["disc"]}
  )
  np.testing.assert_array_equal(restored["gen"], 1.0)
  np.testing.assert_array_equal(restored["disc"], 0.0)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.float16, jnp.bfloat16])
def test_checkpoint_never_casts(tmp_path, dtype):
  nn.save_checkpoint(tmp_path / "c", {"w": jnp.ones(3, jnp.float32)})
  with pytest.raises(ValueError, match=r"\['w'\]: dtype float32 in the checkpoint") as err:
    nn.load_checkpoint(tmp_path / "c", like={"w": jnp.ones(3, dtype)})
  assert "does not cast" in str(err.value)


def test_checkpoint_prng_key_mismatch(tmp_path):
  nn.save_checkpoint(tmp_path / "c", {"k": jax.random.key(0)})
  with pytest.raises(ValueError, match="rbg PRNG key, the checkpoint a threefry2x32 key"):
    nn.load_checkpoint(tmp_path / "c", like={"k": jax.random.key(0, impl="rbg")})
  with pytest.raises(ValueError, match="holds a threefry2x32 PRNG key"):
    nn.load_checkpoint(tmp_path / "c", like={"k": jnp.zeros(2, jnp.uint32)})
  nn.save_checkpoint(tmp_path / "d", {"k": jnp.zeros(2, jnp.uint32)})
  with pytest.raises(ValueError, match="not a key"):
    nn.load_checkpoint(tmp_path / "d", like={"k": jax.random.key(0)})


def test_checkpoint_files_missing_damaged_or_old(tmp_path):
  state = {"w": jnp.arange(300.0)}
  with pytest.raises(FileNotFoundError, match="no checkpoint at .*nowhere"):
    nn.load_checkpoint(tmp_path / "nowhere", like=state)
  nn.save_checkpoint(tmp_path / "c", state)
  for f in (tmp_path / "c").rglob("*"):  # truncate every array file
    if f.is_file() and f.parent.name == "d":
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  with pytest.raises(ValueError, match="damaged or incomplete") as err:
    nn.load_checkpoint(tmp_path / "c", like=state)
  assert str(tmp_path / "c") in str(err.value)
  # kbeam_jax 0.1 wrote one msgpack file (a map): a clear error, never a positional load
  (tmp_path / "old.msgpack").write_bytes(bytes([0x82]) + b"\xa6leaves")
  with pytest.raises(ValueError, match="msgpack checkpoint of kbeam_jax 0.1") as err:
    nn.load_checkpoint(tmp_path / "old.msgpack", like=state)
  assert str(tmp_path / "old.msgpack") in str(err.value) and "--resume" in str(err.value)
  # a folder of other things is not overwritten by a checkpoint
  (tmp_path / "results").mkdir()
  (tmp_path / "results" / "table.md").write_text("x")
  with pytest.raises(ValueError, match="not checkpoint steps"):
    nn.save_checkpoint(tmp_path / "results", state)


def test_checkpoint_keeps_the_last_complete_step(tmp_path):
  """Each save is a new orbax step committed atomically; a killed save leaves the old one."""
  path = tmp_path / "c"
  assert not nn.checkpoint_exists(path)
  nn.save_checkpoint(path, {"w": jnp.zeros(2)}, i=0)
  nn.save_checkpoint(path, {"w": jnp.ones(2)}, i=1)
  assert [p.name for p in path.iterdir()] == ["1"]  # one step kept
  # what a run killed while writing step 2 leaves: orbax's temporary folder
  (path / "2.orbax-checkpoint-tmp-1234").mkdir()
  restored, meta = nn.load_checkpoint(path, like={"w": jnp.zeros(2)})
  assert meta == {"i": 1}
  np.testing.assert_array_equal(restored["w"], 1.0)
  only_tmp = tmp_path / "killed_first_save"
  (only_tmp / "0.orbax-checkpoint-tmp-1").mkdir(parents=True)
  assert not nn.checkpoint_exists(only_tmp)  # so --resume starts from scratch
  with pytest.raises(FileNotFoundError, match="no complete step"):
    nn.load_checkpoint(only_tmp, like={"w": jnp.zeros(2)})
  nn.save_checkpoint(path, {"w": jnp.ones(2)}, i=2)  # the next save clears the leftover
  assert [p.name for p in path.iterdir()] == ["2"]
  nn.save_checkpoint(tmp_path / "empty", {})  # a tree without leaves
  assert nn.load_checkpoint(tmp_path / "empty", like={})[0] == {}
