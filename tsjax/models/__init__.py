"""Flax linen models and a name -> constructor registry.

Registry names (``get_model(name, **kwargs)``):

  ``mlp``              MLP(widths, outputs, ...)            teacher / student
  ``small_cnn``        SmallCNN(num_classes, mean, std, features, hidden)
  ``preact_resnet18``  PreActResNet18(num_classes, mean, std, width, final_bn,
                       shortcut_from)
  ``resnet18``         ResNet18(num_classes, mean, std, width)
  ``wide_resnet``      WideResNet(depth, widen_factor, dropout, num_classes, mean, std)
  ``wrn34_10``         WideResNet with depth=34, widen_factor=10 fixed
  ``wrn28_10``         WideResNet with depth=28, widen_factor=10 fixed
  ``mobilenet_v2``     MobileNetV2(num_classes, mean, std, activation)
  ``dm_wide_resnet``   DMWideResNet(depth, widen_factor, num_classes, mean, std,
                       activation, padding, bn_momentum): DeepMind's WRN
                       (Gowal et al. 2020 / Rebuffi et al. 2021, RobustBench
                       ``DMWideResNet``; Swish, CIFAR-10 mean/std by default)
  ``dm_wrn28_10``, ``dm_wrn34_10``, ``dm_wrn34_20``, ``dm_wrn70_16``,
  ``dm_wrn106_16``     DMWideResNet with depth / widen_factor fixed
  ``dm_preact_resnet`` DMPreActResNet(depth, num_classes, mean, std, activation,
                       padding, bn_momentum): DeepMind's PreAct ResNet-18/34
                       (RobustBench ``DMPreActResNet``, its R18 teachers)
  ``dm_preact_resnet18`` DMPreActResNet with depth=18

Every image model also takes ``dtype`` / ``param_dtype``, expects NHWC float
images in [0, 1] (normalised inside with ``mean`` / ``std``) and is called as
``apply(variables, x, train=False, return_hidden=False)``; see
``tsjax.models.cnn`` for the shared conventions. ``check_input_shape(name or
model, shape)`` raises a ValueError naming the expected HxWxC when a model
cannot take a shape, before anything is traced.

PyTorch checkpoints (RobustBench / TRADES / kuangliu key names) of
``resnet18``, ``preact_resnet18``, ``wrn*`` / ``wide_resnet``, ``dm_wrn*`` /
``dm_wide_resnet`` and ``small_cnn`` convert with ``load_torch_state_dict`` +
``convert_state_dict`` (or ``convert_torch_checkpoint``); see
``tsjax.models.torch_convert``. PyTorch is imported only when a ``.pt`` file is
loaded.
"""

from __future__ import annotations

from tsjax.models.cnn import SmallCNN, max_pool_2x2
from tsjax.models.dm_wide_resnet import (CIFAR10_MEAN, CIFAR10_STD,
                                         CIFAR100_MEAN, CIFAR100_STD,
                                         DMPreActResNet, DMWideResNet)
from tsjax.models.mlp import MLP, student_widths, check_student_widths
from tsjax.models.mobilenet import MobileNetV2
from tsjax.models.resnet import PreActResNet18, ResNet18
from tsjax.models.wide_resnet import WideResNet
from tsjax.models.registry import (COMPUTE_DTYPES, NOT_OPTIONS, REGISTRY,
                                   check_input_shape, default_options,
                                   get_model, model_class, model_options,
                                   with_compute_dtype)
from tsjax.models.torch_convert import (compute_sha256, convert_state_dict,
                                        convert_torch_checkpoint,
                                        load_torch_state_dict,
                                        save_state_dict_npz,
                                        torch_state_dict_shapes)


__all__ = [
    "MLP", "SmallCNN", "PreActResNet18", "ResNet18", "WideResNet",
    "MobileNetV2", "DMWideResNet", "DMPreActResNet", "CIFAR10_MEAN", "CIFAR10_STD",
    "CIFAR100_MEAN", "CIFAR100_STD", "REGISTRY", "get_model", "model_class",
    "default_options", "model_options", "COMPUTE_DTYPES", "NOT_OPTIONS",
    "with_compute_dtype",
    "check_input_shape",
    "max_pool_2x2", "student_widths", "check_student_widths",
    "compute_sha256", "load_torch_state_dict", "save_state_dict_npz",
    "convert_state_dict", "convert_torch_checkpoint",
    "torch_state_dict_shapes",
]
