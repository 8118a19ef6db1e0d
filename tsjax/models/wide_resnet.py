"""Wide ResNet (Zagoruyko & Komodakis 2016) as in the TRADES / RobustBench code.

``WideResNet(depth, widen_factor, dropout=0.0)``: depth = 6n + 4, a 3x3 stem
conv with 16 channels, three groups of n pre-activation blocks with widths
16k, 32k, 64k (k = widen_factor) and strides 1, 2, 2, final BN-ReLU, global
average pool, linear. A block computes ``a = relu(bn1(x));
out = conv2(dropout(relu(bn2(conv1(a))))) + shortcut`` with
``shortcut = shortcut_conv(a)`` (1x1, stride; TRADES' ``convShortcut``) when
the input and output widths differ and ``x`` otherwise. Dropout (rate
``dropout``) is active only with ``train=True`` and then needs a ``"dropout"``
rng. WRN-34-10: 46,160,474 parameters, WRN-28-10: 36,479,194 (10 classes).

Same interface, normalisation, batch norm and padding conventions as
``tsjax.models.resnet`` (BN momentum 0.9 = PyTorch 0.1, eps 1e-5, explicit
PyTorch padding, bias-free convs, He fan-out normal conv init as in TRADES).

Parameter paths and the RobustBench / TRADES state_dict keys::

  PyTorch                                   Flax
  conv1.weight                              stem_conv/kernel
  block{g}.layer.{i}.bn{1,2}.*              block{g}_{i}/bn{1,2}/...
  block{g}.layer.{i}.conv{1,2}.weight       block{g}_{i}/conv{1,2}/kernel
  block{g}.layer.{i}.convShortcut.weight    block{g}_{i}/shortcut_conv/kernel
  bn1.*                                     final_bn/...
  fc.{weight,bias}                          fc/{kernel,bias}

(``g`` = 1..3, ``i`` = 0..n-1.) TRADES' file also defines an unused
``sub_block1`` whose keys appear in its checkpoints; they have no counterpart
here and a converter should drop them.

``return_hidden=True`` returns four entries: the post-activation map of each
group's output (the BN-ReLU the network computes from it: the next group's
first ``bn1``-ReLU, or ``final_bn``-ReLU for the last group), of shapes
``[N, H, W, 16k]``, ``[N, H/2, W/2, 32k]``, ``[N, H/4, W/4, 64k]``, and the
pooled penultimate features ``[N, 64k]``.

Input rule: NHWC float, H and W >= 4 (the total stride; the nets are designed
for 32x32), C = len(mean) where mean has per-channel entries.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from tsjax.models.cnn import (check_image_shape, check_norm, check_wrn_shape,
                              prepare_images)
from tsjax.models.resnet import batch_norm, conv, global_avg_pool


class WideBlock(nn.Module):
  """TRADES/WRN pre-activation block; returns ``(out, relu(bn1(x)))``."""
  features: int
  stride: int = 1
  dropout: float = 0.0
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    a = nn.relu(batch_norm(train, name="bn1", **kw)(x))
    out = conv(self.features, 3, self.stride, name="conv1", **kw)(a)
    out = nn.relu(batch_norm(train, name="bn2", **kw)(out))
    if self.dropout > 0:
      out = nn.Dropout(self.dropout, deterministic=not train)(out)
    out = conv(self.features, 3, 1, name="conv2", **kw)(out)
    # In every WRN a stride-2 block also changes the width, so this is
    # TRADES' `equalInOut` test.
    if x.shape[-1] == self.features and self.stride == 1:
      shortcut = x
    else:
      shortcut = conv(self.features, 1, self.stride, name="shortcut_conv",
                      **kw)(a)
    return out + shortcut, a


class WideResNet(nn.Module):
  """WRN-depth-widen_factor (see the module docstring).

  Attributes:
    depth: 6n + 4 (e.g. 28, 34, 70); n blocks per group.
    widen_factor: k; group widths 16k, 32k, 64k.
    dropout: dropout rate between the two convs of each block (train only).
    num_classes, mean, std, dtype, param_dtype: as for every image model.
  """
  depth: int = 34
  widen_factor: int = 10
  dropout: float = 0.0
  num_classes: int = 10
  mean: Sequence[float] = (0.0,)
  std: Sequence[float] = (1.0,)
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    check_norm("WideResNet", self.mean, self.std)
    check_wrn_shape("WideResNet", self.depth, self.widen_factor,
                    "10, 16, 22, 28, 34, ...")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"WideResNet dropout must be in [0, 1), got "
                       f"{self.dropout!r}")
    super().__post_init__()

  @nn.nowrap
  def check_input_shape(self, shape, batched: bool = False) -> None:
    """H, W >= 4 (the total stride), C = len(mean) for per-channel mean/std."""
    check_image_shape(f"WideResNet-{self.depth}-{self.widen_factor}", shape,
                      multiple=1, min_size=4, mean=self.mean, std=self.std,
                      batched=batched, example="32x32x3")

  @nn.compact
  def __call__(self, x, train: bool = False, return_hidden: bool = False):
    self.check_input_shape(x.shape, batched=True)
    x = prepare_images(x, self.mean, self.std)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    n = (int(self.depth) - 4) // 6
    k = int(self.widen_factor)
    x = conv(16, 3, 1, name="stem_conv", **kw)(x)
    hiddens = []
    for g, (width, stride) in enumerate(zip((16 * k, 32 * k, 64 * k),
                                            (1, 2, 2))):
      for i in range(n):
        x, a = WideBlock(width, stride if i == 0 else 1, self.dropout,
                         name=f"block{g + 1}_{i}", **kw)(x, train)
        if g > 0 and i == 0:
          hiddens.append(a)  # post-activation of the previous group's output
    x = nn.relu(batch_norm(train, name="final_bn", **kw)(x))
    hiddens.append(x)
    x = global_avg_pool(x)
    hiddens.append(x)
    logits = nn.Dense(self.num_classes, name="fc", **kw)(x)
    if return_hidden:
      return logits, tuple(hiddens)
    return logits
