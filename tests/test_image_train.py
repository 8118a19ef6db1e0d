"""The image training stack end to end: one step of every method on TFDS
mock CIFAR-10 and on real Fashion-MNIST, masked evaluation, resume, errors,
data parallelism, NaN guard, TensorBoard files and BN re-estimation."""

import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from tsjax.configs.adv_train import get_config
from experiments import train as exp
from tsjax import models
from tsjax.data import images
from tsjax.train import TrainState
from tsjax.train import classifier as clf
from tsjax.train import metric_writers as mw

FMNIST = os.path.isdir(images.DEFAULT_FASHION_MNIST_DIR)
needs_fmnist = pytest.mark.skipif(
    not FMNIST, reason=f"needs `{images.FASHION_MNIST_APT}`")
METHODS = ("standard", "pgd_at", "trades", "ccat")


def _one_step(config, ds):
  model = models.get_model(config.model.name, num_classes=ds.num_classes,
                           mean=ds.mean, std=ds.std)
  opt, _ = clf.make_optimizer(config.train, 10)
  built = exp.build(config, model, ds, jax.random.key(0))
  assert built.ctx is None          # no teacher for these methods
  params, ms = built.params, built.model_state
  if config.method.name == "peeraid":
    assert set(params) == {"student", "peer"}
  state = TrainState.create(params, opt, jax.random.key(1), ms)
  step = clf.jit_train_step(exp.with_augmentation(
      built.loss_fn, config, ds.num_classes), opt)
  batch = next(images.train_batches(ds.images, ds.labels, 8, seed=0))
  before = jax.tree.map(np.array, params)   # the step donates the state
  new, metrics = step(state, batch, None)
  assert bool(metrics["finite"]) and np.isfinite(float(metrics["loss"]))
  moved = [float(np.max(np.abs(np.asarray(a) - b))) for a, b in
           zip(jax.tree.leaves(new.params), jax.tree.leaves(before))]
  assert max(moved) > 0 and int(new.step) == 1


@pytest.mark.parametrize("method", METHODS + ("peeraid",))
def test_one_step_mock_cifar10(method):
  """(PeerAiD: ``build`` initialises the student + peer tree.)"""
  config = get_config(f"cifar10,{method},smoke")
  config.augment = "crop_flip"
  with tfds.testing.mock_data(num_examples=16):
    ds = images.load_dataset("cifar10", "train")
  assert ds.image_shape == (32, 32, 3)
  _one_step(config, ds)


@needs_fmnist
@pytest.mark.parametrize("method", METHODS)
def test_one_step_fashion_mnist_subset(method):
  config = get_config(f"fashion_mnist,{method},smoke")
  ds = images.load_dataset("fashion_mnist", "train").subset(np.arange(64))
  _one_step(config, ds)


def test_masked_evaluation_counts_every_example_once():
  model = models.get_model("small_cnn", num_classes=3, features=(4,), hidden=8)
  params, ms = clf.init_model(model, jax.random.key(0), (8, 8, 1))
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (37, 8, 8, 1), dtype=np.uint8)
  y = rng.integers(0, 3, 37).astype(np.int32)
  step = clf.make_eval_step(model, {})
  r = clf.evaluate(step, params, ms, images.eval_batches(x, y, 16),
                   jax.random.key(0))
  pred = np.argmax(np.asarray(model.apply({"params": params},
                                          x.astype(np.float32) / 255.0)), -1)
  assert r["num_examples"] == 37
  np.testing.assert_array_equal(r["per_example"]["clean/correct"], pred == y)
  assert r["clean/acc"] == pytest.approx(np.mean(pred == y))


def test_eval_attacks_are_no_stronger_than_allowed():
  """PGD accuracy <= clean accuracy on the same points; eps 0 attack == clean."""
  from tsjax.attacks import AttackSpec
  model = models.get_model("small_cnn", num_classes=3, features=(4,), hidden=8)
  params, ms = clf.init_model(model, jax.random.key(0), (8, 8, 1))
  rng = np.random.default_rng(1)
  x = rng.integers(0, 256, (20, 8, 8, 1), dtype=np.uint8)
  y = rng.integers(0, 3, 20).astype(np.int32)
  step = clf.make_eval_step(model, {
      "pgd": ("ce", AttackSpec(eps=0.3, step_size=0.1, steps=5)),
      "zero": ("cw", AttackSpec(eps=0.0, step_size=0.0, steps=1))})
  r = clf.evaluate(step, params, ms, images.eval_batches(x, y, 8),
                   jax.random.key(0))
  assert r["pgd/acc"] <= r["clean/acc"]
  np.testing.assert_array_equal(r["per_example"]["zero/correct"],
                                r["per_example"]["clean/correct"])


def _smoke(method="pgd_at"):
  c = get_config(f"fashion_mnist,{method},smoke")
  c.data.train_subset = 192
  c.data.num_val = 64
  c.data.test_subset = 50
  c.train.batch_size = 32
  c.train.epochs = 3
  c.train.boundaries = (2,)
  c.eval.val_subset = 64
  return c


@needs_fmnist
def test_experiment_outputs_and_resume(tmp_path):
  c = _smoke()
  full = exp.run(c, str(tmp_path / "a"), progress=False)
  assert exp.run(c, str(tmp_path / "b"), progress=False,
                 stop_after_epochs=1) is None
  resumed = exp.run(c, str(tmp_path / "b"), progress=False)
  a = jax.tree.map(np.asarray, full["fit"]["state"].params)
  b = jax.tree.map(np.asarray, resumed["fit"]["state"].params)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  res = json.load(open(tmp_path / "a" / "results.json"))
  assert set(res["results"]) >= {"last", "best"}
  assert res["results"]["last"]["num_test"] == 50
  for row in res["results"].values():
    assert row["pgd_steps"] == c.eval.pgd_steps
    assert 0 <= row["pgd_acc"] <= 1 and 0 <= row["clean_acc"] <= 1
  assert 1 <= res["best_epoch"] <= 3
  assert len(res["history"]) == 3
  assert res["provenance"]["backend"] == jax.default_backend()
  starts = (tmp_path / "b" / "provenance.jsonl").read_text().splitlines()
  assert len(starts) == 2                     # started, then resumed
  # metrics.jsonl and a readable TensorBoard event file
  lines = [json.loads(l) for l in open(tmp_path / "a" / "metrics.jsonl")]
  assert any("train/loss" in l for l in lines)
  assert any("val/pgd/acc" in l for l in lines)
  tb = os.listdir(tmp_path / "a" / "tb")
  assert len(tb) == 1 and tb[0].startswith("events.out.tfevents.")
  recs = list(mw.read_records(str(tmp_path / "a" / "tb" / tb[0])))
  assert len(recs) >= 2 and b"brain.Event:2" in recs[0]


@needs_fmnist
def test_ccat_reports_thresholded_error(tmp_path):
  c = _smoke("ccat")
  c.train.epochs = 1
  c.train.boundaries = ()
  c.method.options.eval_subset = 30
  c.method.options.threshold_split = 0.5     # tau from test images 25..49
  out = exp.run(c, str(tmp_path), progress=False)
  row = out["summary"]["results"]["last"]
  assert 0 <= row["ccat_robust_error"] <= 1
  assert 0 <= row["ccat_robust_error_unthresholded"] <= 1
  assert 0 < row["ccat_tau"] <= 1
  assert (row["ccat_num_attacked"], row["ccat_num_threshold"]) == (30, 25)


@needs_fmnist
def test_ema_and_swa_are_reported(tmp_path):
  c = _smoke("standard")
  c.train.ema_decay = 0.9
  c.train.swa_start_epoch = 1
  out = exp.run(c, str(tmp_path), progress=False)
  assert {"ema", "swa"} <= set(out["summary"]["results"])
  assert int(out["fit"]["swa"]["count"]) == 2


def test_errors_before_compiling(tmp_path):
  c = _smoke()
  c.model.name = "resnet50"
  with pytest.raises(ValueError, match="model.name"):
    exp.run(c, str(tmp_path / "m"), progress=False)
  c = _smoke()
  c.method.name = "madry"
  with pytest.raises(ValueError, match="method.name"):
    exp.run(c, str(tmp_path / "x"), progress=False)
  c = _smoke()
  c.data.data_dir = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
    exp.run(c, str(tmp_path / "d"), progress=False)
  c = get_config("cifar10,pgd_at,smoke")
  c.data.data_dir = str(tmp_path / "empty_tfds")
  with pytest.raises(FileNotFoundError, match="cifar10"):
    exp.run(c, str(tmp_path / "c"), progress=False)
  assert not os.path.exists(tmp_path / "c" / "checkpoints")


@needs_fmnist
def test_input_shape_error_names_expected_shape(tmp_path):
  c = _smoke()
  c.model.kwargs.features = (8, 16, 32)   # needs H, W multiples of 8; FMNIST is 28
  with pytest.raises(ValueError, match="28"):
    exp.run(c, str(tmp_path), progress=False)
  assert not os.path.exists(tmp_path / "checkpoints")


def test_data_parallel_step_matches_single_device():
  """The same step on a batch sharded over 4 CPU devices and on one device."""
  assert jax.device_count() >= 4
  config = get_config("cifar10,pgd_at,smoke")
  model = models.get_model("small_cnn", num_classes=10, mean=(0.5,) * 3,
                           std=(0.25,) * 3, features=(8, 16), hidden=32)
  opt, _ = clf.make_optimizer(config.train, 10)
  params, ms = jax.tree.map(np.array, clf.init_model(
      model, jax.random.key(0), (32, 32, 3)))   # host copies: steps donate
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (32, 32, 32, 3), dtype=np.uint8)
  y = rng.integers(0, 10, 32).astype(np.int32)
  data = types.SimpleNamespace(image_shape=(32, 32, 3), num_classes=10,
                               mean=(0.5,) * 3, std=(0.25,) * 3)
  loss = exp.with_augmentation(
      exp.build(config, model, data, jax.random.key(0)).loss_fn, config, 10)
  outs = []
  for devices in (jax.devices()[:1], jax.devices()[:4]):
    mesh = images.data_mesh(devices)
    fresh = jax.tree.map(jnp.array, (params, ms))
    state = jax.device_put(TrainState.create(fresh[0], opt, jax.random.key(1),
                                             fresh[1]),
                           jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    batch = next(images.train_batches(x, y, 32, seed=0, mesh=mesh))
    assert len(batch["image"].sharding.device_set) == len(devices)
    step = clf.jit_train_step(loss, opt)
    new, _ = step(state, batch, None)
    outs.append(jax.tree.map(np.asarray, new.params))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4,
                                                       atol=1e-6), *outs)


def test_nan_guard_stops_and_keeps_last_checkpoint(tmp_path):
  from tsjax.train.fit import fit
  import optax
  params = {"w": jnp.ones((3,), jnp.float32)}
  opt = optax.sgd(0.1)

  def loss_fn(p, ms, batch, key, ctx):
    l = jnp.sum(p["w"] * batch["x"])
    l = jnp.where(batch["poison"], jnp.nan, l)
    return l, ({"loss": l}, ms)

  step = clf.jit_train_step(loss_fn, opt)
  def batches(epoch):
    for i in range(4):
      yield {"x": jnp.ones((3,), jnp.float32),
             "poison": jnp.asarray(epoch == 1 and i == 2)}
  state = TrainState.create(params, opt, jax.random.key(0))
  with pytest.raises(FloatingPointError, match="epoch 1"):
    fit(workdir=str(tmp_path), state=state, step_fn=step, train_batches=batches,
        epochs=3, steps_per_epoch=4, progress=False, log_every=1)
  from tsjax.train import CheckpointStore
  store = CheckpointStore(str(tmp_path / "checkpoints"))
  assert store.latest_step() == 1            # epoch 1 (0-based) never saved
  w = store.restore(1, {"state": state, "ema": {}, "swa": {},
                        "best_metric": jnp.asarray(0.0, jnp.float32),
                        "best_epoch": jnp.asarray(0, jnp.int32)})["state"].params["w"]
  np.testing.assert_allclose(w, 1.0 - 0.1 * 4, rtol=1e-6)


def test_tensorboard_records_roundtrip(tmp_path):
  assert mw.crc32c(b"123456789") == 0xE3069283
  w = mw.TensorBoardWriter(str(tmp_path))
  w.write_scalars(7, {"a/b": 0.5, "nan": float("nan")})
  w.close()
  recs = list(mw.read_records(w.path))
  assert len(recs) == 2
  assert b"a/b" in recs[1] and b"nan" not in recs[1]
  import struct
  assert struct.pack("<f", 0.5) in recs[1]
  data = open(w.path, "rb").read()
  corrupted = data[:-1] + bytes([data[-1] ^ 1])
  open(tmp_path / "bad", "wb").write(corrupted)
  with pytest.raises(ValueError, match="corrupt"):
    list(mw.read_records(str(tmp_path / "bad")))


def test_bn_reestimate_matches_direct_computation():
  import flax.linen as nn

  class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      x = nn.Dense(3)(x)
      return nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)

  model = Tiny()
  x = jax.random.normal(jax.random.key(0), (12, 2), jnp.float32) * 3 + 1
  v = model.init(jax.random.key(1), x[:1])
  params, ms = v["params"], {"batch_stats": v["batch_stats"]}
  batches = [x[:4], x[4:8], x[8:]]
  new = clf.bn_reestimate(model, params, ms, batches)
  h = np.asarray(x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"],
                 np.float64)
  means = np.mean([h[i:i + 4].mean(0) for i in (0, 4, 8)], axis=0)
  vars_ = np.mean([h[i:i + 4].var(0) for i in (0, 4, 8)], axis=0)
  np.testing.assert_allclose(new["batch_stats"]["BatchNorm_0"]["mean"], means,
                             rtol=1e-5)
  np.testing.assert_allclose(new["batch_stats"]["BatchNorm_0"]["var"], vars_,
                             rtol=1e-4)


def test_swa_and_ema_updates():
  a = {"w": jnp.asarray([0.0, 3.0])}
  b = {"w": jnp.asarray([3.0, 0.0])}
  s = clf.swa_update(a, b, 1)   # average of two models
  np.testing.assert_allclose(s["w"], [1.5, 1.5])
  s = clf.swa_update(s, {"w": jnp.asarray([6.0, 6.0])}, 2)
  np.testing.assert_allclose(s["w"], [3.0, 3.0])
  e = clf.ema_update(a, b, 0.9)
  np.testing.assert_allclose(e["w"], [0.3, 2.7], rtol=1e-6)
