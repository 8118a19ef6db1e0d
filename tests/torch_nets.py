"""PyTorch reference networks, layer for layer the tsjax models, with the key
names of the checkpoints ``tsjax.models.torch_convert`` reads (kuangliu /
RobustBench ``ResNet18``, Rice et al. / RobustBench ``PreActResNet18``,
RobustBench / TRADES ``WideResNet``, RobustBench's DeepMind ``DMWideResNet``,
the tsjax small CNN).

One copy, shared by tests/test_torch_convert.py (converted logits against
these) and the benchmarks that time tsjax against PyTorch eager
(benchmarks/adv_train_step.py, autoattack.py, distill_step.py; they import it
as ``tests.torch_nets``). Test/benchmark helper only: tsjax never imports
torch.

``mean`` / ``std`` (optional) normalise the input inside the network, as the
tsjax models do with ``normalize=True``; they are non-persistent buffers, so
the state_dict keys are the same with or without them. ``TorchDMWideResNet``
is the exception, as in DM's code: its ``mean`` / ``std`` are persistent
buffers (state_dict keys ``mean`` / ``std``, shape ``[C, 1, 1]``).
"""

from __future__ import annotations

import torch
import torch.nn as tnn
import torch.nn.functional as F


class Normalize(tnn.Module):
  """``(x - mean) / std`` per channel (NCHW); no state_dict entries."""

  def __init__(self, mean, std):
    super().__init__()
    self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1),
                         persistent=False)
    self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1),
                         persistent=False)

  def forward(self, x):
    return (x - self.mean) / self.std


def _norm(mean, std):
  if (mean is None) != (std is None):
    raise ValueError("give both mean and std, or neither")
  return None if mean is None else Normalize(mean, std)


def _hw(hw):
  return (hw, hw) if isinstance(hw, int) else tuple(hw)


class TorchSmallCNN(tnn.Module):
  """tsjax ``SmallCNN``: conv3x3(bias, pad 1)-ReLU-maxpool2, conv3x3-ReLU-
  maxpool2, flatten in PyTorch's (c, h, w) order, fc1-ReLU, fc. (The converter
  permutes fc1's rows to Flax's (h, w, c) flatten.)"""

  def __init__(self, num_classes=10, in_channels=3, hw=(32, 32),
               features=(32, 64), hidden=128, mean=None, std=None):
    super().__init__()
    h, w = _hw(hw)
    self.norm = _norm(mean, std)
    self.conv1 = tnn.Conv2d(in_channels, features[0], 3, padding=1)
    self.conv2 = tnn.Conv2d(features[0], features[1], 3, padding=1)
    self.fc1 = tnn.Linear(features[1] * (h // 4) * (w // 4), hidden)
    self.fc = tnn.Linear(hidden, num_classes)

  def forward(self, x):
    if self.norm is not None:
      x = self.norm(x)
    x = F.max_pool2d(F.relu(self.conv1(x)), 2)
    x = F.max_pool2d(F.relu(self.conv2(x)), 2)
    return self.fc(F.relu(self.fc1(torch.flatten(x, 1))))


class TorchBasicBlock(tnn.Module):
  """kuangliu / RobustBench ResNet ``BasicBlock`` (post-activation, 1x1 conv
  + BN shortcut when the shape changes)."""

  def __init__(self, in_planes, planes, stride=1):
    super().__init__()
    self.conv1 = tnn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
    self.bn1 = tnn.BatchNorm2d(planes)
    self.conv2 = tnn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = tnn.BatchNorm2d(planes)
    self.shortcut = tnn.Sequential()
    if stride != 1 or in_planes != planes:
      self.shortcut = tnn.Sequential(
          tnn.Conv2d(in_planes, planes, 1, stride, bias=False),
          tnn.BatchNorm2d(planes))

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return F.relu(out + self.shortcut(x))


class TorchPreActBlock(tnn.Module):
  """Pre-activation block: ``a = relu(bn1(x))``, ``conv2(relu(bn2(conv1(a))))
  + shortcut`` with the 1x1 strided shortcut conv, when the shape changes,
  applied to ``a`` (``shortcut_from="preact"``: Rice et al., RobustBench
  ``PreActBlockV2``) or to the raw ``x`` (``"input"``: RobustBench
  ``PreActBlock`` with ``out_shortcut=False``)."""

  def __init__(self, in_planes, planes, stride=1, shortcut_from="preact"):
    super().__init__()
    self.shortcut_from = shortcut_from
    self.bn1 = tnn.BatchNorm2d(in_planes)
    self.conv1 = tnn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
    self.bn2 = tnn.BatchNorm2d(planes)
    self.conv2 = tnn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.shortcut = None
    if stride != 1 or in_planes != planes:
      self.shortcut = tnn.Sequential(
          tnn.Conv2d(in_planes, planes, 1, stride, bias=False))

  def forward(self, x):
    a = F.relu(self.bn1(x))
    src = a if self.shortcut_from == "preact" else x
    shortcut = self.shortcut(src) if self.shortcut is not None else x
    out = self.conv2(F.relu(self.bn2(self.conv1(a))))
    return out + shortcut


class TorchResNet18(tnn.Module):
  """CIFAR-stem ResNet-18 (3x3 conv, no max pool): kuangliu ``ResNet18``
  (``preact=False``, the tsjax ``ResNet18``) or ``PreActResNet18``
  (``preact=True``; ``final_bn`` adds RobustBench's ``bn`` before pooling)."""

  def __init__(self, num_classes=10, width=64, preact=False, final_bn=True,
               in_channels=3, mean=None, std=None, shortcut_from="preact"):
    super().__init__()
    self.preact, self.final_bn = preact, final_bn
    self.norm = _norm(mean, std)
    block = TorchPreActBlock if preact else TorchBasicBlock
    self.conv1 = tnn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
    if not preact:
      self.bn1 = tnn.BatchNorm2d(width)
    in_planes = width
    for s, stride in enumerate((1, 2, 2, 2)):
      planes = width * 2 ** s
      layers = []
      for i in range(2):
        layers.append(block(in_planes, planes, stride if i == 0 else 1,
                            shortcut_from) if preact else
                      block(in_planes, planes, stride if i == 0 else 1))
        in_planes = planes
      setattr(self, f"layer{s + 1}", tnn.Sequential(*layers))
    if preact and final_bn:
      self.bn = tnn.BatchNorm2d(in_planes)
    self.linear = tnn.Linear(in_planes, num_classes)

  def forward(self, x):
    if self.norm is not None:
      x = self.norm(x)
    out = self.conv1(x)
    if not self.preact:
      out = F.relu(self.bn1(out))
    out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
    if self.preact and self.final_bn:
      out = F.relu(self.bn(out))
    return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


class TorchWideBlock(tnn.Module):
  """RobustBench / TRADES WRN ``BasicBlock`` (its logic verbatim)."""

  def __init__(self, in_planes, out_planes, stride):
    super().__init__()
    self.bn1 = tnn.BatchNorm2d(in_planes)
    self.relu1 = tnn.ReLU(inplace=True)
    self.conv1 = tnn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
    self.bn2 = tnn.BatchNorm2d(out_planes)
    self.relu2 = tnn.ReLU(inplace=True)
    self.conv2 = tnn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
    self.equalInOut = in_planes == out_planes
    self.convShortcut = (None if self.equalInOut else tnn.Conv2d(
        in_planes, out_planes, 1, stride, 0, bias=False))

  def forward(self, x):
    if not self.equalInOut:
      x = self.relu1(self.bn1(x))
    else:
      out = self.relu1(self.bn1(x))
    out = self.relu2(self.bn2(self.conv1(out if self.equalInOut else x)))
    out = self.conv2(out)
    return torch.add(x if self.equalInOut else self.convShortcut(x), out)


class TorchNetworkBlock(tnn.Module):

  def __init__(self, nb_layers, in_planes, out_planes, stride):
    super().__init__()
    self.layer = tnn.Sequential(*[
        TorchWideBlock(in_planes if i == 0 else out_planes, out_planes,
                       stride if i == 0 else 1) for i in range(nb_layers)])

  def forward(self, x):
    return self.layer(x)


class TorchWideResNet(tnn.Module):
  """RobustBench / TRADES ``WideResNet`` (``sub_block1``: TRADES' unused
  extra block, present in its checkpoints)."""

  def __init__(self, depth=34, widen_factor=10, num_classes=10,
               sub_block1=False):
    super().__init__()
    ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
    n = (depth - 4) // 6
    self.conv1 = tnn.Conv2d(3, ch[0], 3, 1, 1, bias=False)
    self.block1 = TorchNetworkBlock(n, ch[0], ch[1], 1)
    if sub_block1:
      self.sub_block1 = TorchNetworkBlock(n, ch[0], ch[1], 1)
    self.block2 = TorchNetworkBlock(n, ch[1], ch[2], 2)
    self.block3 = TorchNetworkBlock(n, ch[2], ch[3], 2)
    self.bn1 = tnn.BatchNorm2d(ch[3])
    self.relu = tnn.ReLU(inplace=True)
    self.fc = tnn.Linear(ch[3], num_classes)

  def forward(self, x):
    out = self.block3(self.block2(self.block1(self.conv1(x))))
    out = self.relu(self.bn1(out))
    return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


class TorchSwish(tnn.Module):
  """``x * sigmoid(x)`` (RobustBench's ``Swish``; ``nn.SiLU`` in value)."""

  def forward(self, x):
    return x * torch.sigmoid(x)


class TorchDMBlock(tnn.Module):
  """RobustBench / DM ``_Block``: pre-activation, hand padding before the
  first conv ((1, 1) at stride 1, (0, 1) at stride 2), a 1x1 projection of the
  activated input when the width changes, else the raw input."""

  def __init__(self, in_planes, out_planes, stride, act):
    super().__init__()
    self.batchnorm_0 = tnn.BatchNorm2d(in_planes)
    self.relu_0 = act()
    self.conv_0 = tnn.Conv2d(in_planes, out_planes, 3, stride, 0, bias=False)
    self.batchnorm_1 = tnn.BatchNorm2d(out_planes)
    self.relu_1 = act()
    self.conv_1 = tnn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
    self.has_shortcut = in_planes != out_planes
    self.shortcut = (tnn.Conv2d(in_planes, out_planes, 1, stride, 0,
                                bias=False) if self.has_shortcut else None)
    self.stride = stride

  def forward(self, x):
    a = self.relu_0(self.batchnorm_0(x))
    pad = (1, 1, 1, 1) if self.stride == 1 else (0, 1, 0, 1)
    out = self.conv_0(F.pad(a, pad))
    out = self.conv_1(self.relu_1(self.batchnorm_1(out)))
    return out + (self.shortcut(a) if self.has_shortcut else x)


class TorchDMBlockGroup(tnn.Module):

  def __init__(self, num_blocks, in_planes, out_planes, stride, act):
    super().__init__()
    self.block = tnn.Sequential(*[
        TorchDMBlock(in_planes if i == 0 else out_planes, out_planes,
                     stride if i == 0 else 1, act)
        for i in range(num_blocks)])

  def forward(self, x):
    return self.block(x)


class TorchDMWideResNet(tnn.Module):
  """RobustBench ``DMWideResNet`` (DeepMind's WRN): ``mean`` / ``std``
  buffers, optional input ``padding``, stem ``init_conv``, groups
  ``layer.{0,1,2}``, final ``batchnorm``, ``avg_pool2d(8)`` (so 32x32 inputs
  after padding), ``logits``. ``activation``: ``"swish"`` or ``"relu"``."""

  def __init__(self, num_classes=10, depth=28, width=10, activation="swish",
               mean=(0.4914, 0.4822, 0.4465), std=(0.2471, 0.2435, 0.2616),
               padding=0, in_channels=3):
    super().__init__()
    act = {"swish": TorchSwish, "relu": tnn.ReLU}[activation]
    self.register_buffer("mean", torch.tensor(mean).view(in_channels, 1, 1))
    self.register_buffer("std", torch.tensor(std).view(in_channels, 1, 1))
    self.padding = padding
    ch = [16, 16 * width, 32 * width, 64 * width]
    n = (depth - 4) // 6
    self.init_conv = tnn.Conv2d(in_channels, ch[0], 3, 1, 1, bias=False)
    self.layer = tnn.Sequential(
        TorchDMBlockGroup(n, ch[0], ch[1], 1, act),
        TorchDMBlockGroup(n, ch[1], ch[2], 2, act),
        TorchDMBlockGroup(n, ch[2], ch[3], 2, act))
    self.batchnorm = tnn.BatchNorm2d(ch[3])
    self.relu = act()
    self.logits = tnn.Linear(ch[3], num_classes)
    self.num_channels = ch[3]

  def forward(self, x):
    if self.padding > 0:
      x = F.pad(x, (self.padding,) * 4)
    out = self.init_conv((x - self.mean) / self.std)
    out = self.relu(self.batchnorm(self.layer(out)))
    out = F.avg_pool2d(out, 8)
    return self.logits(out.view(-1, self.num_channels))


class TorchDMPreActBlock(tnn.Module):
  """RobustBench / DM ``_PreActBlock``: ``a = act(batchnorm_0(x))``, DM's hand
  padding ((1, 1) at stride 1, (0, 1) at stride 2) before ``conv_2d_1`` and
  before the **3x3** ``shortcut``, which reads the raw ``x`` and exists when
  the stride or the width changes."""

  def __init__(self, in_planes, out_planes, stride, act):
    super().__init__()
    self.stride = stride
    self.batchnorm_0 = tnn.BatchNorm2d(in_planes)
    self.relu_0 = act()
    self.conv_2d_1 = tnn.Conv2d(in_planes, out_planes, 3, stride, 0, bias=False)
    self.batchnorm_1 = tnn.BatchNorm2d(out_planes)
    self.relu_1 = act()
    self.conv_2d_2 = tnn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
    self.has_shortcut = stride != 1 or in_planes != out_planes
    if self.has_shortcut:
      self.shortcut = tnn.Conv2d(in_planes, out_planes, 3, stride, 0,
                                 bias=False)

  def _pad(self, v):
    return F.pad(v, (1, 1, 1, 1) if self.stride == 1 else (0, 1, 0, 1))

  def forward(self, x):
    out = self.relu_0(self.batchnorm_0(x))
    shortcut = self.shortcut(self._pad(x)) if self.has_shortcut else x
    out = self.conv_2d_2(self.relu_1(self.batchnorm_1(
        self.conv_2d_1(self._pad(out)))))
    return out + shortcut


class TorchDMPreActResNet(tnn.Module):
  """RobustBench ``DMPreActResNet`` (depth 18): ``conv_2d`` stem (no BN),
  ``layer_0..3`` of ``TorchDMPreActBlock`` s, ``batchnorm`` + activation,
  average pool, ``logits``; ``mean`` / ``std`` non-persistent buffers (not in
  the state_dict, as in RobustBench)."""

  def __init__(self, num_classes=10, activation="swish",
               mean=(0.4914, 0.4822, 0.4465), std=(0.2471, 0.2435, 0.2616)):
    super().__init__()
    act = TorchSwish if activation == "swish" else tnn.ReLU
    self.norm = Normalize(mean, std)
    self.conv_2d = tnn.Conv2d(3, 64, 3, 1, 1, bias=False)
    in_planes = 64
    for s, stride in enumerate((1, 2, 2, 2)):
      planes = 64 * 2 ** s
      blocks = [TorchDMPreActBlock(in_planes if i == 0 else planes, planes,
                                   stride if i == 0 else 1, act)
                for i in range(2)]
      setattr(self, f"layer_{s}", tnn.Sequential(*blocks))
      in_planes = planes
    self.batchnorm = tnn.BatchNorm2d(512)
    self.relu = act()
    self.logits = tnn.Linear(512, num_classes)

  def forward(self, x):
    out = self.conv_2d(self.norm(x))
    for s in range(4):
      out = getattr(self, f"layer_{s}")(out)
    out = self.relu(self.batchnorm(out))
    return self.logits(F.adaptive_avg_pool2d(out, 1).flatten(1))
