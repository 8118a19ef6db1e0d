"""Mixed precision and host syncs: the compiled training step computes in
``train.compute_dtype`` (bfloat16 activations and convolutions, float32
parameters, statistics and losses), evaluation in float32 unless explicitly
asked, and the training / evaluation loops make no implicit host transfer."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds
from jax.sharding import NamedSharding, PartitionSpec as P

from experiments import train as exp
from tsjax import config_checks as cc
from tsjax import models
from tsjax.configs.adv_train import get_config
from tsjax.data import images
from tsjax.train import TrainState
from tsjax.train import classifier as clf
from tsjax.train.fit import fit


def _mock_cifar():
  with tfds.testing.mock_data(num_examples=32):
    return images.load_dataset("cifar10", "train")


def _setup(method, dtype, ds):
  config = get_config(f"cifar10,{method},smoke")
  config.model.name, config.model.kwargs = "small_cnn", {}
  config.train.compute_dtype = dtype
  model = exp.make_model(config, ds)
  opt, _ = clf.make_optimizer(config.train, 10)
  built = exp.build(config, model, ds, jax.random.key(0))
  state = TrainState.create(built.params, opt, jax.random.key(1),
                            built.model_state)
  step = clf.jit_train_step(exp.with_augmentation(
      built.loss_fn, config, ds.num_classes), opt)
  batch = next(images.train_batches(ds.images, ds.labels, 16, seed=0))
  return config, model, state, step, batch


def _op_dtypes(hlo: str, op: str) -> set:
  """Result element types of every ``op`` instruction of an HLO module (the
  program as lowered: XLA:CPU later computes bfloat16 convolutions in
  float32, GPUs and TPUs in bfloat16)."""
  return set(re.findall(rf"= (\w+)\[[^\]]*\]\S* {op}\(", hlo))


@pytest.mark.parametrize("method", ["pgd_at", "trades"])
def test_bf16_step_computes_in_bf16_and_keeps_f32_state(method):
  ds = _mock_cifar()
  hlo, new = {}, {}
  for dtype in ("float32", "bfloat16"):
    config, model, state, step, batch = _setup(method, dtype, ds)
    hlo[dtype] = step.lower(state, batch, None).as_text(dialect="hlo")
    new[dtype], metrics = step(state, batch, None)
    assert metrics["loss"].dtype == jnp.float32
  convs = {d: _op_dtypes(h, "convolution") for d, h in hlo.items()}
  assert convs["float32"] == {"f32"}
  # Every convolution of the step (forward, attack and both backward passes)
  # in bfloat16.
  assert convs["bfloat16"] == {"bf16"}, convs
  for leaf in jax.tree.leaves((new["bfloat16"].params,
                               new["bfloat16"].model_state,
                               new["bfloat16"].opt_state)):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert leaf.dtype == jnp.float32
  # Close to the float32 step, but not the same computation.
  diffs = [float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
           for a, b in zip(jax.tree.leaves(new["float32"].params),
                           jax.tree.leaves(new["bfloat16"].params))]
  assert 0 < max(diffs) < 0.05, diffs


def test_evaluation_runs_in_float32_whatever_the_training_dtype():
  ds = _mock_cifar()
  config = get_config("cifar10,pgd_at,smoke")
  config.model.name, config.model.kwargs = "small_cnn", {}
  config.train.compute_dtype = "bfloat16"
  exp.validate(config)
  model = exp.make_model(config, ds)
  eval_model = models.with_compute_dtype(model, config.eval.compute_dtype)
  params, ms = clf.init_model(model, jax.random.key(0), ds.image_shape)
  step = clf.make_eval_step(eval_model, {"pgd": ("ce", exp.eval_attack(config))})
  x, y = jnp.asarray(ds.images[:8]), jnp.asarray(ds.labels[:8])
  hlo = step.lower(params, ms, x, y, jax.random.key(0)).as_text(dialect="hlo")
  assert _op_dtypes(hlo, "convolution") == {"f32"}
  assert "bf16" not in hlo
  # ... and the bfloat16 twin, when asked, computes in bfloat16.
  low = clf.make_eval_step(models.with_compute_dtype(model, "bfloat16"),
                           {"pgd": ("ce", exp.eval_attack(config))})
  hlo = low.lower(params, ms, x, y, jax.random.key(0)).as_text(dialect="hlo")
  assert _op_dtypes(hlo, "convolution") == {"bf16"}


def test_low_precision_evaluation_needs_the_explicit_flag():
  config = get_config("cifar10,pgd_at,smoke")
  config.eval.compute_dtype = "bfloat16"
  with pytest.raises(cc.ConfigError, match="eval.compute_dtype.*"
                     "eval.allow_low_precision"):
    exp.validate(config)
  config.eval.allow_low_precision = True
  exp.validate(config)
  config.train.compute_dtype = "float16"
  with pytest.raises(cc.ConfigError, match="train.compute_dtype"):
    exp.validate(config)


def test_with_compute_dtype_shares_parameters():
  m = models.get_model("preact_resnet18", num_classes=10, width=8)
  low = models.with_compute_dtype(m, "bfloat16")
  assert low.dtype == jnp.bfloat16 and low.param_dtype == jnp.float32
  assert models.with_compute_dtype(low, "float32").dtype is None
  x = jnp.zeros((2, 32, 32, 3))
  p = m.init(jax.random.key(0), x)
  q = low.init(jax.random.key(0), x)
  assert jax.tree.structure(p) == jax.tree.structure(q)
  assert all(a.dtype == b.dtype for a, b in zip(jax.tree.leaves(p),
                                                jax.tree.leaves(q)))
  with pytest.raises(ValueError, match="float16"):
    models.with_compute_dtype(m, "float16")


# ------------------------------------------------------------- host syncs
def _tiny_run(tmp_path, step_fn=None):
  ds = _mock_cifar()
  config, model, state, step, _ = _setup("pgd_at", "float32", ds)
  eval_step = clf.make_eval_step(model, {"pgd": ("ce", exp.eval_attack(config))})
  evaluate = lambda p, ms: {k: v for k, v in clf.evaluate(
      eval_step, p, ms, images.eval_batches(ds.images[:20], ds.labels[:20], 8),
      jax.random.key(3)).items() if k != "per_example"}
  return fit(workdir=str(tmp_path), state=state, step_fn=step_fn or step,
             train_batches=lambda e: images.train_batches(
                 ds.images, ds.labels, 16, seed=0, start_step=2 * e),
             epochs=2, steps_per_epoch=2, evaluate_fn=evaluate,
             select_metric="pgd/acc", ema_decay=0.9, swa_start_epoch=1,
             bn_batches=lambda e: (b["image"].astype(jnp.float32) / 255 for b
                                   in images.train_batches(
                                       ds.images, ds.labels, 16, seed=1,
                                       num_epochs=1)),
             model=model, log_every=1, progress=False,
             state_sharding=NamedSharding(images.data_mesh(), P()))


def test_training_and_evaluation_make_no_implicit_transfer(tmp_path):
  """Steps, EMA updates, metric logging and the masked evaluation run under
  ``jax.transfer_guard("disallow")``: this run would raise on any implicit
  host <-> device or device <-> device transfer (a state left on one device
  while the batch is sharded over four is one: copied every step)."""
  out = _tiny_run(tmp_path)
  assert int(out["state"].step) == 4 and out["best"] is not None
  assert 0 <= out["last"]["pgd/acc"] <= 1


def test_the_guard_is_on_inside_the_step_loop(tmp_path):
  """A step that sneaks a host value into a jitted call is refused, so the
  test above would notice one."""
  ds = _mock_cifar()
  _, _, _, step, _ = _setup("pgd_at", "float32", ds)
  scale = jax.jit(lambda s, a: s * a)

  def leaky(state, batch, ctx):
    state, metrics = step(state, batch, ctx)
    return state, {**metrics, "loss": scale(metrics["loss"], np.float32(1))}

  with pytest.raises(Exception, match="Disallowed host-to-device"):
    _tiny_run(tmp_path, leaky)


def test_host_batches_are_put_explicitly(tmp_path):
  """numpy batches (a single-process convenience) are put on the devices
  by the loop, explicitly: the same parameters as device batches."""
  opt = optax.sgd(0.1)
  loss = lambda p, ms, b, k, c: (jnp.sum(p["w"] * b["x"]),
                                 ({"loss": jnp.sum(p["w"] * b["x"])}, ms))
  xs = np.arange(6, dtype=np.float32).reshape(2, 3)
  outs = []
  for put in (np.asarray, jnp.asarray):
    state = TrainState.create({"w": jnp.ones((3,))}, opt, jax.random.key(0))
    out = fit(workdir=str(tmp_path / put.__module__), state=state,
              step_fn=clf.jit_train_step(loss, opt),
              train_batches=lambda e: iter([{"x": put(x)} for x in xs]),
              epochs=1, steps_per_epoch=2, progress=False)
    outs.append(np.asarray(out["state"].params["w"]))
  np.testing.assert_allclose(outs[0], 1.0 - 0.1 * xs.sum(0), rtol=1e-6)
  np.testing.assert_array_equal(outs[0], outs[1])
