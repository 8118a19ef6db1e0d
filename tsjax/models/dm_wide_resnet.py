"""DeepMind's WideResNet (Gowal et al. 2020, Rebuffi et al. 2021), RobustBench's.

The teachers at the top of RobustBench's CIFAR leaderboards ("Uncovering the
limits of adversarial training", "Fixing data augmentation to improve
adversarial robustness", and later work that reuses their code) are this
network: RobustBench ``model_zoo/architectures/dm_wide_resnet.py``,
``DMWideResNet(num_classes, depth, width, activation_fn=Swish, mean, std)``,
itself a PyTorch port of ``deepmind-research/adversarial_robustness``.

``DMWideResNet(depth, widen_factor)``: depth = 6n + 4, a 3x3 stem conv with 16
channels, three groups of n pre-activation blocks with widths 16k, 32k, 64k
(k = widen_factor; DM's ``width``) and strides 1, 2, 2, final BN-activation,
global average pool, linear. A block computes::

  a = act(bn1(x))
  out = conv2(act(bn2(conv1(pad(a))))) + shortcut
  shortcut = shortcut_conv(a)   (1x1, stride)  if x has fewer / more channels
           = x                                  otherwise

(DM's ``has_shortcut = in_planes != out_planes``: note the *raw* ``x`` on the
identity path, the activated ``a`` into the projection.) Differences from the
TRADES ``WideResNet`` (``tsjax.models.wide_resnet``), all kept here:

* **activation**: Swish ``x * sigmoid(x)`` (``activation="swish"``, the
  default; every DM entry of RobustBench uses it, RobustBench's ``Swish`` and
  PyTorch's ``nn.SiLU`` are the same function) or ``"relu"``;
* **padding of the first conv of a block** (DM pads by hand to reproduce
  TensorFlow's ``SAME``): 1 on every side at stride 1; at stride 2 **0 before
  and 1 after** along H and W (``F.pad(v, (0, 1, 0, 1))`` + ``padding=0``),
  not PyTorch's symmetric ``padding=1``. The sampled positions differ from
  the TRADES net's, so the two are not interchangeable even with equal weights;
* **normalisation constants**: ``mean`` / ``std`` default to DM's
  ``CIFAR10_MEAN`` / ``CIFAR10_STD`` (RobustBench builds every DM CIFAR-10
  model with them; its CIFAR-100 models use ``CIFAR100_MEAN`` /
  ``CIFAR100_STD``, both exported here). As for every tsjax image model the
  input is NHWC in [0, 1] and ``(x - mean) / std`` happens inside; in DM's
  code they are buffers ``mean`` / ``std`` (shape ``[C, 1, 1]``) in the
  state_dict. Pass ``mean=(0.0,), std=(1.0,)`` for an un-normalised net;
* ``padding`` (default 0): the input is zero-padded by this many pixels on
  every side *before* normalisation (DM's ``padding`` argument, e.g. 2 to run
  a 32x32 net on 28x28 images);
* pooling: DM's ``avg_pool2d(out, 8)`` on the final 8x8 map of a 32x32 input,
  i.e. the global average pool used here (other input sizes: global pool;
  DM's code only runs at 32x32).

**Batch norm.** Eval mode (``train=False``) uses the running statistics with
eps 1e-5, like PyTorch's ``BatchNorm2d`` in RobustBench's port and Haiku's
``BatchNorm`` in DM's JAX code, so converted checkpoints give the same logits.
For training, DM's JAX code uses ``decay_rate=0.99`` (PyTorch momentum 0.01),
which is this model's default ``bn_momentum=0.99`` (Flax convention: running =
momentum * running + (1 - momentum) * batch); RobustBench's PyTorch port keeps
``BatchNorm2d``'s default momentum 0.1 (= ``bn_momentum=0.9``, the other tsjax
models' value), which only matters if the port itself is trained.

Sizes (10 classes): WRN-28-10 36,479,194 parameters (as TRADES' WRN-28-10),
WRN-34-10 46,160,474, WRN-34-20 184,531,674, WRN-70-16 266,796,506,
WRN-106-16 415,475,162.

Parameter paths and the RobustBench ``DMWideResNet`` state_dict keys::

  PyTorch (RobustBench / DM)                Flax
  init_conv.weight                          stem_conv/kernel
  layer.{g}.block.{i}.batchnorm_0.*         block{g+1}_{i}/bn1/...
  layer.{g}.block.{i}.conv_0.weight         block{g+1}_{i}/conv1/kernel
  layer.{g}.block.{i}.batchnorm_1.*         block{g+1}_{i}/bn2/...
  layer.{g}.block.{i}.conv_1.weight         block{g+1}_{i}/conv2/kernel
  layer.{g}.block.{i}.shortcut.weight       block{g+1}_{i}/shortcut_conv/kernel
  batchnorm.*                               final_bn/...
  logits.{weight,bias}                      fc/{kernel,bias}
  mean, std  (buffers [C, 1, 1])            the ``mean`` / ``std`` fields

(``g`` = 0..2, ``i`` = 0..n-1; see ``tsjax.models.torch_convert``.)

``return_hidden=True`` returns four entries: the post-activation map of each
group's output (the BN-activation the network computes from it: the next
group's first ``bn1``-activation, or ``final_bn``-activation for the last
group), of shapes ``[N, H', W', 16k]``, ``[N, H'/2, W'/2, 32k]``,
``[N, H'/4, W'/4, 64k]`` (``H' = H + 2 * padding``), and the pooled
penultimate features ``[N, 64k]``. With Swish these maps can be slightly
negative (Swish's minimum is about -0.278).

Input rule: NHWC float, ``H + 2 * padding`` and ``W + 2 * padding``
multiples of 4 (the two stride-2 blocks need even sizes: DM's asymmetric
padding and the 1x1 shortcut give different sizes otherwise), C = len(mean)
where mean has per-channel entries (3 by default). Designed for 32x32x3.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from tsjax.models.cnn import (check_image_shape, check_norm, check_wrn_shape,
                              prepare_images)
from tsjax.models.resnet import conv, conv_init, global_avg_pool

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

ACTIVATIONS: dict[str, Callable[[jnp.ndarray], jnp.ndarray]] = {
    "swish": nn.swish,
    "relu": nn.relu,
}


def _bn(train: bool, momentum: float, *, name: str, dtype: Any,
        param_dtype: Any) -> nn.BatchNorm:
  """BatchNorm with eps 1e-5 (PyTorch / Haiku default) and Flax ``momentum``."""
  return nn.BatchNorm(use_running_average=not train, momentum=momentum,
                      epsilon=1e-5, dtype=dtype, param_dtype=param_dtype,
                      name=name)


class DMBlock(nn.Module):
  """DM pre-activation block (module docstring); returns ``(out, act(bn1(x)))``.

  ``x``: ``[N, H, W, C_in]`` -> ``out``: ``[N, H/stride, W/stride, features]``
  (H, W even when ``stride == 2``).
  """
  features: int
  stride: int = 1
  activation: str = "swish"
  bn_momentum: float = 0.99
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    act = ACTIVATIONS[self.activation]
    a = act(_bn(train, self.bn_momentum, name="bn1", **kw)(x))
    # DM's hand-made 'SAME': symmetric at stride 1, (0, 1) at stride 2.
    pad = ((1, 1), (1, 1)) if self.stride == 1 else ((0, 1), (0, 1))
    out = nn.Conv(self.features, (3, 3), strides=(self.stride, self.stride),
                  padding=pad, use_bias=False, kernel_init=conv_init,
                  name="conv1", **kw)(a)
    out = act(_bn(train, self.bn_momentum, name="bn2", **kw)(out))
    out = conv(self.features, 3, 1, name="conv2", **kw)(out)
    if x.shape[-1] != self.features:
      shortcut = conv(self.features, 1, self.stride, name="shortcut_conv",
                      **kw)(a)
    elif self.stride == 1:
      shortcut = x
    else:  # DM's code cannot build this block either
      raise ValueError("DMBlock: a stride-2 block must change the width")
    return out + shortcut, a


class DMWideResNet(nn.Module):
  """DeepMind WRN-depth-widen_factor (see the module docstring).

  Attributes:
    depth: 6n + 4 (28, 34, 70, 106, ...); n blocks per group.
    widen_factor: k (DM's ``width``); group widths 16k, 32k, 64k.
    num_classes: number of logits.
    mean, std: per-channel normalisation inside the model, [0, 1] units
      (default: DM's ``CIFAR10_MEAN`` / ``CIFAR10_STD``).
    activation: ``"swish"`` (default, all RobustBench DM models) or
      ``"relu"`` (DM's constructor default).
    padding: zero padding (pixels per side) of the input before
      normalisation.
    bn_momentum: Flax BatchNorm momentum (0.99 = DM's training decay).
    dtype, param_dtype: computation / parameter dtypes.
  """
  depth: int = 28
  widen_factor: int = 10
  num_classes: int = 10
  mean: Sequence[float] = CIFAR10_MEAN
  std: Sequence[float] = CIFAR10_STD
  activation: str = "swish"
  padding: int = 0
  bn_momentum: float = 0.99
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    check_norm("DMWideResNet", self.mean, self.std)
    check_wrn_shape("DMWideResNet", self.depth, self.widen_factor,
                    "10, 16, 22, 28, 34, ..., 70, 106")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"DMWideResNet activation must be one of "
                       f"{sorted(ACTIVATIONS)}, got {self.activation!r}")
    if int(self.padding) != self.padding or self.padding < 0:
      raise ValueError(f"DMWideResNet padding must be an integer >= 0, got "
                       f"{self.padding!r}")
    if not 0.0 <= self.bn_momentum < 1.0:
      raise ValueError(f"DMWideResNet bn_momentum must be in [0, 1), got "
                       f"{self.bn_momentum!r}")
    super().__post_init__()

  @nn.nowrap
  def check_input_shape(self, shape, batched: bool = False) -> None:
    """H + 2p, W + 2p multiples of 4 (p = padding), C = len(mean)."""
    shape = tuple(int(s) for s in shape)
    name = f"DMWideResNet-{self.depth}-{self.widen_factor}"
    p = int(self.padding)
    if p and len(shape) in (3, 4):
      name += f" (padding={p}: checks the padded HxWxC)"
      shape = shape[:-3] + (shape[-3] + 2 * p, shape[-2] + 2 * p, shape[-1])
    check_image_shape(name, shape, multiple=4, min_size=4, mean=self.mean,
                      std=self.std, batched=batched, example="32x32x3")

  @nn.compact
  def __call__(self, x, train: bool = False, return_hidden: bool = False):
    """``x``: NHWC floats in [0, 1] -> logits ``[N, num_classes]``."""
    self.check_input_shape(x.shape, batched=True)
    p = int(self.padding)
    if p:
      x = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    x = prepare_images(x, self.mean, self.std)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    n = (int(self.depth) - 4) // 6
    k = int(self.widen_factor)
    x = conv(16, 3, 1, name="stem_conv", **kw)(x)
    hiddens = []
    for g, (width, stride) in enumerate(zip((16 * k, 32 * k, 64 * k),
                                            (1, 2, 2))):
      for i in range(n):
        x, a = DMBlock(width, stride if i == 0 else 1, self.activation,
                       self.bn_momentum, name=f"block{g + 1}_{i}", **kw)(
                           x, train)
        if g > 0 and i == 0:
          hiddens.append(a)  # post-activation of the previous group's output
    act = ACTIVATIONS[self.activation]
    x = act(_bn(train, self.bn_momentum, name="final_bn", **kw)(x))
    hiddens.append(x)
    x = global_avg_pool(x)
    hiddens.append(x)
    logits = nn.Dense(self.num_classes, name="fc", **kw)(x)
    if return_hidden:
      return logits, tuple(hiddens)
    return logits


class DMPreActBlock(nn.Module):
  """DeepMind's pre-activation ResNet block (RobustBench
  ``dm_wide_resnet.py`` ``_PreActBlock``): ``a = act(bn1(x))``, ``out =
  conv2(act(bn2(conv1(pad(a)))))`` plus, where the stride or the width
  changes, a **3x3** ``shortcut_conv(pad(x))`` from the block's raw input
  (else ``x``); ``pad`` is DM's 1 on every side at stride 1, (0, 1) along H
  and W at stride 2. Returns ``(out, a)``."""
  features: int
  stride: int = 1
  activation: str = "swish"
  bn_momentum: float = 0.99
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    act = ACTIVATIONS[self.activation]
    pad = ((1, 1), (1, 1)) if self.stride == 1 else ((0, 1), (0, 1))
    a = act(_bn(train, self.bn_momentum, name="bn1", **kw)(x))
    strided = lambda name: nn.Conv(
        self.features, (3, 3), strides=(self.stride, self.stride),
        padding=pad, use_bias=False, kernel_init=conv_init, name=name, **kw)
    out = strided("conv1")(a)
    out = act(_bn(train, self.bn_momentum, name="bn2", **kw)(out))
    out = conv(self.features, 3, 1, name="conv2", **kw)(out)
    has_shortcut = self.stride != 1 or x.shape[-1] != self.features
    return out + (strided("shortcut_conv")(x) if has_shortcut else x), a


class DMPreActResNet(nn.Module):
  """DeepMind's pre-activation ResNet-18 / -34 (RobustBench
  ``DMPreActResNet``, robustbench/model_zoo/architectures/
  dm_wide_resnet.py:197-300; the R18 teachers of Rebuffi2021Fixing_R18_*,
  Gowal2021Improving_R18_*, Rade2021Helper_R18_*, model_zoo/cifar10.py):
  3x3 stem conv 64 (no BN), stages of ``DMPreActBlock`` s with widths
  64/128/256/512 and strides 1/2/2/2 (2/2/2/2 blocks for depth 18, 3/4/6/3
  for 34), final BN-activation, global average pool (DM's ``avg_pool2d(out,
  4)`` on 32x32 inputs), linear. ``mean`` / ``std``: DM's CIFAR-10 values by
  default; in RobustBench they are buffers with ``persistent=False``, never
  in a checkpoint, so a converted teacher must be told them
  (``teacher.mean`` / ``teacher.std`` or a RobustBench entry name).

  Parameter paths: ``stem_conv``, ``layer{s}_{i}/{bn1,conv1,bn2,conv2,
  shortcut_conv}``, ``final_bn``, ``fc`` (RobustBench keys ``conv_2d``,
  ``layer_{s-1}.{i}.{batchnorm_0,conv_2d_1,batchnorm_1,conv_2d_2,
  shortcut}``, ``batchnorm``, ``logits``). ``return_hidden`` as for
  ``PreActResNet18``. Input: NHWC, H + 2p and W + 2p multiples of 8.
  """
  depth: int = 18
  num_classes: int = 10
  mean: Sequence[float] = CIFAR10_MEAN
  std: Sequence[float] = CIFAR10_STD
  activation: str = "swish"
  padding: int = 0
  bn_momentum: float = 0.99
  dtype: Any = None
  param_dtype: Any = jnp.float32

  BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}

  def __post_init__(self):
    check_norm("DMPreActResNet", self.mean, self.std)
    if self.depth not in self.BLOCKS:
      raise ValueError(f"DMPreActResNet depth must be one of "
                       f"{sorted(self.BLOCKS)}, got {self.depth!r}")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"DMPreActResNet activation must be one of "
                       f"{sorted(ACTIVATIONS)}, got {self.activation!r}")
    if int(self.padding) != self.padding or self.padding < 0:
      raise ValueError(f"DMPreActResNet padding must be an integer >= 0, "
                       f"got {self.padding!r}")
    super().__post_init__()

  @nn.nowrap
  def check_input_shape(self, shape, batched: bool = False) -> None:
    shape = tuple(int(s) for s in shape)
    p = int(self.padding)
    if p and len(shape) in (3, 4):
      shape = shape[:-3] + (shape[-3] + 2 * p, shape[-2] + 2 * p, shape[-1])
    check_image_shape(f"DMPreActResNet-{self.depth}", shape, multiple=8,
                      min_size=8, mean=self.mean, std=self.std,
                      batched=batched, example="32x32x3")

  @nn.compact
  def __call__(self, x, train: bool = False, return_hidden: bool = False):
    self.check_input_shape(x.shape, batched=True)
    p = int(self.padding)
    if p:
      x = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    x = prepare_images(x, self.mean, self.std)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = conv(64, 3, 1, name="stem_conv", **kw)(x)
    hiddens = []
    for s, (n, stride) in enumerate(zip(self.BLOCKS[self.depth], (1, 2, 2, 2))):
      for i in range(n):
        x, a = DMPreActBlock(64 * 2 ** s, stride if i == 0 else 1,
                             self.activation, self.bn_momentum,
                             name=f"layer{s + 1}_{i}", **kw)(x, train)
        if s > 0 and i == 0:
          hiddens.append(a)
    act = ACTIVATIONS[self.activation]
    x = act(_bn(train, self.bn_momentum, name="final_bn", **kw)(x))
    hiddens.append(x)
    x = global_avg_pool(x)
    hiddens.append(x)
    logits = nn.Dense(self.num_classes, name="fc", **kw)(x)
    if return_hidden:
      return logits, tuple(hiddens)
    return logits
