"""Small CNN for 28x28 / 32x32 images, and the input handling every image model shares.

All image models in ``tsjax.models`` take NHWC float images in ``[0, 1]`` and
normalise them *inside* the model, ``(x - mean) / std`` per channel, so that
attacks always work in pixel space. ``mean`` / ``std`` are tuples with one
entry per channel, or a single entry broadcast over all channels; the defaults
``(0.0,)`` / ``(1.0,)`` are the identity. Dataset presets (CIFAR-10/100,
Fashion-MNIST) are passed by the caller.

Every image model has the signature
``__call__(x, train: bool = False, return_hidden: bool = False)`` and, with
``return_hidden=True``, returns ``(logits, hiddens)`` where ``hiddens`` is a
tuple of post-activation feature maps (NHWC) with the penultimate pooled /
flattened features ``[N, D]`` as its last entry. Each model also has a
``check_input_shape(shape)`` method (wrapped by
``tsjax.models.check_input_shape``) that raises a ValueError naming the
expected ``HxWxC`` for shapes the model cannot take; ``__call__`` runs the same
check at trace time, i.e. before anything compiles.

``SmallCNN`` (CPU-fast; Fashion-MNIST / CIFAR sized inputs)::

  conv1 3x3 (32, bias, pad 1) - ReLU - maxpool 2x2
  conv2 3x3 (64, bias, pad 1) - ReLU - maxpool 2x2
  flatten (NHWC order) - fc1 dense(128) - ReLU - fc dense(num_classes)

  hiddens = (conv1 block [N, H/2, W/2, 32], conv2 block [N, H/4, W/4, 64],
             fc1 [N, 128])         # each after ReLU and (for convs) pooling

  input rule: NHWC float, H and W divisible by 2**len(features) (4 by
  default), H, W >= that; e.g. 28x28x1 or 32x32x3.

Parameter paths: ``conv1/{kernel,bias}``, ``conv2/...``, ``fc1/...``,
``fc/...``. Note for weight conversion: ``fc1``'s kernel rows follow the NHWC
flatten order (h, w, c), not PyTorch's (c, h, w).

Max pooling is ``max_pool_2x2`` (reshape + max), not ``nn.max_pool``: XLA CPU's
reduce-window backward pass (select-and-scatter) is very slow.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np


def max_pool_2x2(x: jnp.ndarray) -> jnp.ndarray:
  """Non-overlapping 2x2 max pooling of NHWC ``x`` (H, W even) via reshape+max.

  Equal to ``nn.max_pool(x, (2, 2), strides=(2, 2))`` in value, and in gradient
  wherever the maximum of each window is unique.
  """
  n, h, w, c = x.shape
  if h % 2 or w % 2:
    raise ValueError(f"max_pool_2x2 needs even H and W, got shape {x.shape}")
  return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def check_wrn_shape(model: str, depth, widen_factor, depths: str) -> None:
  """WideResNet depth ``6n + 4`` (n >= 1) and a positive integer width."""
  if int(depth) != depth or depth < 10 or (depth - 4) % 6:
    raise ValueError(f"{model} depth must be 6n + 4 with n >= 1 ({depths}), "
                     f"got {depth!r}")
  if int(widen_factor) != widen_factor or widen_factor < 1:
    raise ValueError(f"{model} widen_factor must be a positive integer, got "
                     f"{widen_factor!r}")


def check_norm(model: str, mean: Sequence[float], std: Sequence[float]) -> None:
  """Validates the per-channel normalisation fields of an image model."""
  mean, std = tuple(mean), tuple(std)
  if len(mean) == 0 or len(std) == 0:
    raise ValueError(f"{model}: mean and std need at least one entry "
                     f"(got mean={mean}, std={std})")
  if len(mean) != len(std) and 1 not in (len(mean), len(std)):
    raise ValueError(f"{model}: mean has {len(mean)} entries but std has "
                     f"{len(std)}; give one per channel (or one for all)")
  if any(not float(s) > 0 for s in std):
    raise ValueError(f"{model}: every std entry must be > 0, got {std}")


def check_image_shape(model: str, shape: Sequence[int], *, multiple: int,
                      min_size: int, mean: Sequence[float] = (0.0,),
                      std: Sequence[float] = (1.0,),
                      example: str = "32x32x3", batched: bool = False) -> None:
  """Raises ValueError unless ``shape`` is an image ``model`` can take.

  ``shape`` is ``(H, W, C)`` or ``(N, H, W, C)`` (``batched=True`` requires
  the latter). H and W must be multiples of ``multiple`` and at least
  ``min_size``; C must match ``mean`` / ``std`` where they have more than one
  entry.
  """
  shape = tuple(int(s) for s in shape)
  if batched and len(shape) != 4:
    raise ValueError(f"{model} expects a batch of NHWC images [N, H, W, C] "
                     f"(each HxWxC, e.g. {example}); got shape {shape}")
  if len(shape) not in (3, 4):
    raise ValueError(f"{model} expects images of shape HxWxC (or NxHxWxC), "
                     f"e.g. {example}; got shape {shape}")
  h, w, c = shape[-3:]
  channels = max(len(tuple(mean)), len(tuple(std)))
  c_txt = str(channels) if channels > 1 else "C"
  rule = (f"H and W multiples of {multiple} and at least {min_size}"
          if multiple > 1 else f"H and W at least {min_size}")
  if h < min_size or w < min_size or h % multiple or w % multiple:
    raise ValueError(f"{model} cannot take input of shape {shape}: expected "
                     f"HxWx{c_txt} images with {rule} (e.g. {example}); got "
                     f"{h}x{w}x{c}")
  if c < 1 or (channels > 1 and c != channels):
    raise ValueError(f"{model} cannot take input of shape {shape}: its "
                     f"mean/std have {channels} entries, so it expects "
                     f"HxWx{channels} images; got {h}x{w}x{c}")


def prepare_images(x, mean, std) -> jnp.ndarray:
  """Checks ``x`` is a float array and returns ``(x - mean) / std``."""
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"image models expect float images in [0, 1], got dtype "
                     f"{x.dtype} (convert, e.g. x.astype(jnp.float32) / 255)")
  mean_a = np.asarray(mean, dtype=np.float64)
  std_a = np.asarray(std, dtype=np.float64)
  if np.all(mean_a == 0) and np.all(std_a == 1):
    return x
  return (x - jnp.asarray(mean_a, x.dtype)) / jnp.asarray(std_a, x.dtype)


class SmallCNN(nn.Module):
  """Two conv-ReLU-pool blocks and a two-layer head (see the module docstring).

  Attributes:
    num_classes: number of logits.
    mean, std: per-channel normalisation applied inside the model.
    features: conv widths, one 3x3 conv + ReLU + 2x2 max-pool per entry.
    hidden: width of the penultimate dense layer.
    dtype, param_dtype: computation / parameter dtypes.
  """
  num_classes: int = 10
  mean: Sequence[float] = (0.0,)
  std: Sequence[float] = (1.0,)
  features: Sequence[int] = (32, 64)
  hidden: int = 128
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    check_norm(type(self).__name__, self.mean, self.std)
    super().__post_init__()

  @nn.nowrap
  def check_input_shape(self, shape, batched: bool = False) -> None:
    """H and W divisible by 2**len(features) (4 by default), C = len(mean)."""
    m = 2 ** len(self.features)
    check_image_shape("SmallCNN", shape, multiple=m, min_size=m,
                      mean=self.mean, std=self.std, batched=batched,
                      example="28x28x1 or 32x32x3")

  @nn.compact
  def __call__(self, x, train: bool = False, return_hidden: bool = False):
    del train  # no batch norm or dropout; accepted for a uniform interface
    self.check_input_shape(x.shape, batched=True)
    x = prepare_images(x, self.mean, self.std)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    hiddens = []
    for i, f in enumerate(self.features):
      x = nn.Conv(f, (3, 3), padding=((1, 1), (1, 1)), name=f"conv{i + 1}",
                  **kw)(x)
      x = max_pool_2x2(nn.relu(x))
      hiddens.append(x)
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.hidden, name="fc1", **kw)(x))
    hiddens.append(x)
    logits = nn.Dense(self.num_classes, name="fc", **kw)(x)
    if return_hidden:
      return logits, tuple(hiddens)
    return logits
