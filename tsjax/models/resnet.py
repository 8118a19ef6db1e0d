"""CIFAR ResNet-18s: pre-activation (He et al. 2016) and the kuangliu BasicBlock one.

Both take NHWC float images in [0, 1], normalise them inside the model with the
``mean`` / ``std`` fields (see ``tsjax.models.cnn``), and have the interface
``__call__(x, train=False, return_hidden=False)``. Batch norm is
``nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)``
(PyTorch's momentum 0.1 / eps 1e-5) with its statistics in ``batch_stats``;
train with ``model.apply(variables, x, train=True, mutable=["batch_stats"])``.

Every 3x3 conv uses explicit padding ``((1, 1), (1, 1))`` and every 1x1 conv
none, so outputs (and, for strided convs, the sampled positions) are exactly
those of PyTorch's ``padding=1`` / ``padding=0``. Convs before BN have no bias.
Conv kernels are initialised like torchvision (He normal, fan-out); dense
layers use Flax's defaults (a converter overwrites both anyway).

``PreActResNet18`` (the CIFAR variant of the adversarial-training codes, e.g.
Rice et al. 2020 / kuangliu ``preact_resnet.py``): stem 3x3 conv 64, stages of
2 ``PreActBlock`` s with widths 64/128/256/512 and strides 1/2/2/2, final
BN-ReLU (``final_bn``; Rice et al.'s ``self.bn``), global average pool, linear. A PreActBlock computes
``a = relu(bn1(x)); out = conv2(relu(bn2(conv1(a)))) + shortcut`` where the
shortcut is ``shortcut_conv(a)`` (1x1, stride) when the shape changes and ``x``
otherwise (``shortcut_from="preact"``, the default: Rice et al.'s and
kuangliu's ``preact_resnet.py``, RobustBench's ``PreActBlockV2``), or
``shortcut_conv(x)`` from the block's raw input (``shortcut_from="input"``:
RobustBench's ``PreActBlock``, robustbench/model_zoo/architectures/
resnet.py:121-144 with its default ``out_shortcut=False``). The parameter
names are the same, so a checkpoint converts either way and only the right
choice computes its logits (``tsjax.models.torch_convert.ROBUSTBENCH`` picks
it by entry name). 11,172,170 parameters for 10 classes; ``final_bn=False`` drops the
final BN-ReLU (kuangliu's ``preact_resnet.py``: 11,171,146 parameters).

``ResNet18`` (kuangliu ``resnet.py``, used by the PeerAiD / RSLAD codes): stem
3x3 conv 64 stride 1 + BN + ReLU, no max-pool; ``BasicBlock`` s
``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut)`` with a 1x1 conv + BN
shortcut when the shape changes; global average pool, linear. 11,173,962
parameters for 10 classes.

Parameter paths and the PyTorch state_dict keys they correspond to::

  PyTorch (kuangliu / Rice et al.)     Flax
  conv1.weight                         stem_conv/kernel
  bn1.*          (ResNet18 only)       stem_bn/{scale,bias}  batch_stats stem_bn/{mean,var}
  layer{s}.{i}.conv{1,2}.weight        layer{s}_{i}/conv{1,2}/kernel
  layer{s}.{i}.bn{1,2}.*               layer{s}_{i}/bn{1,2}/...
  layer{s}.{i}.shortcut.0.weight       layer{s}_{i}/shortcut_conv/kernel
  layer{s}.{i}.shortcut.1.* (ResNet18) layer{s}_{i}/shortcut_bn/...
  bn.*           (PreAct only)         final_bn/...
  linear.{weight,bias}                 fc/{kernel,bias}

(``s`` = 1..4, ``i`` = 0..1; BN weight -> scale, running_mean -> mean,
running_var -> var; conv weights OIHW -> HWIO, linear weights transposed.)

``return_hidden=True`` returns ``(logits, hiddens)`` with five entries: one
post-activation feature map per stage (``[N, H/r, W/r, C_s]`` for r = 1, 2, 4,
8 and C_s = width * (1, 2, 4, 8)) and the pooled penultimate features
``[N, 8 * width]``. For ResNet18 a stage's map is its last block's output
(post-ReLU). A pre-activation block's output is an un-activated residual sum;
there the stage's entry is the BN-ReLU activation the network computes from it
(the next stage's first ``bn1``-ReLU, or ``final_bn``-ReLU for the last stage;
with ``final_bn=False`` the last stage's entry is its raw output, which is what
gets pooled).

Input rule: NHWC float, H and W >= 8 (the total stride; global pooling takes
any larger size, the nets are designed for 32x32), C = len(mean) where mean has
per-channel entries.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from tsjax.models.cnn import check_image_shape, check_norm, prepare_images

# torchvision ResNet init: kaiming_normal_(mode="fan_out", nonlinearity="relu").
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv(features: int, kernel: int, stride: int = 1, *, name: str,
         groups: int = 1, dtype: Any = None,
         param_dtype: Any = jnp.float32) -> nn.Conv:
  """Bias-free conv with PyTorch-equivalent padding ``(kernel - 1) // 2``."""
  p = (kernel - 1) // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((p, p), (p, p)), use_bias=False,
                 feature_group_count=groups, kernel_init=conv_init,
                 dtype=dtype, param_dtype=param_dtype, name=name)


def batch_norm(train: bool, *, name: str, dtype: Any = None,
               param_dtype: Any = jnp.float32) -> nn.BatchNorm:
  """PyTorch-equivalent BatchNorm2d (momentum 0.1 there = 0.9 here, eps 1e-5)."""
  return nn.BatchNorm(use_running_average=not train, momentum=0.9,
                      epsilon=1e-5, dtype=dtype, param_dtype=param_dtype,
                      name=name)


def global_avg_pool(x: jnp.ndarray) -> jnp.ndarray:
  return jnp.mean(x, axis=(1, 2))


SHORTCUT_FROM = ("preact", "input")


class PreActBlock(nn.Module):
  """Pre-activation basic block; returns ``(out, relu(bn1(x)))``. The 1x1
  shortcut reads ``relu(bn1(x))`` (``shortcut_from="preact"``) or ``x``
  (``"input"``)."""
  features: int
  stride: int = 1
  shortcut_from: str = "preact"
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    a = nn.relu(batch_norm(train, name="bn1", **kw)(x))
    if self.stride != 1 or x.shape[-1] != self.features:
      shortcut = conv(self.features, 1, self.stride, name="shortcut_conv",
                      **kw)(a if self.shortcut_from == "preact" else x)
    else:
      shortcut = x
    out = conv(self.features, 3, self.stride, name="conv1", **kw)(a)
    out = nn.relu(batch_norm(train, name="bn2", **kw)(out))
    out = conv(self.features, 3, 1, name="conv2", **kw)(out)
    return out + shortcut, a


class BasicBlock(nn.Module):
  """Post-activation basic block with a 1x1 conv + BN shortcut on shape change."""
  features: int
  stride: int = 1
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    out = conv(self.features, 3, self.stride, name="conv1", **kw)(x)
    out = nn.relu(batch_norm(train, name="bn1", **kw)(out))
    out = conv(self.features, 3, 1, name="conv2", **kw)(out)
    out = batch_norm(train, name="bn2", **kw)(out)
    if self.stride != 1 or x.shape[-1] != self.features:
      shortcut = conv(self.features, 1, self.stride, name="shortcut_conv",
                      **kw)(x)
      shortcut = batch_norm(train, name="shortcut_bn", **kw)(shortcut)
    else:
      shortcut = x
    return nn.relu(out + shortcut)


_STRIDES = (1, 2, 2, 2)
_BLOCKS = (2, 2, 2, 2)


class _CifarResNet18Base(nn.Module):
  """Shared fields and input checks of the two ResNet-18s."""
  num_classes: int = 10
  mean: Sequence[float] = (0.0,)
  std: Sequence[float] = (1.0,)
  width: int = 64  # stage widths width * (1, 2, 4, 8); 64 is the standard net
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    check_norm(type(self).__name__, self.mean, self.std)
    if int(self.width) != self.width or self.width < 1:
      raise ValueError(f"{type(self).__name__}: width must be a positive "
                       f"integer, got {self.width!r}")
    super().__post_init__()

  @nn.nowrap
  def check_input_shape(self, shape, batched: bool = False) -> None:
    """H, W >= 8 (the total stride), C = len(mean) for per-channel mean/std."""
    check_image_shape(type(self).__name__, shape, multiple=1, min_size=8,
                      mean=self.mean, std=self.std, batched=batched,
                      example="32x32x3")


class PreActResNet18(_CifarResNet18Base):
  """Pre-activation ResNet-18, CIFAR variant (see the module docstring).

  ``final_bn=True`` (default): final BN-ReLU before pooling, as in the
  adversarial-training codes (Rice et al. ``self.bn``), 11,172,170 parameters;
  ``final_bn=False``: kuangliu's ``preact_resnet.py``, which pools layer4's raw
  output, 11,171,146 parameters (10 classes).
  """
  final_bn: bool = True
  shortcut_from: str = "preact"   # or "input" (RobustBench's PreActBlock)

  def __post_init__(self):
    if self.shortcut_from not in SHORTCUT_FROM:
      raise ValueError(f"PreActResNet18: shortcut_from must be one of "
                       f"{SHORTCUT_FROM}, got {self.shortcut_from!r}")
    super().__post_init__()

  @nn.compact
  def __call__(self, x, train: bool = False, return_hidden: bool = False):
    self.check_input_shape(x.shape, batched=True)
    x = prepare_images(x, self.mean, self.std)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = conv(self.width, 3, 1, name="stem_conv", **kw)(x)
    hiddens = []
    for s, (n, stride) in enumerate(zip(_BLOCKS, _STRIDES)):
      for i in range(n):
        x, a = PreActBlock(self.width * 2 ** s, stride if i == 0 else 1,
                           self.shortcut_from, name=f"layer{s + 1}_{i}",
                           **kw)(x, train)
        if s > 0 and i == 0:
          hiddens.append(a)  # post-activation of the previous stage's output
    if self.final_bn:
      x = nn.relu(batch_norm(train, name="final_bn", **kw)(x))
    hiddens.append(x)
    x = global_avg_pool(x)
    hiddens.append(x)
    logits = nn.Dense(self.num_classes, name="fc", **kw)(x)
    if return_hidden:
      return logits, tuple(hiddens)
    return logits


class ResNet18(_CifarResNet18Base):
  """ResNet-18 with the CIFAR stem (kuangliu; see the module docstring)."""

  @nn.compact
  def __call__(self, x, train: bool = False, return_hidden: bool = False):
    self.check_input_shape(x.shape, batched=True)
    x = prepare_images(x, self.mean, self.std)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = conv(self.width, 3, 1, name="stem_conv", **kw)(x)
    x = nn.relu(batch_norm(train, name="stem_bn", **kw)(x))
    hiddens = []
    for s, (n, stride) in enumerate(zip(_BLOCKS, _STRIDES)):
      for i in range(n):
        x = BasicBlock(self.width * 2 ** s, stride if i == 0 else 1,
                       name=f"layer{s + 1}_{i}", **kw)(x, train)
      hiddens.append(x)
    x = global_avg_pool(x)
    hiddens.append(x)
    logits = nn.Dense(self.num_classes, name="fc", **kw)(x)
    if return_hidden:
      return logits, tuple(hiddens)
    return logits
