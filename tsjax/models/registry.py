"""The model registry: name -> constructor, the options a config may set,
compute precisions and input-shape checks (re-exported by ``tsjax.models``;
its own module so that ``tsjax.models.torch_convert`` can build models by
name without importing the package it belongs to)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from tsjax.models.cnn import SmallCNN
from tsjax.models.dm_wide_resnet import DMPreActResNet, DMWideResNet
from tsjax.models.mlp import MLP
from tsjax.models.mobilenet import MobileNetV2
from tsjax.models.resnet import PreActResNet18, ResNet18
from tsjax.models.wide_resnet import WideResNet


def _preset(cls, general: str, **fixed) -> Callable[..., nn.Module]:
  """A constructor for ``cls`` with some fields fixed (overriding them fails;
  the error points to the registry name ``general`` that takes them)."""

  def build(**kwargs):
    clash = sorted(set(kwargs) & set(fixed))
    if clash:
      raise ValueError(f"this preset fixes {', '.join(clash)} "
                       f"({fixed}); use {general!r} to choose them")
    return cls(**fixed, **kwargs)

  build.model_class = cls
  build.fixed = fixed
  return build


REGISTRY = {
    "mlp": MLP,
    "small_cnn": SmallCNN,
    "preact_resnet18": PreActResNet18,
    "resnet18": ResNet18,
    "wide_resnet": WideResNet,
    "wrn34_10": _preset(WideResNet, "wide_resnet", depth=34, widen_factor=10),
    "wrn28_10": _preset(WideResNet, "wide_resnet", depth=28, widen_factor=10),
    "mobilenet_v2": MobileNetV2,
    "dm_wide_resnet": DMWideResNet,
    "dm_preact_resnet": DMPreActResNet,
    "dm_preact_resnet18": _preset(DMPreActResNet, "dm_preact_resnet", depth=18),
    **{f"dm_wrn{d}_{k}": _preset(DMWideResNet, "dm_wide_resnet", depth=d,
                                 widen_factor=k)
       for d, k in ((28, 10), (34, 10), (34, 20), (70, 16), (106, 16))},
}


def model_class(name: str) -> type:
  """The Flax module class a registry name builds (presets included)."""
  entry = REGISTRY[name]
  return getattr(entry, "model_class", entry)


# Fields set from the data (class count, normalisation) or by the caller's
# numerics, not by a config's ``model.kwargs``.
NOT_OPTIONS = ("num_classes", "mean", "std", "dtype", "param_dtype")


def default_options(name: str) -> dict:
  """``{option: default}`` of a registry name's architecture options (plain
  values: numbers, strings, booleans, tuples), so a config can list them all
  and each is overridable from the command line."""
  out = {}
  for f in dataclasses.fields(model_class(name)):
    if (f.name in model_options(name) and f.name not in NOT_OPTIONS
        and f.default is not dataclasses.MISSING
        and isinstance(f.default, (bool, int, float, str, tuple))):
      out[f.name] = f.default
  return out


def model_options(name: str) -> list[str]:
  """The constructor options of a registry name (a preset's fixed ones
  left out)."""
  entry = REGISTRY[name]
  cls = model_class(name)
  fixed = getattr(entry, "fixed", {})
  return [f.name for f in dataclasses.fields(cls)
          if f.init and f.name not in ("parent", "name") and f.name not in fixed]


# Compute precisions a config may name (``train.compute_dtype``,
# ``eval.compute_dtype``): activations and matmuls / convolutions run in it;
# parameters, batch-norm statistics and logits stay float32.
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def with_compute_dtype(model: nn.Module, name: str) -> nn.Module:
  """``model`` computing in ``COMPUTE_DTYPES[name]`` (float32 parameters).

  The same parameters serve both versions: ``param_dtype`` is unchanged, so
  a bfloat16 training model and its float32 evaluation twin share one
  parameter tree. Models without a ``dtype`` field (the MLP) are returned
  as they are for ``"float32"`` and refused otherwise."""
  if name not in COMPUTE_DTYPES:
    raise ValueError(f"unknown compute dtype {name!r}; expected one of "
                     f"{sorted(COMPUTE_DTYPES)}")
  fields = {f.name for f in dataclasses.fields(model)}
  if "dtype" not in fields:
    if name == "float32":
      return model
    raise ValueError(f"{type(model).__name__} has no compute dtype")
  dtype = None if name == "float32" else COMPUTE_DTYPES[name]
  return model if model.dtype == dtype else model.clone(dtype=dtype)


def get_model(name: str, **kwargs):
  """Builds a model by registry name; unknown names or options raise ValueError."""
  if name not in REGISTRY:
    raise ValueError(f"unknown model {name!r}; known models: {sorted(REGISTRY)}")
  fixed = getattr(REGISTRY[name], "fixed", {})  # overrides: the preset says
  unknown = sorted(set(kwargs) - set(model_options(name)) - set(fixed) - {"name"})
  if unknown:
    raise ValueError(f"model {name!r} has no option(s) {unknown}; its options: "
                     f"{model_options(name)}")
  return REGISTRY[name](**kwargs)


def check_input_shape(model: str | nn.Module, shape: Sequence[int],
                      **kwargs: Any) -> None:
  """Raises ValueError (naming the expected shape) unless ``model`` takes ``shape``.

  ``model`` is a registry name (built with ``kwargs``, e.g. ``mean`` for the
  channel count) or a model instance; ``shape`` is ``(H, W, C)`` or
  ``(N, H, W, C)`` for image models and ``(N, d)`` for the MLP. Rules:

  * ``small_cnn``: H and W multiples of 2**len(features) (4 by default) and at
    least that, e.g. 28x28x1 or 32x32x3;
  * ``preact_resnet18``, ``resnet18``, ``mobilenet_v2``: H, W >= 8 (their total
    stride), designed for 32x32x3;
  * ``wide_resnet`` / ``wrn*``: H, W >= 4 (total stride), designed for 32x32x3;
  * ``dm_wide_resnet`` / ``dm_wrn*``: H + 2 * padding and W + 2 * padding
    multiples of 4, designed for 32x32x3 (3 channels with the default
    CIFAR-10 mean / std);
  * every image model: C equals the number of per-channel ``mean`` / ``std``
    entries when they have more than one.
  """
  if isinstance(model, str):
    if model == "mlp":
      shape = tuple(shape)
      if len(shape) != 2 or shape[1] < 1:
        raise ValueError(f"mlp expects inputs of shape (N, d), got {shape}")
      return
    model = get_model(model, **kwargs)
  elif kwargs:
    raise ValueError("kwargs are only used with a registry name")
  if isinstance(model, MLP):
    return check_input_shape("mlp", shape)
  check = getattr(model, "check_input_shape", None)
  if check is None:
    raise ValueError(f"no input-shape rule for {type(model).__name__}")
  check(shape)
