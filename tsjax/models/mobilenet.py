"""MobileNetV2 (Sandler et al. 2018), CIFAR variant of kuangliu/pytorch-cifar.

Stem 3x3 conv 32 with stride 1 (ImageNet: 2) + BN + activation; 17 inverted
residual blocks from the configuration (expansion t, out channels c, blocks n,
stride s)::

  (1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
  (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)

(the second stage's stride changed from 2 to 1 for CIFAR, as in kuangliu); a
1x1 conv to 1280 + BN + activation; global average pool; linear. A block is
``conv1`` 1x1 expand to t*in + BN + act, ``conv2`` 3x3 depthwise (stride s) +
BN + act, ``conv3`` 1x1 project + BN (linear bottleneck); with stride 1 it adds
a shortcut, the identity when in == out and a 1x1 conv + BN otherwise (as in
kuangliu, this includes the first, t = 1 block). No residual with stride 2.
2,296,922 parameters for 10 classes.

``activation``: ``"relu6"`` (default; the MobileNetV2 paper) or ``"relu"``
(what kuangliu's ``mobilenetv2.py`` actually uses: pick it when loading those
weights). The same interface, normalisation, batch-norm and padding
conventions as ``tsjax.models.resnet``.

Parameter paths and the kuangliu state_dict keys::

  PyTorch                              Flax
  conv1.weight, bn1.*                  stem_conv/kernel, stem_bn/...
  layers.{j}.conv{1,2,3}.weight        layers_{j}/conv{1,2,3}/kernel
  layers.{j}.bn{1,2,3}.*               layers_{j}/bn{1,2,3}/...
  layers.{j}.shortcut.0.weight         layers_{j}/shortcut_conv/kernel
  layers.{j}.shortcut.1.*              layers_{j}/shortcut_bn/...
  conv2.weight, bn2.*                  head_conv/kernel, head_bn/...
  linear.{weight,bias}                 fc/{kernel,bias}

(``j`` = 0..16; the depthwise kernel is ``[3, 3, 1, C]`` here and
``[C, 1, 3, 3]`` in PyTorch.)

``return_hidden=True`` returns nine entries: for each of the seven stages the
post-activation output of the depthwise conv of its last block (the last
nonlinearity in the stage; block outputs themselves are linear bottlenecks),
``[N, H/r, W/r, t*c_in]`` with r = 1, 1, 2, 4, 4, 8, 8 and t*c_in = 32, 144,
192, 384, 576, 960, 960; then the head map ``[N, H/8, W/8, 1280]`` and the
pooled penultimate features ``[N, 1280]``.

Input rule: NHWC float, H and W >= 8 (the total stride; the net is designed
for 32x32), C = len(mean) where mean has per-channel entries.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from tsjax.models.cnn import check_image_shape, check_norm, prepare_images
from tsjax.models.resnet import batch_norm, conv, global_avg_pool

# (expansion, out_channels, num_blocks, stride); kuangliu's CIFAR config.
CIFAR_CONFIG = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
                (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

_ACTIVATIONS = {"relu6": nn.relu6, "relu": nn.relu}


class InvertedResidual(nn.Module):
  """Expand (1x1) - depthwise (3x3) - project (1x1); returns ``(out, hidden)``.

  ``hidden`` is the post-activation depthwise output.
  """
  features: int
  expansion: int
  stride: int = 1
  activation: str = "relu6"
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    act = _ACTIVATIONS[self.activation]
    planes = self.expansion * x.shape[-1]
    out = act(batch_norm(train, name="bn1", **kw)(
        conv(planes, 1, 1, name="conv1", **kw)(x)))
    out = act(batch_norm(train, name="bn2", **kw)(
        conv(planes, 3, self.stride, groups=planes, name="conv2", **kw)(out)))
    hidden = out
    out = batch_norm(train, name="bn3", **kw)(
        conv(self.features, 1, 1, name="conv3", **kw)(out))
    if self.stride == 1:
      if x.shape[-1] != self.features:
        x = batch_norm(train, name="shortcut_bn", **kw)(
            conv(self.features, 1, 1, name="shortcut_conv", **kw)(x))
      out = out + x
    return out, hidden


class MobileNetV2(nn.Module):
  """MobileNetV2 for 32x32 inputs (see the module docstring).

  Attributes:
    num_classes, mean, std, dtype, param_dtype: as for every image model.
    activation: "relu6" (default) or "relu" (kuangliu's weights).
  """
  num_classes: int = 10
  mean: Sequence[float] = (0.0,)
  std: Sequence[float] = (1.0,)
  activation: str = "relu6"
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    check_norm("MobileNetV2", self.mean, self.std)
    if self.activation not in _ACTIVATIONS:
      raise ValueError(f"MobileNetV2 activation must be one of "
                       f"{sorted(_ACTIVATIONS)}, got {self.activation!r}")
    super().__post_init__()

  @nn.nowrap
  def check_input_shape(self, shape, batched: bool = False) -> None:
    """H, W >= 8 (the total stride), C = len(mean) for per-channel mean/std."""
    check_image_shape("MobileNetV2", shape, multiple=1, min_size=8,
                      mean=self.mean, std=self.std, batched=batched,
                      example="32x32x3")

  @nn.compact
  def __call__(self, x, train: bool = False, return_hidden: bool = False):
    self.check_input_shape(x.shape, batched=True)
    x = prepare_images(x, self.mean, self.std)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    act = _ACTIVATIONS[self.activation]
    x = act(batch_norm(train, name="stem_bn", **kw)(
        conv(32, 3, 1, name="stem_conv", **kw)(x)))
    hiddens = []
    j = 0
    for expansion, features, n, stride in CIFAR_CONFIG:
      for i in range(n):
        x, h = InvertedResidual(features, expansion, stride if i == 0 else 1,
                                self.activation, name=f"layers_{j}", **kw)(
                                    x, train)
        j += 1
      hiddens.append(h)
    x = act(batch_norm(train, name="head_bn", **kw)(
        conv(1280, 1, 1, name="head_conv", **kw)(x)))
    hiddens.append(x)
    x = global_avg_pool(x)
    hiddens.append(x)
    logits = nn.Dense(self.num_classes, name="fc", **kw)(x)
    if return_hidden:
      return logits, tuple(hiddens)
    return logits
