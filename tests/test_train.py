"""Training: off-span drift per regime, NaN-skipping steps, seed sweeps."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tsjax.configs import teacher_student as ts_configs
from tsjax.data import synthetic
from tsjax.train import (TrainState, make_train_step, sample_batch, seed_keys,
                         seed_sweep, train_steps)
from tsjax.attacks import pgd
from tsjax.backend import cpu as backend_cpu
from tsjax.train.teacher_student import TeacherStudent, run_seeds

STEPS = 200
DRIFT_REGIMES = ("standard", "pgd_at", "offsubspace")


@pytest.fixture(scope="module")
def study(make_small_config):
  """One study for the module, with its jitted builders (compiled once)."""
  config = make_small_config()
  config.regimes = DRIFT_REGIMES
  study = TeacherStudent(config)
  # compiled as the study compiles its set-up (it runs once)
  study.jit_problem = jax.jit(study.problem,
                              compiler_options=backend_cpu.RUN_ONCE)

  @functools.partial(jax.jit, static_argnums=(0,))
  def jit_train(regime, problem):
    return study.train(regime, study.init_state(problem), problem, STEPS)

  study.jit_train = jit_train
  return study


@pytest.fixture(scope="module")
def drift_runs(study):
  """standard / pgd_at / offsubspace trained STEPS steps on one seed."""
  problem = study.jit_problem(jax.random.key(0))
  # Only the drift entries of `evaluate` (XLA drops the rest); the full
  # evaluation is exercised by test_run_seeds_tiny_config.
  drift = jax.jit(lambda s, p: {k: v for k, v in study.evaluate(s, p).items()
                                if k.startswith("drift")})
  out = {}
  for regime in DRIFT_REGIMES:
    state, stats = study.jit_train(regime, problem)
    out[regime] = (state, stats, drift(state, problem))
  return study, problem, out


def test_standard_training_never_leaves_the_data_span(drift_runs):
  study, problem, out = drift_runs
  state, stats, ev = out["standard"]
  assert bool(stats["all_finite"])
  assert int(state.step) == STEPS
  assert state.params["hidden_0"]["kernel"].dtype == jnp.float64
  # The student did learn inside the span ...
  assert float(ev["drift_in"]) > 1e-2
  # ... but its first layer did not move off the span (float64 rounding only).
  assert float(ev["drift_perp"]) <= 1e-10
  # Independent recomputation of the drift.
  U = np.asarray(problem["U"])
  dw = (np.asarray(state.params["hidden_0"]["kernel"])
        - np.asarray(problem["student0"]["hidden_0"]["kernel"]))
  ref = (np.linalg.norm(dw - U @ (U.T @ dw))
         / np.linalg.norm(problem["student0"]["hidden_0"]["kernel"]))
  np.testing.assert_allclose(ev["drift_perp"], ref, rtol=1e-6, atol=1e-13)


@pytest.mark.parametrize("regime", ["pgd_at", "offsubspace"])
def test_off_span_regimes_drift(drift_runs, regime):
  _, _, out = drift_runs
  state, stats, ev = out[regime]
  assert bool(stats["all_finite"])
  assert float(ev["drift_perp"]) > 1e-3


def test_train_step_skips_non_finite_loss():
  opt = optax.sgd(0.1, momentum=0.9)

  def loss_fn(params, model_state, batch, key, ctx):
    del key, ctx
    loss = jnp.sum((params["w"] * batch["x"] - 1.0) ** 2) * batch["scale"]
    return loss, ({"loss": loss}, model_state)

  step = jax.jit(make_train_step(loss_fn, opt))
  params = {"w": jnp.array([0.5, -1.0, 2.0])}
  state = TrainState.create(params, opt, jax.random.key(0))
  good = {"x": jnp.array([1.0, 2.0, 3.0]), "scale": jnp.array(1.0)}
  state, m = step(state, good, None)
  assert bool(m["finite"])
  assert not np.allclose(state.params["w"], params["w"])  # it did update
  for bad_scale in (jnp.nan, jnp.inf):
    bad = {**good, "scale": jnp.array(bad_scale)}
    new, m = step(state, bad, None)
    assert not bool(m["finite"])
    assert not np.isfinite(float(m["loss"]))
    for a, b in zip(jax.tree.leaves((new.params, new.opt_state,
                                     new.model_state)),
                    jax.tree.leaves((state.params, state.opt_state,
                                     state.model_state))):
      np.testing.assert_array_equal(a, b)
    assert np.all(np.isfinite(np.asarray(new.params["w"])))
    np.testing.assert_array_equal(jax.random.key_data(new.key),
                                  jax.random.key_data(state.key))
    # The step counter still advances, so the next step draws a new batch
    # and key instead of retrying the same non-finite one forever.
    assert int(new.step) == int(state.step) + 1

  # A finite loss with a non-finite gradient is skipped too.
  def sqrt_loss(params, model_state, batch, key, ctx):
    loss = jnp.sum(jnp.sqrt(jnp.abs(params["w"] - batch["x"])))
    return loss, ({"loss": loss}, model_state)

  step2 = jax.jit(make_train_step(sqrt_loss, opt))
  new, m = step2(state, {"x": state.params["w"]}, None)
  assert np.isfinite(float(m["loss"])) and not bool(m["finite"])
  np.testing.assert_array_equal(new.params["w"], state.params["w"])


def test_train_steps_index_blocks_give_per_step_sampling(study):
  """Batch indices drawn a block of steps at a time are sample_batch's."""
  problem = study.jit_problem(jax.random.key(1))
  state0 = study.init_state(problem)
  step, ctx = study._steps["standard"], study.ctx(problem)
  x = problem["x_train"]
  B, n = int(study.config.train.batch_size), 37

  @jax.jit
  def per_step(state):  # one sample_batch per step, as before index blocks
    def body(_, s):
      return step(s, sample_batch(s.key, s.step, x, B), ctx)[0]
    return jax.lax.fori_loop(0, n, body, state)

  ref = per_step(state0)
  for block in (1, 8, 37, 256):  # partial last block, one block, n < block
    out, stats = jax.jit(lambda s, b=block: train_steps(
        step, s, x, ctx, n, B, index_block=b))(state0)
    assert int(out.step) == n and bool(stats["all_finite"])
    for a, b in zip(jax.tree.leaves(out.params), jax.tree.leaves(ref.params)):
      np.testing.assert_array_equal(a, b)
  # Resuming is seamless: 20 + 17 steps equal 37.
  mid, _ = jax.jit(lambda s: train_steps(step, s, x, ctx, 20, B))(state0)
  end, _ = jax.jit(lambda s: train_steps(step, s, x, ctx, 17, B))(mid)
  for a, b in zip(jax.tree.leaves(end.params), jax.tree.leaves(ref.params)):
    np.testing.assert_array_equal(a, b)


def test_training_from_low_rank_coordinates_matches_dense_inputs(study):
  problem = study.jit_problem(jax.random.key(2))
  data = study.train_data(problem)
  assert isinstance(data, synthetic.LowRankData)
  x = np.asarray(problem["x_train"])
  assert data.num_rows == x.shape[0]
  assert problem["z_train"].shape == (x.shape[0], study.config.data.k)
  scale = np.max(np.abs(x))
  np.testing.assert_allclose(data.dense(), x, rtol=0, atol=1e-14 * scale)
  idx = jnp.array([0, 5, 5, x.shape[0] - 1])
  np.testing.assert_allclose(data.rows(idx), x[np.asarray(idx)], rtol=0,
                             atol=1e-14 * scale)
  # The same run on the coordinates and on the dense inputs (rounding only).
  lowrank = study.jit_train("standard", problem)
  dense = jax.jit(lambda p: study.train(
      "standard", study.init_state(p), p, STEPS, p["x_train"]))(problem)
  for a, b in zip(jax.tree.leaves((lowrank[0].params, lowrank[1]["loss"])),
                  jax.tree.leaves((dense[0].params, dense[1]["loss"]))):
    np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-15)


def test_low_rank_coordinates_hold_in_span_noise_only(make_small_config):
  c = make_small_config()
  c.regimes = ("standard",)
  c.data.noise_in = 0.3
  once = functools.partial(jax.jit, compiler_options=backend_cpu.RUN_ONCE)
  problem = once(TeacherStudent(c).problem)(jax.random.key(4))
  x = np.asarray(problem["x_train"])
  z = np.asarray(problem["z_train"])
  np.testing.assert_allclose(z @ np.asarray(problem["U"]).T, x, rtol=0,
                             atol=1e-13 * np.max(np.abs(x)))
  c.data.noise_out = 0.1  # off-span noise: only the dense inputs exist
  study = TeacherStudent(c)
  problem = once(study.problem)(jax.random.key(4))
  assert "z_train" not in problem
  assert study.train_data(problem) is problem["x_train"]


def test_seed_keys_match_single_seed_keys():
  keys = seed_keys(3, 2)
  assert keys.shape == (2,)
  np.testing.assert_array_equal(jax.random.key_data(keys[1]),
                                jax.random.key_data(jax.random.key(4)))
  np.testing.assert_array_equal(jax.random.key_data(keys[0]),
                                jax.random.key_data(jax.random.key(3)))


def test_seed_sweep_padding_matches_single_seed_runs(study):
  assert jax.device_count() == 4, "conftest should force 4 CPU devices"

  def one_seed(key):
    problem = study.problem(key)
    state, stats = study.train("pgd_at", study.init_state(problem), problem,
                               STEPS)
    return problem["U"], problem["x_train"], state.params, stats["loss"]

  S = 6  # not a multiple of the 4 devices: the sweep pads
  keys = seed_keys(10, S)
  U, x_train, params, loss = seed_sweep(one_seed)(keys)
  assert loss.shape == (S,) and U.shape[0] == S
  assert jax.tree.leaves(params)[0].shape[0] == S
  seen = []
  for i in range(S):
    # The same seed alone, un-vmapped, on one device.
    problem = study.jit_problem(jax.random.key(10 + i))
    state, stats = study.jit_train("pgd_at", problem)
    np.testing.assert_allclose(U[i], problem["U"], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(x_train[i], problem["x_train"], rtol=1e-12,
                               atol=1e-15)
    np.testing.assert_allclose(loss[i], stats["loss"], rtol=1e-12)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state.params)):
      np.testing.assert_allclose(a[i], b, rtol=1e-12, atol=1e-15)
    seen.append(float(stats["loss"]))
  assert len(set(seen)) == S  # seeds really differ


def test_seed_sweep_static_args_and_errors():
  calls = []

  def fn(x, n, y):
    calls.append(n)
    return x * n + y

  sweep = seed_sweep(fn, static_argnums=(1,))
  x = jnp.arange(5.0)
  y = jnp.ones(5)
  np.testing.assert_allclose(sweep(x, 3, y), np.arange(5.0) * 3 + 1)
  np.testing.assert_allclose(sweep(x, 2, y), np.arange(5.0) * 2 + 1)
  with pytest.raises(ValueError, match="leading"):
    sweep(x, 2, jnp.ones(4))
  # Single device: plain jit(vmap).
  one = seed_sweep(lambda a: a ** 2, devices=jax.devices()[:1])
  np.testing.assert_allclose(one(x), np.arange(5.0) ** 2)


@pytest.mark.parametrize("devices", [1, 4])
def test_seed_sweep_sequential_matches_vmap(devices):
  """``sequential=True`` (seeds one after another, ``lax.map``) computes what
  ``vmap`` computes, on one device and sharded with padding (6 seeds, 4
  devices); static arguments pass through."""
  def fn(key, w, power):
    x = jax.random.normal(key, (64, 5), w.dtype)
    h = jnp.tanh(x @ w) ** power
    return {"mean": h.mean(0), "gram": h.T @ h}

  keys = seed_keys(3, 6)
  ws = jax.random.normal(jax.random.key(0), (6, 5, 3), jnp.float64)
  devs = jax.devices()[:devices]
  want = seed_sweep(fn, devs, static_argnums=(2,))(keys, ws, 2)
  got = seed_sweep(fn, devs, static_argnums=(2,), sequential=True)(keys, ws, 2)
  for i in range(6):   # and each seed is that seed alone
    alone = fn(keys[i], ws[i], 2)
    for k in want:
      np.testing.assert_allclose(got[k][i], alone[k], rtol=1e-12, err_msg=k)
  for k in want:
    assert got[k].shape == want[k].shape, k
    np.testing.assert_allclose(got[k], want[k], rtol=1e-12, err_msg=k)


@pytest.mark.parametrize("options", ["RUN_ONCE", "RUN_FEW"])
def test_compile_presets_small_program(options):
  """The presets compile (a misspelt option would not) and compute what the
  default-compiled program computes: random draws, a vmapped 5-step l2 PGD
  with restarts and products, float64."""
  def fn(key, w):
    x = jax.random.normal(key, (64, 5), w.dtype)
    loss = lambda xa: jnp.sum(jnp.tanh(xa @ w) ** 2, -1)
    x_adv = pgd(loss, x, key, eps=0.5, step_size=0.2, steps=5, norm="l2",
                restarts=3)
    return {"x_adv": x_adv, "gram": x_adv.T @ x_adv}

  keys = seed_keys(1, 3)
  ws = jax.random.normal(jax.random.key(0), (3, 5, 4), jnp.float64)
  want = seed_sweep(fn)(keys, ws)
  got = seed_sweep(fn, compiler_options=getattr(backend_cpu, options))(keys, ws)
  for k in want:   # RUN_ONCE rounds differently in the last bits (~1e-14)
    np.testing.assert_allclose(got[k], want[k], rtol=1e-10, atol=1e-12,
                               err_msg=k)
  assert float(jnp.max(jnp.abs(want["x_adv"]))) > 0


@pytest.mark.slow
@pytest.mark.parametrize("options", ["RUN_ONCE", "RUN_FEW"])
def test_compile_presets_compute_the_default_programs_results(small_config,
                                                              options):
  """The study's set-up (``RUN_ONCE``) and evaluation (``RUN_FEW``) compiled
  with their presets give the default-compiled results to float64 rounding
  (RUN_ONCE moves a few entries in the last bits; a misspelt option fails to
  compile; a preset that changed the computation would show here)."""
  c = small_config
  c.regimes = ("pgd_at",)
  study = TeacherStudent(c)
  opts = getattr(backend_cpu, options)
  keys = seed_keys(0, 2)
  problems = seed_sweep(study.problem)(keys)
  if options == "RUN_ONCE":
    want, got = problems, seed_sweep(study.problem, compiler_options=opts)(keys)
  else:
    states = seed_sweep(study.init_state)(problems)
    states = seed_sweep(lambda st, pb: study.train("pgd_at", st, pb, 20)[0])(
        states, problems)
    args = (states, problems, problems["x_train"])
    want = seed_sweep(study.evaluate, sequential=True)(*args)
    got = seed_sweep(study.evaluate, sequential=True,
                     compiler_options=opts)(*args)
  flat_want, flat_got = jax.tree.leaves(want), jax.tree.leaves(got)
  assert len(flat_want) == len(flat_got) > 5
  for a, b in zip(flat_want, flat_got):
    if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
      a, b = jax.random.key_data(a), jax.random.key_data(b)
    np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-14)


def test_run_seeds_tiny_config(small_config):
  c = small_config
  c.regimes = ("standard", "robust_features")
  c.robust_features.source = "standard"
  c.train.steps = 50
  c.data.n_train = 64
  c.data.n_eval = 32
  c.eval.corr_batch = 16
  c.eval.attacks = ("full", "orth")
  S = 2
  out = run_seeds(c, seed_keys(0, S))
  assert set(out) == set(c.regimes)
  for regime, res in out.items():
    for name in ("drift_perp", "train_loss", "robust_full/mse",
                 "robust_orth/mse", "spec_in/mean_best", "clean_in/mse"):
      assert res[name].shape == (S,), (regime, name)
      assert np.all(np.isfinite(np.asarray(res[name]))), (regime, name)
    assert np.all(np.asarray(res["all_finite"]))
    assert res["spec_in/layer0/best_corr"].shape == (S, 10)
  assert np.all(np.asarray(out["standard"]["drift_perp"]) <= 1e-10)
  # robust_features trains on re-synthesised (off-span) inputs.
  assert np.all(np.asarray(
      out["robust_features"]["train_in_span_residual"]) > 1e-3)
  # Two seeds give two different studies.
  assert not np.allclose(out["standard"]["train_loss"][0],
                         out["standard"]["train_loss"][1])


@pytest.mark.slow
def test_run_seeds_full_smoke_study_matches_single_seed_runs():
  """Every regime of the smoke study: the sharded sweep equals ``run`` per seed."""
  config = ts_configs.get_config("smoke")
  config.train.steps = 200
  S = 3
  out = run_seeds(config, seed_keys(5, S))
  assert set(out) == set(config.regimes)
  study = TeacherStudent(config)
  run = jax.jit(study.run)
  for i in range(S):
    ref = run(jax.random.key(5 + i))
    for regime, res in ref.items():
      # vmap changes float64 summation orders (~1e-15 relative). The
      # robust-feature synthesis takes l2-*normalised* gradient steps, which
      # amplify that to ~1e-9 in the data it trains on; nothing else does.
      rtol = 1e-7 if regime == "robust_features" else 1e-11
      for name, val in res.items():
        np.testing.assert_allclose(out[regime][name][i], val, rtol=rtol,
                                   atol=1e-12, err_msg=f"{regime} {name}")
  assert np.all(np.asarray(out["standard"]["drift_perp"]) <= 1e-10)
  for regime in ("pgd_at", "ccat", "offsubspace"):
    assert np.all(np.asarray(out[regime]["drift_perp"]) > 1e-3), regime
