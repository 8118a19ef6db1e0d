"""Image models: shapes, parameter counts, batch norm, normalisation, hiddens, errors.

Random initialisation is compile-bound on XLA CPU (every distinct parameter
shape compiles its own threefry kernel, 1-2 s each on 2 cores), so most tests
take shapes from ``jax.eval_shape(model.init, ...)`` and fill them with NumPy
(``np_variables``); ``model.init`` itself runs once, on the small CNN.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tsjax.models import (DMWideResNet, MobileNetV2, PreActResNet18,
                          ResNet18, SmallCNN, WideResNet, check_input_shape,
                          get_model, max_pool_2x2)

F32 = jnp.float32
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)


def images(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).uniform(size=shape), F32)


def n_params(tree):
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


def abstract_variables(model, shape):
  return jax.eval_shape(model.init, jax.random.key(0),
                        jax.ShapeDtypeStruct(shape, F32))


def np_variables(model, shape, seed=0):
  """He-scaled NumPy parameters (no XLA compile); BN scale ~1, stats 0 / 1."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if "batch_stats" in name:
      value = np.zeros(leaf.shape) if "'mean'" in name else np.ones(leaf.shape)
    elif "'kernel'" in name:
      fan_in = int(np.prod(leaf.shape[:-1]))
      value = rng.normal(size=leaf.shape) * np.sqrt(2.0 / fan_in)
    elif "'scale'" in name:
      value = 1.0 + 0.1 * rng.normal(size=leaf.shape)
    else:  # biases
      value = 0.1 * rng.normal(size=leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill,
                                          abstract_variables(model, shape))


def jit_apply(model, **kwargs):
  """``jax.jit(model.apply)`` with the keyword options fixed (one compile
  instead of an eager XLA compile per op)."""
  return jax.jit(lambda v, x, *rngs: model.apply(
      v, x, **kwargs, **({"rngs": {"dropout": rngs[0]}} if rngs else {})))


# name, kwargs, PyTorch parameter count (10 classes), hidden shapes for 2x32x32x3.
FULL_SIZE = [
    ("small_cnn", {}, 545_098,
     [(2, 16, 16, 32), (2, 8, 8, 64), (2, 128)]),
    ("preact_resnet18", {}, 11_172_170,  # Rice et al. (final BN-ReLU)
     [(2, 32, 32, 64), (2, 16, 16, 128), (2, 8, 8, 256), (2, 4, 4, 512),
      (2, 512)]),
    ("preact_resnet18", {"final_bn": False}, 11_171_146,  # kuangliu
     [(2, 32, 32, 64), (2, 16, 16, 128), (2, 8, 8, 256), (2, 4, 4, 512),
      (2, 512)]),
    ("resnet18", {}, 11_173_962,
     [(2, 32, 32, 64), (2, 16, 16, 128), (2, 8, 8, 256), (2, 4, 4, 512),
      (2, 512)]),
    ("wrn34_10", {}, 46_160_474,
     [(2, 32, 32, 160), (2, 16, 16, 320), (2, 8, 8, 640), (2, 640)]),
    ("wrn28_10", {}, 36_479_194,
     [(2, 32, 32, 160), (2, 16, 16, 320), (2, 8, 8, 640), (2, 640)]),
    ("dm_wrn28_10", {}, 36_479_194,  # same layers as TRADES' WRN-28-10
     [(2, 32, 32, 160), (2, 16, 16, 320), (2, 8, 8, 640), (2, 640)]),
    ("dm_wrn70_16", {}, 266_796_506,
     [(2, 32, 32, 256), (2, 16, 16, 512), (2, 8, 8, 1024), (2, 1024)]),
    ("mobilenet_v2", {}, 2_296_922,
     [(2, 32, 32, 32), (2, 32, 32, 144), (2, 16, 16, 192), (2, 8, 8, 384),
      (2, 8, 8, 576), (2, 4, 4, 960), (2, 4, 4, 960), (2, 4, 4, 1280),
      (2, 1280)]),
]


@pytest.mark.parametrize("name,kwargs,count,hidden_shapes", FULL_SIZE,
                         ids=[f"{n}{'-' + '-'.join(k) if k else ''}"
                              for n, k, _, _ in FULL_SIZE])
def test_shapes_and_pytorch_parameter_counts(name, kwargs, count,
                                             hidden_shapes):
  model = get_model(name, **kwargs)
  variables = abstract_variables(model, (2, 32, 32, 3))
  assert n_params(variables["params"]) == count
  logits, hiddens = jax.eval_shape(
      lambda v, x: model.apply(v, x, return_hidden=True), variables,
      jax.ShapeDtypeStruct((2, 32, 32, 3), F32))
  assert logits.shape == (2, 10) and logits.dtype == F32
  assert isinstance(hiddens, tuple)
  assert [h.shape for h in hiddens] == hidden_shapes
  # 100 classes: only the classifier grows.
  wide = abstract_variables(get_model(name, num_classes=100, **kwargs),
                            (2, 32, 32, 3))
  feat = hidden_shapes[-1][-1]
  assert n_params(wide["params"]) == count + 90 * (feat + 1)


def test_small_cnn_init_and_fashion_mnist_shape():
  model = SmallCNN(num_classes=10, mean=(0.2860,), std=(0.3530,))
  x = images((2, 28, 28, 1))
  variables = jax.jit(model.init)(jax.random.key(0), x)
  assert set(variables) == {"params"}  # no batch norm
  assert variables["params"]["fc1"]["kernel"].shape == (7 * 7 * 64, 128)
  assert variables["params"]["conv1"]["kernel"].dtype == F32
  logits, hiddens = jit_apply(model, train=True, return_hidden=True)(
      variables, x)
  assert logits.shape == (2, 10) and logits.dtype == F32
  assert [h.shape for h in hiddens] == [(2, 14, 14, 32), (2, 7, 7, 64), (2, 128)]
  assert all(bool(jnp.all(h >= 0)) for h in hiddens)  # post-ReLU
  fc = variables["params"]["fc"]
  np.testing.assert_allclose(logits, hiddens[-1] @ fc["kernel"] + fc["bias"],
                             rtol=1e-5, atol=1e-5)


def test_parameter_paths_for_weight_conversion():
  p = abstract_variables(ResNet18(), (1, 32, 32, 3))["params"]
  assert p["stem_conv"]["kernel"].shape == (3, 3, 3, 64)
  assert set(p["stem_bn"]) == {"scale", "bias"}
  assert set(p["layer1_0"]) == {"conv1", "bn1", "conv2", "bn2"}
  assert p["layer2_0"]["shortcut_conv"]["kernel"].shape == (1, 1, 64, 128)
  assert "shortcut_bn" in p["layer2_0"] and "shortcut_conv" not in p["layer2_1"]
  assert p["fc"]["kernel"].shape == (512, 10)

  p = abstract_variables(PreActResNet18(), (1, 32, 32, 3))["params"]
  assert "stem_bn" not in p and "final_bn" in p
  assert set(p["layer3_0"]) == {"bn1", "conv1", "bn2", "conv2", "shortcut_conv"}
  assert "final_bn" not in abstract_variables(
      PreActResNet18(final_bn=False), (1, 32, 32, 3))["params"]

  v = abstract_variables(get_model("wrn34_10"), (1, 32, 32, 3))
  p = v["params"]
  assert p["stem_conv"]["kernel"].shape == (3, 3, 3, 16)
  assert p["block1_0"]["shortcut_conv"]["kernel"].shape == (1, 1, 16, 160)
  assert "shortcut_conv" not in p["block1_1"] and "block3_4" in p
  assert "block3_5" not in p and p["fc"]["kernel"].shape == (640, 10)
  assert v["batch_stats"]["final_bn"]["var"].shape == (640,)

  p = abstract_variables(MobileNetV2(), (1, 32, 32, 3))["params"]
  assert sorted(k for k in p if k.startswith("layers_")) == sorted(
      f"layers_{j}" for j in range(17))
  assert p["layers_0"]["shortcut_conv"]["kernel"].shape == (1, 1, 32, 16)
  assert p["layers_1"]["conv2"]["kernel"].shape == (3, 3, 1, 96)  # depthwise
  assert "shortcut_conv" not in p["layers_2"]  # identity shortcut
  assert "shortcut_conv" not in p["layers_3"]  # stride 2: no residual
  assert p["head_conv"]["kernel"].shape == (1, 1, 320, 1280)


@pytest.mark.parametrize("name", ["preact_resnet18"])
def test_full_size_forward_pass(name):
  model = get_model(name, mean=CIFAR10_MEAN, std=CIFAR10_STD)
  x = images((2, 32, 32, 3))
  variables = np_variables(model, x.shape)
  logits, hiddens = jit_apply(model, return_hidden=True)(variables, x)
  assert logits.shape == (2, 10) and logits.dtype == F32
  assert bool(jnp.all(jnp.isfinite(logits)))
  np.testing.assert_allclose(hiddens[-1], hiddens[-2].mean(axis=(1, 2)),
                             rtol=1e-5, atol=1e-5)
  fc = variables["params"]["fc"]
  np.testing.assert_allclose(logits, hiddens[-1] @ fc["kernel"] + fc["bias"],
                             rtol=1e-4, atol=1e-4)
  assert all(float(h.min()) >= 0 for h in hiddens)  # post-activation


# Small variants (same code paths) for the behaviour tests, on 8x8 inputs.
SMALL = {
    "preact_resnet18": lambda **kw: PreActResNet18(width=4, **kw),
    "resnet18": lambda **kw: ResNet18(width=4, **kw),
    "wide_resnet": lambda **kw: WideResNet(depth=10, widen_factor=1, **kw),
    "mobilenet_v2": lambda **kw: MobileNetV2(**kw),
    "dm_wide_resnet": lambda **kw: DMWideResNet(depth=10, widen_factor=1,
                                                **kw),
}
X8 = images((4, 8, 8, 3), seed=3)


@functools.cache
def small_variables(name):
  return np_variables(SMALL[name](), X8.shape)


@functools.cache
def small_train(name):
  """Jitted train-mode apply, shared by the tests (compiled once per model)."""
  return jit_apply(SMALL[name](), train=True, mutable=("batch_stats",))


@functools.cache
def small_eval(name):
  """Jitted eval-mode apply returning hiddens and every submodule's output."""
  return jit_apply(SMALL[name](), return_hidden=True,
                   capture_intermediates=True,
                   mutable=("batch_stats", "intermediates"))


@pytest.mark.parametrize("name", sorted(SMALL))
def test_train_mode_updates_batch_stats_and_eval_mode_does_not(name):
  variables = small_variables(name)
  stats = variables["batch_stats"]
  train_out, new = small_train(name)(variables, X8)
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), stats,
                         new["batch_stats"])
  assert all(jax.tree.leaves(changed))  # every BN layer updated
  (full, _), state = small_eval(name)(variables, X8)
  jax.tree.map(np.testing.assert_array_equal, stats, state["batch_stats"])
  # Eval mode uses running statistics: examples do not interact.
  other = X8.at[1:].set(images((3, 8, 8, 3), seed=4))
  (part, _), _ = small_eval(name)(variables, other)
  np.testing.assert_allclose(part[:1], full[:1], rtol=1e-5, atol=1e-5)
  assert not np.allclose(part[1:], full[1:])
  # Train mode normalises with batch statistics.
  assert not np.allclose(train_out, full)


def test_batch_norm_momentum_matches_pytorch():
  """running = 0.9 running + 0.1 batch (PyTorch momentum=0.1; biased var)."""
  variables = small_variables("resnet18")
  _, new = small_train("resnet18")(variables, X8)
  kernel = variables["params"]["stem_conv"]["kernel"]
  h = jax.lax.conv_general_dilated(X8, kernel, (1, 1), ((1, 1), (1, 1)),
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  stem = new["batch_stats"]["stem_bn"]
  np.testing.assert_allclose(stem["mean"], 0.1 * h.mean(axis=(0, 1, 2)),
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(stem["var"], 0.9 + 0.1 * h.var(axis=(0, 1, 2)),
                             rtol=1e-4, atol=1e-6)


def test_dm_wide_resnet_batch_norm_momentum_and_normalisation():
  """DM's decay 0.99 (running = 0.99 running + 0.01 batch), eps 1e-5, and
  its default CIFAR-10 mean/std applied inside the model."""
  variables = small_variables("dm_wide_resnet")
  _, new = small_train("dm_wide_resnet")(variables, X8)
  mean = jnp.asarray((0.4914, 0.4822, 0.4465), F32)
  std = jnp.asarray((0.2471, 0.2435, 0.2616), F32)
  kernel = variables["params"]["stem_conv"]["kernel"]
  h = jax.lax.conv_general_dilated((X8 - mean) / std, kernel, (1, 1),
                                   ((1, 1), (1, 1)),
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  bn = new["batch_stats"]["block1_0"]["bn1"]
  np.testing.assert_allclose(bn["mean"], 0.01 * h.mean(axis=(0, 1, 2)),
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(bn["var"], 0.99 + 0.01 * h.var(axis=(0, 1, 2)),
                             rtol=1e-4, atol=1e-6)
  # bn_momentum=0.9 is PyTorch's default (RobustBench's port).
  _, new = jit_apply(DMWideResNet(depth=10, widen_factor=1, bn_momentum=0.9),
                     train=True, mutable=("batch_stats",))(variables, X8)
  np.testing.assert_allclose(new["batch_stats"]["block1_0"]["bn1"]["mean"],
                             0.1 * h.mean(axis=(0, 1, 2)), rtol=1e-4,
                             atol=1e-6)
  # The default normalisation == identity model fed normalised images.
  plain = DMWideResNet(depth=10, widen_factor=1, mean=(0.0,), std=(1.0,))
  (logits, _), _ = small_eval("dm_wide_resnet")(variables, X8)
  np.testing.assert_allclose(jax.jit(plain.apply)(variables, (X8 - mean) / std),
                             logits, rtol=1e-5, atol=1e-5)


def test_dm_wide_resnet_padding_and_input_rule():
  """``padding`` zero-pads the [0, 1] input before normalisation; sizes after
  padding must be multiples of 4 (DM's stride-2 blocks need even maps)."""
  model = DMWideResNet(depth=10, widen_factor=1, padding=2)
  variables = small_variables("dm_wide_resnet")  # padding adds no variables
  x = images((2, 4, 4, 3), seed=5)
  padded = jnp.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
  (want, _), _ = small_eval("dm_wide_resnet")(variables, padded)
  np.testing.assert_allclose(jax.jit(model.apply)(variables, x), want,
                             rtol=1e-5, atol=1e-5)
  check_input_shape(model, (28, 28, 3))
  with pytest.raises(ValueError, match="padding=2.*multiples of 4.*34x34x3"):
    check_input_shape(model, (30, 30, 3))
  with pytest.raises(ValueError, match="multiples of 4.*30x30x3"):
    check_input_shape("dm_wrn28_10", (30, 30, 3))
  with pytest.raises(ValueError, match="HxWx3.*32x32x1"):
    check_input_shape("dm_wrn70_16", (32, 32, 1))
  check_input_shape("dm_wrn70_16", (32, 32, 1), mean=(0.5,), std=(0.5,))


def test_wide_resnet_dropout_only_in_train_mode():
  model = WideResNet(depth=10, widen_factor=1, dropout=0.3)
  variables = small_variables("wide_resnet")  # dropout adds no variables
  train_fn = jit_apply(model, train=True, mutable=("batch_stats",))

  def train(seed):
    return train_fn(variables, X8, jax.random.key(seed))[0]

  assert not np.allclose(train(0), train(1))
  np.testing.assert_array_equal(train(0), train(0))
  # Without train=True it is the dropout-free network (no rng needed).
  dropout_free, _ = small_train("wide_resnet")(variables, X8)
  assert not np.allclose(train(0), dropout_free)
  with pytest.raises(Exception, match="dropout"):
    train_fn(variables, X8)  # train mode without a dropout rng
  assert jax.eval_shape(model.apply, variables, X8).shape == (4, 10)


@pytest.mark.parametrize("name", ["small_cnn", "wide_resnet"])
def test_normalisation_inside_the_model(name):
  build = {"small_cnn": SmallCNN, **SMALL}[name]
  normed = build(mean=CIFAR10_MEAN, std=CIFAR10_STD)
  plain = build()
  x = images((2, 8, 8, 3))
  variables = np_variables(plain, x.shape)  # same tree for both
  mean, std = jnp.asarray(CIFAR10_MEAN, F32), jnp.asarray(CIFAR10_STD, F32)
  w = jnp.arange(10.0, dtype=F32)

  def logits_and_grad(m, inputs):
    def f(x):
      logits = m.apply(variables, x)
      return logits.sum(axis=0) @ w, logits
    (_, logits), g = jax.jit(jax.value_and_grad(f, has_aux=True))(inputs)
    return logits, g

  logits, g = logits_and_grad(normed, x)
  logits_plain, g_plain = logits_and_grad(plain, (x - mean) / std)
  np.testing.assert_allclose(logits, logits_plain, rtol=1e-5, atol=1e-5)
  # Gradients w.r.t. pixels flow through the normalisation (chain rule 1/std).
  np.testing.assert_allclose(g, g_plain / std, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_reshape_max_pool_equals_nn_max_pool(dtype):
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 8, 6, 3)), dtype)
  w = jnp.asarray(np.random.default_rng(2).normal(size=(2, 4, 3, 3)), dtype)
  ref = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))
  np.testing.assert_array_equal(max_pool_2x2(x), ref(x))
  assert max_pool_2x2(x).dtype == dtype
  grad = jax.grad(lambda x: jnp.sum(max_pool_2x2(x) * w))(x)
  np.testing.assert_array_equal(grad, jax.grad(lambda x: jnp.sum(ref(x) * w))(x))
  with pytest.raises(ValueError, match="even"):
    max_pool_2x2(x[:, :7])


@pytest.mark.parametrize("name", sorted(SMALL))
def test_return_hidden_entries_are_the_documented_activations(name):
  variables = small_variables(name)
  (logits, hiddens), state = small_eval(name)(variables, X8)
  inter = state["intermediates"]
  assert isinstance(hiddens, tuple)
  # Last entry: pooled features of the previous map; logits = fc(last entry).
  np.testing.assert_allclose(hiddens[-1], hiddens[-2].mean(axis=(1, 2)),
                             rtol=1e-5, atol=1e-6)
  fc = variables["params"]["fc"]
  np.testing.assert_allclose(logits, hiddens[-1] @ fc["kernel"] + fc["bias"],
                             rtol=1e-5, atol=1e-5)
  if name == "dm_wide_resnet":  # post-Swish: >= min x*sigmoid(x) = -0.2785
    assert all(float(h.min()) >= -0.2785 for h in hiddens)
    assert any(float(h.min()) < 0 for h in hiddens)
  else:
    assert all(float(h.min()) >= 0 for h in hiddens)  # post-activation
  if name == "resnet18":  # stage outputs themselves (post-ReLU)
    assert len(hiddens) == 5
    for s in range(4):
      np.testing.assert_array_equal(hiddens[s],
                                    inter[f"layer{s + 1}_1"]["__call__"][0])
  elif name in ("preact_resnet18", "wide_resnet", "dm_wide_resnet"):
    # A stage's entry is the next stage's first relu(bn1(.)) of its output.
    prefix, stages = (("layer", 4) if name == "preact_resnet18"
                      else ("block", 3))
    assert len(hiddens) == stages + 1
    for s in range(stages - 1):
      _, act = inter[f"{prefix}{s + 2}_0"]["__call__"][0]
      np.testing.assert_array_equal(hiddens[s], act)
  else:  # MobileNetV2: last block of each stage, post-ReLU6 depthwise output
    assert len(hiddens) == 9
    for s, j in enumerate([0, 2, 5, 9, 12, 15, 16]):
      _, dw = inter[f"layers_{j}"]["__call__"][0]
      np.testing.assert_array_equal(hiddens[s], dw)
    assert all(float(h.max()) <= 6.0 for h in hiddens[:-1])  # ReLU6


def test_strided_convs_match_pytorch_sizes_on_odd_inputs():
  # PyTorch: 3x3/s2/p1 and 1x1/s2/p0 both map 9 -> 5 -> 3 -> 2.
  model = ResNet18(width=4)
  shape = (1, 9, 11, 3)
  _, hiddens = jax.eval_shape(
      lambda v, x: model.apply(v, x, return_hidden=True),
      abstract_variables(model, shape), jax.ShapeDtypeStruct(shape, F32))
  assert [h.shape[1:3] for h in hiddens[:4]] == [(9, 11), (5, 6), (3, 3), (2, 2)]


def test_unknown_names_and_bad_options_raise_helpful_errors():
  with pytest.raises(ValueError, match="known models.*'resnet18'"):
    get_model("resnet19")
  with pytest.raises(ValueError, match="no option.*'widht'.*width"):
    get_model("resnet18", widht=32)
  with pytest.raises(ValueError, match="fixes depth"):
    get_model("wrn34_10", depth=28)
  with pytest.raises(ValueError, match="6n \\+ 4"):
    get_model("wide_resnet", depth=32, widen_factor=10)
  with pytest.raises(ValueError, match="mean has 2 entries but std has 3"):
    SmallCNN(mean=(0.1, 0.2), std=(1.0, 1.0, 1.0))
  with pytest.raises(ValueError, match="activation"):
    MobileNetV2(activation="gelu")
  with pytest.raises(ValueError, match="fixes depth.*'dm_wide_resnet'"):
    get_model("dm_wrn28_10", depth=34)
  with pytest.raises(ValueError, match="activation must be one of"):
    get_model("dm_wrn70_16", activation="gelu")
  with pytest.raises(ValueError, match="6n \\+ 4"):
    DMWideResNet(depth=30)
  with pytest.raises(ValueError, match="padding"):
    DMWideResNet(padding=-1)
  with pytest.raises(ValueError, match="no option.*'width'.*widen_factor"):
    get_model("dm_wide_resnet", width=10)
  assert get_model("dm_wrn106_16", num_classes=100).depth == 106
  assert isinstance(get_model("wide_resnet", depth=16, widen_factor=4),
                    WideResNet)
  assert get_model("mlp", widths=(4,), outputs=1).widths == (4,)


def test_bad_input_shapes_raise_before_tracing():
  with pytest.raises(ValueError, match="HxWxC.*multiples of 4.*30x30x1"):
    check_input_shape("small_cnn", (30, 30, 1))
  with pytest.raises(ValueError, match="at least 8.*4x4x3"):
    check_input_shape("resnet18", (2, 4, 4, 3))
  with pytest.raises(ValueError, match="HxWx3.*32x32x1"):
    check_input_shape("preact_resnet18", (32, 32, 1), mean=CIFAR10_MEAN,
                      std=CIFAR10_STD)
  with pytest.raises(ValueError, match="at least 4"):
    check_input_shape("wrn34_10", (3, 3, 3))
  with pytest.raises(ValueError, match="HxWxC"):
    check_input_shape(MobileNetV2(), (32, 32))
  with pytest.raises(ValueError, match=r"\(N, d\)"):
    check_input_shape("mlp", (28, 28, 1))
  for name, shape in [("small_cnn", (28, 28, 1)), ("small_cnn", (2, 32, 32, 3)),
                      ("resnet18", (32, 32, 3)), ("wrn28_10", (4, 4, 3)),
                      ("mobilenet_v2", (8, 8, 1)), ("mlp", (5, 3))]:
    check_input_shape(name, shape)
  # The model itself runs the same check when traced, plus rank and dtype.
  model = SmallCNN()
  with pytest.raises(ValueError, match="multiples of 4"):
    jax.eval_shape(model.init, jax.random.key(0),
                   jax.ShapeDtypeStruct((2, 30, 30, 1), F32))
  with pytest.raises(ValueError, match="batch of NHWC"):
    jax.eval_shape(model.init, jax.random.key(0),
                   jax.ShapeDtypeStruct((28, 28, 1), F32))
  with pytest.raises(ValueError, match="float images"):
    jax.eval_shape(model.init, jax.random.key(0),
                   jax.ShapeDtypeStruct((2, 28, 28, 1), jnp.uint8))
