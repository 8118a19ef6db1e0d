"""PyTorch state_dict -> Flax conversion (``tsjax.models.torch_convert``).

The PyTorch reference networks (tests/torch_nets.py) are written with the key
names of the checkpoints the converter targets: kuangliu / RobustBench ``ResNet18``,
Rice et al. / RobustBench ``PreActResNet18`` (final ``bn``; kuangliu's without),
RobustBench / TRADES ``WideResNet`` (``block{g}.layer.{i}``, ``convShortcut``,
optional unused ``sub_block1``), RobustBench's DeepMind ``DMWideResNet``
(``layer.{g}.block.{i}``, Swish, asymmetric stride-2 padding, ``mean`` /
``std`` buffers) and the tsjax small CNN. They are randomly initialised with random BN
affine parameters *and* running statistics, converted, and their eval-mode
logits compared with the tsjax models' at 1e-4 (float32). The equivalence
tests use narrow variants (same code paths, same key names) to stay fast on
CPU; the full-size nets are checked key-by-key and shape-by-shape (torch
``meta`` tensors: no memory, no compute) and, under ``-m slow``, end to end.
"""

import hashlib
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
tnn = torch.nn

from tsjax.models import (CIFAR10_MEAN, CIFAR10_STD,  # noqa: E402
                          CIFAR100_MEAN, CIFAR100_STD,
                          PreActResNet18, compute_sha256, convert_state_dict,
                          convert_torch_checkpoint, get_model,
                          load_torch_state_dict, save_state_dict_npz,
                          torch_state_dict_shapes)

from torch_nets import (TorchDMPreActResNet, TorchDMWideResNet,  # noqa: E402
                        TorchResNet18, TorchSmallCNN, TorchWideResNet)
from tsjax.models import torch_convert  # noqa: E402

F32 = jnp.float32


def randomise(net, seed=0):
  """Random BN affine parameters and running statistics (and biases), so a
  BN layer mapped to the wrong place, or eps / mean / var mixed up, shows."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, tnn.BatchNorm2d):
        c = m.num_features
        m.weight.copy_(0.5 + torch.rand(c, generator=g))
        m.bias.copy_(0.2 * torch.randn(c, generator=g))
        m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
        m.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=g))
        m.num_batches_tracked.fill_(123)
      elif isinstance(m, (tnn.Conv2d, tnn.Linear)):
        fan_in = m.weight[0].numel()
        m.weight.copy_(torch.randn(m.weight.shape, generator=g)
                       * (2.0 / fan_in) ** 0.5)
        if m.bias is not None:
          m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
  return net.eval()


def nhwc_images(shape, seed=0):
  return np.random.default_rng(seed).uniform(size=shape).astype(np.float32)


def torch_logits(net, x_nhwc):
  with torch.no_grad():
    return net(torch.from_numpy(np.ascontiguousarray(
        x_nhwc.transpose(0, 3, 1, 2)))).numpy()


def flax_logits(model, params, state, x):
  return np.asarray(jax.jit(model.apply)({"params": params, **state},
                                         jnp.asarray(x, F32)))


def assert_logits_close(got, want):
  assert np.abs(want).max() > 0.1  # non-trivial logits
  np.testing.assert_allclose(got, want, rtol=1e-4,
                             atol=1e-4 * max(1.0, np.abs(want).max()))


# ------------------------------------------------------ logits equivalence
# id: (torch net factory, registry name, model kwargs, NHWC input shape)
CASES = {
    "small_cnn": (lambda: TorchSmallCNN(), "small_cnn", {}, (3, 32, 32, 3)),
    # Non-square 1-channel input: fc1's (c, h, w) -> (h, w, c) permutation
    # needs H != W to be tested properly; 3 classes.
    "small_cnn-24x32x1": (
        lambda: TorchSmallCNN(3, 1, (24, 32), (8, 16), 32), "small_cnn",
        {"num_classes": 3, "features": (8, 16), "hidden": 32},
        (3, 24, 32, 1)),
    "resnet18": (lambda: TorchResNet18(width=16), "resnet18", {"width": 16},
                 (3, 32, 32, 3)),
    "preact_resnet18": (lambda: TorchResNet18(width=16, preact=True),
                        "preact_resnet18", {"width": 16}, (3, 32, 32, 3)),
    "preact_resnet18-no-final-bn": (
        lambda: TorchResNet18(width=16, preact=True, final_bn=False),
        "preact_resnet18", {"width": 16, "final_bn": False}, (3, 32, 32, 3)),
    # RobustBench's PreActBlock: the 1x1 shortcut from the raw input
    # (resnet.py:121-144), with and without bn_before_fc (= final_bn).
    "preact_resnet18-input-shortcut": (
        lambda: TorchResNet18(width=16, preact=True, final_bn=False,
                              shortcut_from="input"),
        "preact_resnet18", {"width": 16, "final_bn": False,
                            "shortcut_from": "input"}, (3, 32, 32, 3)),
    "preact_resnet18-input-shortcut-final-bn": (
        lambda: TorchResNet18(width=16, preact=True, final_bn=True,
                              shortcut_from="input"),
        "preact_resnet18", {"width": 16, "shortcut_from": "input"},
        (3, 32, 32, 3)),
    # DeepMind's PreAct ResNet-18 (RobustBench DMPreActResNet), Swish and
    # ReLU, its CIFAR-10 normalisation (not in the state_dict).
    "dm_preact_resnet18-swish": (
        lambda: TorchDMPreActResNet(10, "swish"), "dm_preact_resnet18",
        {"activation": "swish"}, (3, 32, 32, 3)),
    "dm_preact_resnet18-relu": (
        lambda: TorchDMPreActResNet(10, "relu"), "dm_preact_resnet18",
        {"activation": "relu"}, (3, 32, 32, 3)),
    # n = 2 blocks per group (identity and projection shortcuts), TRADES'
    # unused sub_block1 present (dropped by the converter), 100 classes.
    "wide_resnet-16-2": (
        lambda: TorchWideResNet(16, 2, 100, sub_block1=True), "wide_resnet",
        {"depth": 16, "widen_factor": 2, "num_classes": 100},
        (3, 32, 32, 3)),
    # DeepMind WRN, n = 2 (stride-1 and stride-2 hand padding, identity and
    # projection shortcuts), Swish, CIFAR-100 mean/std buffers, 100 classes.
    "dm_wide_resnet-16-2": (
        lambda: TorchDMWideResNet(100, 16, 2, "swish", CIFAR100_MEAN,
                                  CIFAR100_STD),
        "dm_wide_resnet", {"depth": 16, "widen_factor": 2, "num_classes": 100,
                           "mean": CIFAR100_MEAN, "std": CIFAR100_STD},
        (3, 32, 32, 3)),
    # Width 1: the first block keeps 16 channels (identity shortcut at the
    # first block); ReLU; 28x28 input padded by 2 inside the net.
    "dm_wide_resnet-10-1-relu-pad2": (
        lambda: TorchDMWideResNet(10, 10, 1, "relu", padding=2),
        "dm_wide_resnet", {"depth": 10, "widen_factor": 1,
                           "activation": "relu", "padding": 2},
        (3, 28, 28, 3)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_converted_logits_match_pytorch(case):
  make, name, kwargs, shape = CASES[case]
  net = randomise(make(), seed=len(case))
  x = nhwc_images(shape, seed=1)
  want = torch_logits(net, x)
  params, state = convert_state_dict(net.state_dict(), name,
                                     input_shape=shape[1:], **kwargs)
  model = get_model(name, **kwargs)
  assert set(state) == (set() if name == "small_cnn" else {"batch_stats"})
  assert_logits_close(flax_logits(model, params, state, x), want)


def test_small_cnn_input_shape_inferred_for_square_inputs():
  net = randomise(TorchSmallCNN(in_channels=1, hw=(28, 28)))
  x = nhwc_images((2, 28, 28, 1))
  params, state = convert_state_dict(net.state_dict(), "small_cnn")
  assert params["fc1"]["kernel"].shape == (7 * 7 * 64, 128)
  assert_logits_close(flax_logits(get_model("small_cnn"), params, state, x),
                      torch_logits(net, x))


def test_normalisation_is_the_models_mean_std():
  """A PyTorch net fed Normalize(mean, std)-ed images == the converted tsjax
  model built with that mean/std and fed [0, 1] images."""
  mean, std = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
  net = randomise(TorchSmallCNN(), seed=3)
  x = nhwc_images((2, 32, 32, 3), seed=2)
  want = torch_logits(net, (x - np.float32(mean)) / np.float32(std))
  params, state = convert_state_dict(net.state_dict(), "small_cnn",
                                     mean=mean, std=std)
  model = get_model("small_cnn", mean=mean, std=std)
  assert_logits_close(flax_logits(model, params, state, x), want)


# ---------------------------------------------- full-size names and shapes
def meta_state_shapes(make):
  with torch.device("meta"):
    net = make()
  return {k: tuple(v.shape) for k, v in net.state_dict().items()
          if not k.endswith("num_batches_tracked")}


FULL = {
    "resnet18": (lambda: TorchResNet18(), {}, 11_173_962),
    "preact_resnet18": (lambda: TorchResNet18(preact=True), {}, 11_172_170),
    "preact_resnet18-no-final-bn": (
        lambda: TorchResNet18(preact=True, final_bn=False),
        {"final_bn": False}, 11_171_146),
    "wrn34_10": (lambda: TorchWideResNet(34, 10), {}, 46_160_474),
    "wrn28_10": (lambda: TorchWideResNet(28, 10), {}, 36_479_194),
    "small_cnn": (lambda: TorchSmallCNN(), {}, 545_098),
    "dm_wrn28_10": (lambda: TorchDMWideResNet(depth=28, width=10), {},
                    36_479_194),
    "dm_wrn70_16": (lambda: TorchDMWideResNet(depth=70, width=16), {},
                    266_796_506),
    "dm_wrn106_16": (lambda: TorchDMWideResNet(depth=106, width=16), {},
                     415_475_162),
}


@pytest.mark.parametrize("case", sorted(FULL))
def test_full_size_key_names_and_shapes(case):
  make, kwargs, count = FULL[case]
  want = meta_state_shapes(make)
  got = torch_state_dict_shapes(case.split("-")[0], **kwargs)
  assert got == want
  with torch.device("meta"):
    n_torch = sum(p.numel() for p in make().parameters())
  assert n_torch == count


@pytest.mark.parametrize("case", [
    pytest.param("resnet18", marks=pytest.mark.slow),
    "preact_resnet18",  # ~4 s on 2 CPU cores
    pytest.param("wrn34_10", marks=pytest.mark.slow),  # ~11 s
    "dm_wrn28_10",  # ~4 s
    pytest.param("dm_wrn70_16", marks=pytest.mark.slow),  # ~30 s
])
def test_full_size_logits_match_pytorch(case):
  make, kwargs, _ = FULL[case]
  net = randomise(make(), seed=7)
  x = nhwc_images((2, 32, 32, 3), seed=5)
  params, state = convert_state_dict(net.state_dict(), case, **kwargs)
  assert_logits_close(flax_logits(get_model(case, **kwargs), params, state, x),
                      torch_logits(net, x))


# ------------------------------------------------------------------ errors
@pytest.fixture(scope="module")
def preact_sd():
  """State dict of a narrow PreActResNet18 (width 8), as numpy arrays."""
  net = randomise(TorchResNet18(width=8, preact=True), seed=11)
  return {k: v.numpy().copy() for k, v in net.state_dict().items()}


def test_missing_key_error_names_model_count_and_key(preact_sd):
  sd = dict(preact_sd)
  del sd["layer2.0.shortcut.0.weight"], sd["bn.running_var"]
  with pytest.raises(ValueError) as e:
    convert_state_dict(sd, "preact_resnet18", width=8)
  msg = str(e.value)
  n = sum(int(np.prod(s)) for k, s in torch_state_dict_shapes(
      "preact_resnet18", width=8).items() if "running" not in k)
  assert "'preact_resnet18' model PreActResNet18(" in msg and "width=8" in msg
  assert f"{n:,} parameters" in msg
  assert "2 missing key(s): [bn.running_var, layer2.0.shortcut.0.weight]" in msg
  assert "unexpected" not in msg


def test_unexpected_key_error_and_hints(preact_sd):
  sd = dict(preact_sd, **{"normalize.mean": np.zeros(3, np.float32)})
  with pytest.raises(ValueError, match=r"1 unexpected key\(s\): "
                     r"\[normalize.mean\]") as e:
    convert_state_dict(sd, "preact_resnet18", width=8)
  assert "missing" not in str(e.value)
  # ... which `ignore` drops:
  params, _ = convert_state_dict(sd, "preact_resnet18", width=8,
                                 ignore=("normalize.",))
  assert params["fc"]["kernel"].shape == (64, 10)
  # A checkpoint with the final BN loaded without it (and vice versa).
  with pytest.raises(ValueError, match="use final_bn=True"):
    convert_state_dict(preact_sd, "preact_resnet18", width=8, final_bn=False)
  no_bn = {k: v for k, v in preact_sd.items() if not k.startswith("bn.")}
  with pytest.raises(ValueError, match="use final_bn=False"):
    convert_state_dict(no_bn, "preact_resnet18", width=8)
  # The wrong architecture.
  with pytest.raises(ValueError, match="try 'resnet18'") as e:
    convert_state_dict(meta_free(TorchResNet18(width=8)), "preact_resnet18",
                       width=8)
  assert "unexpected key(s)" in str(e.value)
  assert "missing key(s)" in str(e.value)
  with pytest.raises(ValueError, match="are a ResNet's"):
    convert_state_dict(preact_sd, "wide_resnet", depth=10, widen_factor=1)


def meta_free(net):
  return {k: v.numpy() for k, v in net.state_dict().items()}


def test_shape_mismatch_error_gives_both_shapes(preact_sd):
  with pytest.raises(ValueError) as e:
    convert_state_dict(preact_sd, "preact_resnet18", width=8, num_classes=100)
  msg = str(e.value)
  assert "2 shape mismatch(es)" in msg
  assert "linear.weight: checkpoint (10, 64) vs expected (100, 64)" in msg
  assert "linear.bias: checkpoint (10,) vs expected (100,)" in msg
  assert "pass num_classes=10" in msg
  with pytest.raises(ValueError, match=r"pass width=8") as e:
    convert_state_dict(preact_sd, "preact_resnet18")
  assert "conv1.weight: checkpoint (8, 3, 3, 3) vs expected (64, 3, 3, 3)" in (
      str(e.value))
  wrn = meta_free(TorchWideResNet(16, 1))
  with pytest.raises(ValueError, match="looks like WideResNet-16-1"):
    convert_state_dict(wrn, "wrn34_10")


def test_other_errors():
  with pytest.raises(ValueError, match="no PyTorch converter for mobilenet_v2"):
    convert_state_dict({}, "mobilenet_v2")
  with pytest.raises(ValueError, match="unknown model"):
    convert_state_dict({}, "resnet50")
  with pytest.raises(ValueError, match="only used with a registry name"):
    convert_state_dict({}, PreActResNet18(), width=8)
  with pytest.raises(ValueError, match="is a str, not a tensor"):
    convert_state_dict({"conv1.weight": "x"}, "small_cnn")
  with pytest.raises(ValueError, match="expected a state_dict"):
    convert_state_dict([1, 2], "small_cnn")


# -------------------------------------------------------- files and prefixes
def test_sha256_check(tmp_path):
  net = TorchSmallCNN(hw=(8, 8), features=(4, 8), hidden=8)
  path = tmp_path / "net.pt"
  torch.save(net.state_dict(), path)
  digest = hashlib.sha256(path.read_bytes()).hexdigest()
  assert compute_sha256(path) == digest
  sd = load_torch_state_dict(path, sha256=digest.upper())
  assert set(sd) == set(net.state_dict())
  assert all(isinstance(v, np.ndarray) for v in sd.values())
  load_torch_state_dict(path, sha256=digest[:10])  # torch.hub-style prefix
  wrong = "0" * 64
  with pytest.raises(ValueError) as e:
    load_torch_state_dict(path, sha256=wrong)
  assert f"expected {wrong}, got {digest}" in str(e.value)
  assert "SHA-256 mismatch" in str(e.value)
  with pytest.raises(ValueError, match="hex digest"):
    load_torch_state_dict(path, sha256="not-a-digest")
  with pytest.raises(FileNotFoundError):
    load_torch_state_dict(tmp_path / "missing.pt")


def test_containers_and_module_prefix_are_unwrapped(tmp_path):
  net = randomise(TorchSmallCNN(hw=(8, 8), features=(4, 8), hidden=8), seed=5)
  kwargs = dict(features=(4, 8), hidden=8)
  ref_params, _ = convert_state_dict(net.state_dict(), "small_cnn", **kwargs)
  # nn.DataParallel keys in a training checkpoint dict.
  wrapped = {"epoch": 3, "optimizer": {"lr": 0.1},
             "model_state_dict": tnn.DataParallel(net).state_dict()}
  assert all(k.startswith("module.")
             for k in wrapped["model_state_dict"])
  path = tmp_path / "ckpt.pth"
  torch.save(wrapped, path)
  sd = load_torch_state_dict(path)
  assert set(sd) == set(net.state_dict())
  model, params, state = convert_torch_checkpoint(
      path, "small_cnn", sha256=compute_sha256(path), **kwargs)
  assert model == get_model("small_cnn", **kwargs) and state == {}
  jax.tree.map(np.testing.assert_array_equal, params, ref_params)
  # In memory, nested containers and doubled prefixes.
  nested = {"net": {"state_dict": {f"module.module.{k}": v for k, v in
                                   net.state_dict().items()}}}
  params, _ = convert_state_dict(nested, "small_cnn", **kwargs)
  jax.tree.map(np.testing.assert_array_equal, params, ref_params)
  # Extra prefixes on request.
  prefixed = {f"model.{k}": v for k, v in net.state_dict().items()}
  with pytest.raises(ValueError, match="wrapper prefix"):
    convert_state_dict(prefixed, "small_cnn", **kwargs)
  params, _ = convert_state_dict(prefixed, "small_cnn",
                                 strip_prefixes=("model.",), **kwargs)
  jax.tree.map(np.testing.assert_array_equal, params, ref_params)


def test_npz_round_trip_without_torch(tmp_path, monkeypatch):
  net = randomise(TorchResNet18(width=4, preact=True), seed=9)
  ref = convert_state_dict(net.state_dict(), "preact_resnet18", width=4)
  path = tmp_path / "net.npz"
  save_state_dict_npz({"state_dict": net.state_dict()}, path)
  torch_path = tmp_path / "net.pt"
  torch.save(net.state_dict(), torch_path)
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails
  sd = load_torch_state_dict(path, sha256=compute_sha256(path))
  assert set(sd) == set(net.state_dict())  # num_batches_tracked kept ...
  got = convert_state_dict(sd, "preact_resnet18", width=4)  # ... and ignored
  jax.tree.map(np.testing.assert_array_equal, got, ref)
  assert all(a.dtype == F32 for a in jax.tree.leaves(got))
  with pytest.raises(ImportError, match="pip install torch"):
    load_torch_state_dict(torch_path)


def test_tsjax_models_import_does_not_import_torch():
  code = ("import sys, tsjax.models, tsjax.models.torch_convert; "
          "assert 'torch' not in sys.modules")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


# ------------------------------------------------ DeepMind WRN specifics
@pytest.fixture(scope="module")
def dm_sd():
  """State dict of a DeepMind WRN-10-1 (CIFAR-10 mean/std buffers), numpy."""
  net = randomise(TorchDMWideResNet(10, 10, 1), seed=13)
  return {k: v.numpy().copy() for k, v in net.state_dict().items()}


def test_dm_key_errors(dm_sd):
  kw = dict(depth=10, widen_factor=1)
  sd = dict(dm_sd)
  del sd["layer.1.block.0.shortcut.weight"], sd["batchnorm.running_var"]
  sd["layer.0.block.0.shortcut.weight"] = np.zeros((16, 16, 1, 1), np.float32)
  with pytest.raises(ValueError) as e:
    convert_state_dict(sd, "dm_wide_resnet", **kw)
  msg = str(e.value)
  assert "'dm_wide_resnet' model DMWideResNet(depth=10, widen_factor=1" in msg
  assert ("2 missing key(s): [batchnorm.running_var, "
          "layer.1.block.0.shortcut.weight]") in msg
  assert "1 unexpected key(s): [layer.0.block.0.shortcut.weight]" in msg
  # Shape mismatches name both shapes; the hint names the checkpoint's size.
  with pytest.raises(ValueError) as e:
    convert_state_dict(dm_sd, "dm_wrn28_10")
  msg = str(e.value)
  assert ("init_conv.weight" not in msg and "layer.0.block.0.conv_0.weight: "
          "checkpoint (16, 16, 3, 3) vs expected (160, 16, 3, 3)") in msg
  assert "looks like DMWideResNet-10-1" in msg
  assert "missing key(s)" in msg  # WRN-28 has more blocks
  # The other WideResNet's keys, both ways round.
  with pytest.raises(ValueError, match="try 'dm_wrn28_10'"):
    convert_state_dict(dm_sd, "wide_resnet", **kw)
  with pytest.raises(ValueError, match="try 'wrn34_10'"):
    convert_state_dict(meta_free(TorchWideResNet(10, 1)), "dm_wide_resnet",
                       **kw)


def test_dm_normalisation_buffers(dm_sd):
  kw = dict(depth=10, widen_factor=1)
  with pytest.raises(ValueError) as e:
    convert_state_dict(dm_sd, "dm_wide_resnet", mean=CIFAR100_MEAN,
                       std=CIFAR100_STD, **kw)
  msg = str(e.value)
  assert "normalisation buffers" in msg and "differ from the mean/std" in msg
  assert "pass mean=(0.4914, 0.4822, 0.4465), std=(0.2471, 0.2435, " in msg
  with pytest.raises(ValueError, match="differ from the mean/std"):
    convert_state_dict(dm_sd, "dm_wide_resnet", mean=(0.0,), std=(1.0,), **kw)
  # Buffers absent (some RobustBench files): the model's fields are used.
  no_buffers = {k: v for k, v in dm_sd.items() if k not in ("mean", "std")}
  ref = convert_state_dict(dm_sd, "dm_wide_resnet", **kw)
  got = convert_state_dict(no_buffers, "dm_wide_resnet", mean=CIFAR100_MEAN,
                           std=CIFAR100_STD, **kw)
  jax.tree.map(np.testing.assert_array_equal, got, ref)
  # ... or dropped on request.
  convert_state_dict(dm_sd, "dm_wide_resnet", mean=(0.0,), std=(1.0,),
                     ignore=("mean", "std"), **kw)
  shapes = torch_state_dict_shapes("dm_wide_resnet", **kw)
  assert shapes["mean"] == shapes["std"] == (3, 1, 1)


def test_dm_checkpoint_sha256_and_mean_std_from_buffers(tmp_path):
  """A CIFAR-100 DM checkpoint: verified, converted, and the model built
  with the buffers' mean/std when none are given."""
  net = randomise(TorchDMWideResNet(100, 10, 1, "swish", CIFAR100_MEAN,
                                    CIFAR100_STD), seed=17)
  path = tmp_path / "dm.pt"
  torch.save({"model_state_dict": net.state_dict()}, path)
  digest = compute_sha256(path)
  kw = dict(depth=10, widen_factor=1, num_classes=100)
  model, params, state = convert_torch_checkpoint(path, "dm_wide_resnet",
                                                  sha256=digest, **kw)
  assert tuple(model.mean) == CIFAR100_MEAN and tuple(model.std) == (
      CIFAR100_STD)
  x = nhwc_images((2, 32, 32, 3), seed=4)
  assert_logits_close(flax_logits(model, params, state, x),
                      torch_logits(net, x))
  with pytest.raises(ValueError, match="SHA-256 mismatch"):
    convert_torch_checkpoint(path, "dm_wide_resnet", sha256="0" * 64, **kw)
  # Explicit mean/std are checked, not overridden.
  with pytest.raises(ValueError, match="normalisation buffers"):
    convert_torch_checkpoint(path, "dm_wide_resnet", mean=(0.5,),
                             std=(0.5,), **kw)


def test_input_shortcut_checkpoint_as_the_preact_block_is_silently_wrong():
  """The key names are the same, so the wrong block converts; its logits
  differ (the bug RobustBench's PreActResNet18 met before shortcut_from)."""
  net = randomise(TorchResNet18(width=16, preact=True, final_bn=False,
                                shortcut_from="input"), seed=3)
  x = nhwc_images((3, 32, 32, 3), seed=1)
  want = torch_logits(net, x)
  got = {}
  for src in ("input", "preact"):
    kw = {"width": 16, "final_bn": False, "shortcut_from": src}
    params, state = convert_state_dict(net.state_dict(), "preact_resnet18",
                                       **kw)
    got[src] = flax_logits(get_model("preact_resnet18", **kw), params,
                           state, x)
  assert_logits_close(got["input"], want)
  assert np.abs(got["preact"] - want).max() > 0.1 * np.abs(want).max()


@pytest.mark.parametrize("entry,net", [
    ("Andriushchenko2020Understanding",
     lambda: TorchResNet18(preact=True, final_bn=False, shortcut_from="input")),
    ("Rice2020Overfitting_L2",
     lambda: TorchResNet18(preact=True, final_bn=True, shortcut_from="preact",
                           mean=(0.4914, 0.4822, 0.4465),
                           std=(0.2471, 0.2435, 0.2616))),
    ("Rebuffi2021Fixing_R18_ddpm", lambda: TorchDMPreActResNet(10, "swish"))])
def test_robustbench_entry_names_pick_the_architecture(entry, net):
  """cifar10.py:405-407 (PreActBlock, no bn), :216-230 (PreActBlockV2,
  bn_before_fc, mu / sigma), :634-642 (DMPreActResNet, Swish)."""
  net = randomise(net(), seed=5)
  x = nhwc_images((2, 32, 32, 3), seed=2)
  name, kwargs, ignore = torch_convert.robustbench_model(entry)
  sd = dict(net.state_dict())
  if ignore:                              # the subclass's mu / sigma buffers
    sd.update(mu=torch.zeros(1, 3, 1, 1), sigma=torch.ones(1, 3, 1, 1))
  params, state = convert_state_dict(sd, name, ignore=ignore, **kwargs)
  assert_logits_close(flax_logits(get_model(name, **kwargs), params, state, x),
                      torch_logits(net, x))
  with pytest.raises(ValueError, match="known"):
    torch_convert.robustbench_model("Nobody2099")


def _teacher_config(path, **fields):
  import ml_collections
  return ml_collections.ConfigDict({
      "checkpoint": None, "torch_checkpoint": str(path), "sha256": "",
      "robustbench": None, "mean": None, "std": None,
      "model": {"name": "dm_preact_resnet18",
                "kwargs": {"activation": "swish"}}, **fields})


def test_dm_teacher_without_buffers_needs_its_normalisation(tmp_path):
  """A DeepMind checkpoint carries no mean / std: the teacher's
  normalisation must come from teacher.mean / std or its RobustBench entry,
  never silently from the student's (here: none, as for normalize=False)."""
  from tsjax import config_checks as cc
  from tsjax.train.teachers import load_teacher
  net = randomise(TorchDMPreActResNet(10, "swish"), seed=7)
  path = tmp_path / "dm_r18.npz"
  save_state_dict_npz(net.state_dict(), path)
  x = nhwc_images((2, 32, 32, 3), seed=4)
  want = torch_logits(net, x)
  student = dict(num_classes=10, mean=(0.0,), std=(1.0,),
                 input_shape=(32, 32, 3))
  with pytest.raises(cc.ConfigError, match=r"teacher\.mean.*teacher\.std"):
    load_teacher(_teacher_config(path), **student)
  with pytest.raises(cc.ConfigError, match="both"):
    load_teacher(_teacher_config(path, mean=tuple(CIFAR10_MEAN)), **student)
  rb = "Rebuffi2021Fixing_R18_ddpm"
  for tcfg in (_teacher_config(path, mean=tuple(CIFAR10_MEAN),
                               std=tuple(CIFAR10_STD)),
               _teacher_config(path, robustbench=rb,
                               model={"name": "small_cnn", "kwargs": {}})):
    model, params, state = load_teacher(tcfg, **student)
    assert_logits_close(flax_logits(model, params, state, x), want)
  with pytest.raises(cc.ConfigError, match="teacher.robustbench.*known"):
    load_teacher(_teacher_config(path, robustbench="Nobody2099"), **student)
  with pytest.raises(cc.ConfigError, match="teacher.mean"):
    load_teacher(_teacher_config(None, checkpoint=str(tmp_path),
                                 torch_checkpoint=None, mean=(0.5,),
                                 std=(0.5,)), **student)


def test_robustbench_preact_teacher_takes_raw_input_shortcut(tmp_path):
  """teacher.robustbench picks the block variant the key names cannot tell:
  Andriushchenko2020Understanding's PreActBlock, [0, 1] inputs whatever the
  student's normalisation."""
  from tsjax.train.teachers import load_teacher
  net = randomise(TorchResNet18(preact=True, final_bn=False,
                                shortcut_from="input"), seed=8)
  path = tmp_path / "r18.npz"
  save_state_dict_npz(net.state_dict(), path)
  x = nhwc_images((2, 32, 32, 3), seed=5)
  tcfg = _teacher_config(path, robustbench="Andriushchenko2020Understanding")
  model, params, state = load_teacher(
      tcfg, num_classes=10, mean=tuple(CIFAR10_MEAN), std=tuple(CIFAR10_STD),
      input_shape=(32, 32, 3))
  assert model.shortcut_from == "input" and not model.final_bn
  assert_logits_close(flax_logits(model, params, state, x),
                      torch_logits(net, x))
