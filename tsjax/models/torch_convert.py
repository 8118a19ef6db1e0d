"""PyTorch state_dict -> Flax variables for the tsjax image models.

Converts checkpoints of the PyTorch networks the adversarial-robustness
literature (RobustBench, TRADES, Rice et al., kuangliu/pytorch-cifar) uses as
teachers into ``(params, model_state)`` for the matching tsjax model, so that
``model.apply({"params": params, **model_state}, x)`` computes the same logits
(eval mode) as the PyTorch network on the same images. Supported models and
the PyTorch key names they expect (``s`` = 1..4, ``g`` = 1..3, ``i`` = block):

  registry name / class          PyTorch keys (``.weight`` etc. omitted)
  ``resnet18`` ResNet18          conv1, bn1, layer{s}.{i}.{conv1,bn1,conv2,bn2},
                                 layer{s}.0.shortcut.{0,1} (where the shape
                                 changes), linear   (kuangliu ``resnet.py``,
                                 RobustBench ``ResNet18``)
  ``preact_resnet18``            conv1, layer{s}.{i}.{bn1,conv1,bn2,conv2},
    PreActResNet18               layer{s}.0.shortcut.0, bn (``final_bn=True``,
                                 the default: Rice et al.; ``final_bn=False``
                                 for kuangliu's ``preact_resnet.py`` and
                                 RobustBench's ``bn_before_fc=False``), linear.
                                 ``shortcut_from="input"``: RobustBench's
                                 ``PreActBlock`` (1x1 shortcut from the raw
                                 block input; same key names, so only the
                                 option tells them apart); ``"preact"``
                                 (default): kuangliu, ``PreActBlockV2``
  ``dm_preact_resnet18``,        conv_2d, layer_{s-1}.{i}.{batchnorm_0,
    ``dm_preact_resnet``         conv_2d_1, batchnorm_1, conv_2d_2},
    DMPreActResNet               layer_{s-1}.0.shortcut (where the shape
                                 changes), batchnorm, logits (RobustBench
                                 ``DMPreActResNet``: Rebuffi et al. 2021 R18s;
                                 no mean / std in the state_dict)
  ``wrn34_10``, ``wrn28_10``,    conv1, block{g}.layer.{i}.{bn1,conv1,bn2,conv2},
    ``wide_resnet`` WideResNet   block{g}.layer.0.convShortcut, bn1, fc
                                 (TRADES / RobustBench ``WideResNet``; TRADES'
                                 unused ``sub_block1.*`` keys are dropped)
  ``dm_wrn28_10``,               init_conv, layer.{g-1}.block.{i}.{batchnorm_0,
    ``dm_wrn70_16`` (also        conv_0, batchnorm_1, conv_1},
    ``dm_wrn34_10``,             layer.{g-1}.block.0.shortcut (where the width
    ``dm_wrn34_20``,             changes), batchnorm, logits; optional buffers
    ``dm_wrn106_16``),           mean, std ``[C, 1, 1]`` (RobustBench
    ``dm_wide_resnet``           ``DMWideResNet``: Gowal et al. 2020, Rebuffi
    DMWideResNet                 et al. 2021 and the models built on their code)
  ``small_cnn`` SmallCNN         conv1, conv2 (, conv3, ...), fc1, fc

Conversion rules: conv weights OIHW -> HWIO, linear weights ``(out, in)`` ->
``(in, out)``, BN ``weight``/``bias`` -> params ``scale``/``bias`` and
``running_mean``/``running_var`` -> ``batch_stats`` ``mean``/``var``
(``num_batches_tracked`` is ignored). ``SmallCNN``'s ``fc1`` rows are permuted
from PyTorch's ``(c, h, w)`` flatten order to the NHWC ``(h, w, c)`` order,
which needs the input's height and width (``input_shape``; inferred from
``fc1`` for square inputs). Values are cast to the model's ``param_dtype``.
The tsjax batch norms use PyTorch's epsilon (1e-5), so eval-mode outputs agree
to float32 rounding (momentum only matters in training: 0.9 = PyTorch's 0.1,
DMWideResNet 0.99 = DM's training decay).

``ROBUSTBENCH`` maps RobustBench CIFAR-10 entry names to the registry name and
options (block variant, ``final_bn``, normalisation); ``robustbench_model``
looks one up (``teacher.robustbench`` in the training configs).

DeepMind's WideResNet keeps its normalisation in the state_dict as buffers
``mean`` / ``std``. They are optional (some RobustBench files lack them) but,
when present, must equal the model's ``mean`` / ``std`` fields (default DM's
CIFAR-10 values) to 1e-6 relative, else a ValueError names both and the
option to pass (CIFAR-100 checkpoints need ``CIFAR100_MEAN`` /
``CIFAR100_STD``); ``convert_torch_checkpoint`` with a registry name and no
``mean`` / ``std`` takes them from the buffers.

Matching is strict: any missing key, unexpected key or shape mismatch raises a
ValueError that names the model, its parameter count and every offending key
(with both shapes), plus hints where the mismatch looks like a wrong option
(``num_classes``, ``width``, ``final_bn``, WRN depth / widen factor). The result
is checked against ``jax.eval_shape(model.init, ...)`` (structure, shapes and
dtypes).

**Normalisation.** tsjax models take images in [0, 1] and apply
``(x - mean) / std`` inside (``tsjax.models.cnn``). Pass the ``mean`` / ``std``
the PyTorch pipeline applied before the network: RobustBench models take [0, 1]
inputs, so a RobustBench network without its own normalisation layer needs
the defaults ``mean=(0.0,)``, ``std=(1.0,)``; a network trained on
``transforms.Normalize(mean, std)``-ed inputs (or wrapped in a normalising
module, whose buffers then show up as unexpected keys: drop them with
``ignore``) needs those ``mean`` / ``std``. The converted weights are the same
either way; only the model's fields differ.

Example::

  from tsjax.models import convert_torch_checkpoint
  model, params, state = convert_torch_checkpoint(
      "Rice2020Overfitting.pt", "wrn34_10", sha256="...")
  logits = model.apply({"params": params, **state}, images)   # NHWC in [0, 1]

PyTorch is imported only by ``load_torch_state_dict`` for ``.pt`` / ``.pth``
files (``.npz`` files and in-memory dicts need no PyTorch).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Mapping
from typing import Any, Iterable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tsjax.models.cnn import SmallCNN
from tsjax.models.dm_wide_resnet import (CIFAR10_MEAN, CIFAR10_STD,
                                         DMPreActResNet, DMWideResNet)
from tsjax.models.registry import get_model
from tsjax.models.resnet import PreActResNet18, ResNet18
from tsjax.models.wide_resnet import WideResNet

CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "net")
SUPPORTED = (ResNet18, PreActResNet18, WideResNet, DMWideResNet,
             DMPreActResNet, SmallCNN)
# DeepMind's models: their normalisation is part of the model, and a
# checkpoint may lack it (DMPreActResNet's buffers are never saved).
DM_MODELS = (DMWideResNet, DMPreActResNet)

# RobustBench CIFAR-10 entries (robustbench/model_zoo/cifar10.py) whose
# architecture tsjax builds: entry name -> (registry name, model kwargs).
# The PreAct ResNet-18s differ only where the key names cannot tell:
# PreActBlock takes its shortcut from the raw input (resnet.py:121-144),
# PreActBlockV2 from relu(bn1(x)) (resnet.py:147-169); bn_before_fc
# (resnet.py:200-230, False by default) is tsjax's final_bn.
_RB_MU_SIGMA = dict(mean=CIFAR10_MEAN, std=CIFAR10_STD)   # their mu / sigma
_DM_R18 = ("dm_preact_resnet18", dict(activation="swish", mean=CIFAR10_MEAN,
                                      std=CIFAR10_STD))
ROBUSTBENCH = {
    # cifar10.py:405-407: PreActResNet(PreActBlock, [2, 2, 2, 2]), [0, 1] inputs
    "Andriushchenko2020Understanding": ("preact_resnet18", dict(
        shortcut_from="input", final_bn=False, mean=(0.0,), std=(1.0,))),
    # cifar10.py:137-151, 464-466: PreActBlock, mu / sigma buffers
    "Wong2020Fast": ("preact_resnet18", dict(
        shortcut_from="input", final_bn=False, **_RB_MU_SIGMA)),
    # cifar10.py:216-230, 954-956 (L2): PreActBlockV2, bn_before_fc=True
    "Rice2020Overfitting_L2": ("preact_resnet18", dict(
        shortcut_from="preact", final_bn=True, **_RB_MU_SIGMA)),
    # cifar10.py:252-266: PreActBlockV2, bn_before_fc=True (corruptions)
    "Kireev2021Effectiveness": ("preact_resnet18", dict(
        shortcut_from="preact", final_bn=True, **_RB_MU_SIGMA)),
    # cifar10.py:634-742, 1045-1066: DMPreActResNet(depth=18, Swish,
    # CIFAR10_MEAN / CIFAR10_STD)
    **{name: _DM_R18 for name in (
        "Rebuffi2021Fixing_R18_ddpm", "Rebuffi2021Fixing_R18_cutmix_ddpm",
        "Rade2021Helper_R18_extra", "Rade2021Helper_R18_ddpm",
        "Gowal2021Improving_R18_ddpm_100m")},
}
# Buffers of RobustBench's normalising subclasses (mu / sigma, [1, C, 1, 1]).
ROBUSTBENCH_IGNORE = {"Wong2020Fast": ("mu", "sigma"),
                      "Rice2020Overfitting_L2": ("mu", "sigma"),
                      "Kireev2021Effectiveness": ("mu", "sigma")}


def robustbench_model(entry: str) -> tuple[str, dict, tuple]:
  """``(registry name, model kwargs, keys to ignore)`` of a RobustBench
  CIFAR-10 entry; a ValueError lists the known entries."""
  if entry not in ROBUSTBENCH:
    raise ValueError(f"no tsjax architecture is known for the RobustBench "
                     f"entry {entry!r}; known: {sorted(ROBUSTBENCH)} (or give "
                     f"the model name and kwargs yourself)")
  name, kwargs = ROBUSTBENCH[entry]
  return name, dict(kwargs), ROBUSTBENCH_IGNORE.get(entry, ())
# DMWideResNet's normalisation buffers: optional, checked against the model.
NORM_BUFFERS = ("mean", "std")
_MAX_LISTED = 25


# ------------------------------------------------------------------ loading
def compute_sha256(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
  """Hex SHA-256 digest of the file at ``path`` (read in chunks)."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(chunk_size), b""):
      digest.update(chunk)
  return digest.hexdigest()


def verify_sha256(path: str | os.PathLike, sha256: str) -> str:
  """Checks the file's SHA-256; returns the digest, raises ValueError if wrong.

  ``sha256`` is the full hex digest or a prefix of at least 8 hex digits
  (torch.hub's file-name convention); case is ignored.
  """
  expected = str(sha256).strip().lower()
  if not re.fullmatch(r"[0-9a-f]{8,64}", expected):
    raise ValueError(f"sha256 must be a hex digest (or a prefix of at least 8 "
                     f"hex digits), got {sha256!r}")
  actual = compute_sha256(path)
  if not actual.startswith(expected):
    raise ValueError(f"SHA-256 mismatch for {os.fspath(path)!r}: expected "
                     f"{expected}, got {actual} (corrupt or wrong file?)")
  return actual


def _to_numpy(value: Any, key: str) -> np.ndarray:
  """A torch tensor / numpy array / number -> numpy array (no torch import)."""
  if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor
    t = value.detach().cpu()
    if t.is_floating_point() and str(t.dtype) not in ("torch.float32",
                                                      "torch.float64"):
      t = t.float()  # float16 / bfloat16: numpy has no bfloat16
    return t.numpy()
  if isinstance(value, (np.ndarray, np.generic, int, float)) or (
      hasattr(value, "__array__") and not isinstance(value, Mapping)):
    return np.asarray(value)
  raise ValueError(f"state_dict entry {key!r} is a {type(value).__name__}, "
                   f"not a tensor or array")


def _unwrap(obj: Any) -> Any:
  """Unwraps checkpoint containers ({'state_dict': ...}, whole modules)."""
  for _ in range(8):
    if not isinstance(obj, Mapping) and callable(getattr(obj, "state_dict",
                                                         None)):
      obj = obj.state_dict()  # a pickled nn.Module
      continue
    if isinstance(obj, Mapping):
      inner = [k for k in CONTAINER_KEYS if isinstance(obj.get(k), Mapping)
               or (k in obj and callable(getattr(obj[k], "state_dict", None)))]
      if inner:
        obj = obj[inner[0]]
        continue
    break
  return obj


def _clean(state_dict: Mapping, strip_prefixes: Sequence[str]) -> dict:
  """Unwraps containers, strips prefixes, converts values to numpy."""
  state_dict = _unwrap(state_dict)
  if not isinstance(state_dict, Mapping):
    raise ValueError(f"expected a state_dict (a mapping of names to tensors) "
                     f"or a checkpoint dict holding one under "
                     f"{list(CONTAINER_KEYS)}; got {type(state_dict).__name__}")
  out = {}
  for key, value in state_dict.items():
    name = str(key)
    stripped = True
    while stripped:
      stripped = False
      for prefix in strip_prefixes:
        if prefix and name.startswith(prefix):
          name, stripped = name[len(prefix):], True
    if name in out:
      raise ValueError(f"state_dict key {key!r} collides with another key "
                       f"after stripping prefixes {list(strip_prefixes)}")
    out[name] = _to_numpy(value, str(key))
  return out


def load_torch_state_dict(path: str | os.PathLike, sha256: str | None = None,
                          *, strip_prefixes: Sequence[str] = ("module.",),
                          weights_only: bool = True) -> dict[str, np.ndarray]:
  """Loads a PyTorch checkpoint (or ``.npz``) as ``{name: numpy array}``.

  Args:
    path: a ``torch.save`` file (``.pt`` / ``.pth`` / ``.ckpt`` / ...) or a
      ``.npz`` file whose array names are the state_dict keys (e.g. written
      by ``save_state_dict_npz``); ``.npz`` needs no PyTorch.
    sha256: expected hex SHA-256 of the file (or a prefix of >= 8 hex
      digits); checked before anything is unpickled; a mismatch raises a
      ValueError naming the expected and the actual digest.
    strip_prefixes: prefixes removed from every key that has them, repeatedly
      (``module.`` from ``nn.DataParallel``; add e.g. ``"model."`` for
      wrapped networks).
    weights_only: passed to ``torch.load``. Keep True (no arbitrary code runs);
      False only for trusted files that pickle other objects.

  Checkpoint dicts are unwrapped (``state_dict``, ``model_state_dict``,
  ``model``, ``net`` keys, nested, and pickled modules); float16/bfloat16
  tensors become float32.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no checkpoint file at {path!r}")
  if sha256 is not None:
    verify_sha256(path, sha256)
  if path.lower().endswith(".npz"):
    with np.load(path, allow_pickle=False) as data:
      return _clean({k: data[k] for k in data.files}, strip_prefixes)
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(
        f"loading the PyTorch checkpoint {path!r} needs PyTorch: "
        f"`pip install torch` (CPU build suffices), or convert it to .npz "
        f"elsewhere with tsjax.models.torch_convert.save_state_dict_npz") from e
  try:
    obj = torch.load(path, map_location="cpu", weights_only=weights_only)
  except Exception as e:  # pickle.UnpicklingError and friends
    if weights_only and "weights_only" in str(e):
      raise ValueError(
          f"torch.load(weights_only=True) refused {path!r} (it pickles "
          f"objects other than tensors): {e}\nIf you trust the file, pass "
          f"weights_only=False.") from e
    raise
  return _clean(obj, strip_prefixes)


def save_state_dict_npz(state_dict: Mapping, path: str | os.PathLike) -> None:
  """Writes a state_dict (torch tensors or arrays) as ``.npz`` with its keys."""
  arrays = _clean(state_dict, ())
  np.savez(path, **arrays)


# ---------------------------------------------------------------- key maps
# DeepMind models (RobustBench dm_wide_resnet.py): top-level names, the tsjax
# block-name pattern, per-block names and the PyTorch block path.
_DM_NAMES = {
    DMPreActResNet: (
        {"stem_conv": "conv_2d", "final_bn": "batchnorm", "fc": "logits"},
        r"layer(\d+)_(\d+)",
        {"bn1": "batchnorm_0", "conv1": "conv_2d_1", "bn2": "batchnorm_1",
         "conv2": "conv_2d_2", "shortcut_conv": "shortcut"},
        "layer_{group}.{block}.{sub}"),
    DMWideResNet: (
        {"stem_conv": "init_conv", "final_bn": "batchnorm", "fc": "logits"},
        r"block(\d+)_(\d+)",
        {"bn1": "batchnorm_0", "conv1": "conv_0", "bn2": "batchnorm_1",
         "conv2": "conv_1", "shortcut_conv": "shortcut"},
        "layer.{group}.block.{block}.{sub}"),
}


def _torch_prefix(model: nn.Module, path: tuple[str, ...]) -> str:
  """PyTorch module name of the Flax submodule at ``path``."""
  if isinstance(model, SmallCNN):
    if len(path) == 1:
      return path[0]
  elif isinstance(model, (ResNet18, PreActResNet18)):
    top = {"stem_conv": "conv1", "stem_bn": "bn1", "final_bn": "bn",
           "fc": "linear"}
    if len(path) == 1 and path[0] in top:
      return top[path[0]]
    m = re.fullmatch(r"layer(\d+)_(\d+)", path[0])
    if len(path) == 2 and m:
      sub = {"shortcut_conv": "shortcut.0",
             "shortcut_bn": "shortcut.1"}.get(path[1], path[1])
      return f"layer{m[1]}.{m[2]}.{sub}"
  elif isinstance(model, WideResNet):
    top = {"stem_conv": "conv1", "final_bn": "bn1", "fc": "fc"}
    if len(path) == 1 and path[0] in top:
      return top[path[0]]
    m = re.fullmatch(r"block(\d+)_(\d+)", path[0])
    if len(path) == 2 and m:
      sub = {"shortcut_conv": "convShortcut"}.get(path[1], path[1])
      return f"block{m[1]}.layer.{m[2]}.{sub}"
  elif isinstance(model, (DMPreActResNet, DMWideResNet)):
    top, block, sub, fmt = _DM_NAMES[type(model)]
    if len(path) == 1 and path[0] in top:
      return top[path[0]]
    m = re.fullmatch(block, path[0])
    if len(path) == 2 and m and path[1] in sub:
      return fmt.format(group=int(m[1]) - 1, block=m[2], sub=sub[path[1]])
  raise AssertionError(f"no PyTorch name for {type(model).__name__} "
                       f"submodule {'/'.join(path)}")


def _describe(model: nn.Module, name: str | None = None) -> str:
  fields = {
      ResNet18: ("num_classes", "width"),
      PreActResNet18: ("num_classes", "width", "final_bn", "shortcut_from"),
      DMPreActResNet: ("depth", "num_classes", "activation"),
      WideResNet: ("depth", "widen_factor", "num_classes"),
      DMWideResNet: ("depth", "widen_factor", "num_classes", "activation"),
      SmallCNN: ("num_classes", "features", "hidden"),
  }
  cls = type(model)
  opts = ", ".join(f"{f}={getattr(model, f)!r}"
                   for f in fields.get(cls, ()))
  text = f"{cls.__name__}({opts})"
  return f"{name!r} model {text}" if name else text


def _build_model(model: str | nn.Module, model_kwargs: dict):
  if isinstance(model, str):
    return get_model(model, **model_kwargs), model
  if model_kwargs:
    raise ValueError(f"model options {sorted(model_kwargs)} are only used "
                     f"with a registry name; got a model instance")
  if not isinstance(model, nn.Module):
    raise ValueError(f"model must be a registry name or a Flax module, got "
                     f"{type(model).__name__}")
  return model, None


def _check_supported(model: nn.Module, name: str | None) -> None:
  if not isinstance(model, SUPPORTED):
    raise ValueError(
        f"no PyTorch converter for {name or type(model).__name__}; supported: "
        f"'resnet18', 'preact_resnet18', 'wrn34_10' / 'wrn28_10' / "
        f"'wide_resnet', 'dm_wrn28_10' / 'dm_wrn70_16' / ... / "
        f"'dm_wide_resnet', 'dm_preact_resnet18' / 'dm_preact_resnet', "
        f"'small_cnn'")


def _input_shape(model: nn.Module, input_shape, state_dict=None):
  """(1, H, W, C) to initialise ``model`` with (see ``convert_state_dict``)."""
  if input_shape is not None:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 3:
      shape = (1,) + shape
    if len(shape) != 4:
      raise ValueError(f"input_shape must be (H, W, C) or (N, H, W, C), got "
                       f"{tuple(input_shape)}")
    return (1,) + shape[1:]
  state_dict = state_dict or {}
  channels = max(len(tuple(model.mean)), len(tuple(model.std)))
  if channels == 1:
    w = state_dict.get("conv1.weight")
    channels = int(w.shape[1]) if w is not None and w.ndim == 4 else 3
  side = 32
  if isinstance(model, SmallCNN):
    w = state_dict.get("fc1.weight")
    last = int(tuple(model.features)[-1])
    if w is not None and w.ndim == 2 and w.shape[1] % last == 0:
      cells = w.shape[1] // last
      root = math.isqrt(cells)
      if root * root == cells:
        side = root * 2 ** len(tuple(model.features))
  return (1, side, side, channels)


def _spec(model: nn.Module, input_shape):
  """``[(torch_key, collection, flax_path, kind, torch_shape, leaf)]`` and the
  abstract variables of ``model`` for inputs of ``input_shape``."""
  abstract = jax.eval_shape(model.init, jax.random.key(0),
                            jax.ShapeDtypeStruct(input_shape, jnp.float32))
  entries = []
  for collection, tree in abstract.items():
    if collection not in ("params", "batch_stats"):
      raise AssertionError(f"unexpected variable collection {collection!r}")
    for kpath, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      path = tuple(k.key for k in kpath)
      prefix = _torch_prefix(model, path[:-1])
      leaf_name = path[-1]
      shape = tuple(leaf.shape)
      if collection == "batch_stats":
        kind, suffix = "vector", {"mean": "running_mean",
                                  "var": "running_var"}[leaf_name]
        tshape = shape
      elif leaf_name == "scale":
        kind, suffix, tshape = "vector", "weight", shape
      elif leaf_name == "bias":
        kind, suffix, tshape = "vector", "bias", shape
      elif leaf_name == "kernel" and len(shape) == 4:
        kind, suffix = "conv", "weight"
        tshape = (shape[3], shape[2], shape[0], shape[1])
      elif leaf_name == "kernel" and len(shape) == 2:
        kind, suffix, tshape = "dense", "weight", (shape[1], shape[0])
        if isinstance(model, SmallCNN) and path[0] == "fc1":
          kind = "dense_chw"
      else:
        raise AssertionError(f"unexpected leaf {'/'.join(path)} {shape}")
      entries.append((f"{prefix}.{suffix}", collection, path, kind, tshape,
                      leaf))
  return entries, abstract


def torch_state_dict_shapes(model: str | nn.Module, *,
                            input_shape: Sequence[int] | None = None,
                            **model_kwargs) -> dict[str, tuple[int, ...]]:
  """``{PyTorch key: shape}`` a checkpoint for ``model`` must contain.

  ``num_batches_tracked`` buffers (optional) are not listed; DMWideResNet's
  ``mean`` / ``std`` buffers (optional too) are, as ``(C, 1, 1)``.
  ``input_shape`` as for ``convert_state_dict`` (default 32x32, C from
  ``mean``/``std`` or 3).
  """
  model, name = _build_model(model, model_kwargs)
  _check_supported(model, name)
  shape_in = _input_shape(model, input_shape)
  entries, _ = _spec(model, shape_in)
  shapes = {key: tshape for key, _, _, _, tshape, _ in entries}
  if isinstance(model, DMWideResNet):
    shapes.update({k: (shape_in[-1], 1, 1) for k in NORM_BUFFERS})
  return shapes


def _convert_value(value: np.ndarray, kind: str, model: nn.Module,
                   input_shape) -> np.ndarray:
  if kind == "conv":
    return np.transpose(value, (2, 3, 1, 0))
  if kind == "dense":
    return value.T
  if kind == "dense_chw":  # rows (c, h, w) -> (h, w, c)
    scale = 2 ** len(tuple(model.features))
    h, w = input_shape[1] // scale, input_shape[2] // scale
    out, flat = value.shape
    c = flat // (h * w)
    return value.reshape(out, c, h, w).transpose(2, 3, 1, 0).reshape(
        h * w * c, out)
  return value


def _listing(keys: Iterable[str]) -> str:
  keys = sorted(keys)
  shown = ", ".join(keys[:_MAX_LISTED])
  more = f", ... and {len(keys) - _MAX_LISTED} more" if len(
      keys) > _MAX_LISTED else ""
  return f"[{shown}{more}]"


def _hints(model: nn.Module, name: str | None, sd: dict, missing: set,
           unexpected: set, shapes: dict) -> list[str]:
  hints = []
  head = {"fc.weight", "linear.weight"}
  for key in head & set(sd):
    if sd[key].ndim == 2 and sd[key].shape[0] != model.num_classes:
      hints.append(f"the checkpoint has {sd[key].shape[0]} classes: pass "
                   f"num_classes={sd[key].shape[0]}")
  if isinstance(model, PreActResNet18):
    if "bn.weight" in unexpected and not model.final_bn:
      hints.append("the checkpoint has a final BN ('bn.*', Rice et al. / "
                   "RobustBench): use final_bn=True")
    if "bn.weight" in missing and model.final_bn:
      hints.append("the checkpoint has no final BN (kuangliu "
                   "preact_resnet.py): use final_bn=False")
  if isinstance(model, (PreActResNet18, ResNet18)):
    if isinstance(model, PreActResNet18) and "bn1.weight" in unexpected:
      hints.append("a stem BN ('bn1.*') suggests a post-activation ResNet: "
                   "try 'resnet18'")
    if isinstance(model, ResNet18) and "bn1.weight" in missing and (
        "layer1.0.bn1.weight" in sd):
      hints.append("no stem BN ('bn1.*') suggests a pre-activation ResNet: "
                   "try 'preact_resnet18'")
    w = sd.get("conv1.weight")
    if w is not None and w.ndim == 4 and w.shape[0] != model.width:
      hints.append(f"the checkpoint's stem has {w.shape[0]} channels: pass "
                   f"width={w.shape[0]}")
  if isinstance(model, WideResNet):
    blocks = {int(m[1]) for k in sd
              if (m := re.match(r"block1\.layer\.(\d+)\.", k))}
    w = sd.get("block1.layer.0.conv1.weight")
    if blocks and w is not None and w.ndim == 4 and w.shape[0] % 16 == 0:
      depth, k = 6 * (max(blocks) + 1) + 4, w.shape[0] // 16
      if (depth, k) != (model.depth, model.widen_factor):
        hints.append(f"the checkpoint looks like WideResNet-{depth}-{k}: use "
                     f"'wide_resnet' with depth={depth}, widen_factor={k}")
  if isinstance(model, DMWideResNet):
    blocks = {int(m[1]) for k in sd
              if (m := re.match(r"layer\.0\.block\.(\d+)\.", k))}
    w = sd.get("layer.0.block.0.conv_0.weight")
    if blocks and w is not None and w.ndim == 4 and w.shape[0] % 16 == 0:
      depth, k = 6 * (max(blocks) + 1) + 4, w.shape[0] // 16
      if (depth, k) != (model.depth, model.widen_factor):
        hints.append(f"the checkpoint looks like DMWideResNet-{depth}-{k}: "
                     f"use 'dm_wide_resnet' with depth={depth}, "
                     f"widen_factor={k}")
  elif any(k == "init_conv.weight" or k.startswith("layer.0.block.")
           for k in unexpected):
    hints.append("'init_conv' / 'layer.*.block.*' keys are DeepMind's "
                 "WideResNet's (RobustBench DMWideResNet): try "
                 "'dm_wrn28_10', 'dm_wrn70_16' or 'dm_wide_resnet'")
  if isinstance(model, SmallCNN) and "fc1.weight" in shapes:
    hints.append("SmallCNN's fc1 size depends on the input size: pass "
                 "input_shape=(H, W, C) of the images the network was "
                 "trained on")
  if any(k.startswith(("module.", "model.", "0.", "1.")) for k in unexpected):
    hints.append("keys carry a wrapper prefix: strip it (load_torch_state_"
                 "dict(strip_prefixes=...)) or drop wrapper keys with ignore")
  if not isinstance(model, WideResNet) and any(
      k.startswith("block1.layer.") for k in unexpected):
    hints.append("'block*.layer.*' keys are a WideResNet's: try 'wrn34_10' "
                 "or 'wide_resnet'")
  if isinstance(model, (WideResNet, DMWideResNet)) and any(
      k.startswith("layer1.") for k in unexpected):
    hints.append("'layer*.*' keys are a ResNet's: try 'resnet18' or "
                 "'preact_resnet18'")
  return hints


def buffer_values(value: np.ndarray) -> tuple[float, ...]:
  """A ``[C, 1, 1]`` buffer as floats, each the shortest decimal that rounds
  to the stored float32 (``0.4914``, not ``0.49140000343...``)."""
  flat = np.asarray(value).reshape(-1)
  if flat.dtype == np.float32:
    return tuple(float(str(v)) for v in flat)
  return tuple(float(v) for v in flat)


def _check_norm_buffers(model: nn.Module, name: str | None,
                        norm: Mapping[str, np.ndarray]) -> None:
  """Checkpoint ``mean`` / ``std`` buffers == the model's fields (rtol 1e-6)."""
  bad = []
  for key in NORM_BUFFERS:
    if key not in norm:
      continue
    got = np.asarray(norm[key], np.float64).reshape(-1)
    want = np.asarray(getattr(model, key), np.float64).reshape(-1)
    if want.size not in (1, got.size) or got.size == 0 or not np.allclose(
        got, np.broadcast_to(want, got.shape), rtol=1e-6, atol=0.0):
      bad.append(key)
  if bad:
    found = ", ".join(f"{k}={buffer_values(norm[k])}" for k in NORM_BUFFERS
                      if k in norm)
    raise ValueError(
        f"the state_dict's normalisation buffers ({found}) differ from the "
        f"{'/'.join(bad)} of {_describe(model, name)} (mean={tuple(model.mean)},"
        f" std={tuple(model.std)}); build the model with the checkpoint's "
        f"values: pass {found} (RobustBench's DM CIFAR-100 models use "
        f"CIFAR100_MEAN / CIFAR100_STD), or drop the buffers with "
        f"ignore=('mean', 'std') if the model normalises otherwise")


def convert_state_dict(state_dict: Mapping, model: str | nn.Module, *,
                       input_shape: Sequence[int] | None = None,
                       ignore: Sequence[str] = (),
                       strip_prefixes: Sequence[str] = ("module.",),
                       **model_kwargs) -> tuple[dict, dict]:
  """Converts a PyTorch state_dict to ``(params, model_state)`` for ``model``.

  Args:
    state_dict: ``{key: torch tensor or numpy array}`` (e.g. from
      ``load_torch_state_dict`` or ``net.state_dict()``); checkpoint
      containers are unwrapped and ``module.`` prefixes stripped as in
      ``load_torch_state_dict``.
    model: a registry name (``"resnet18"``, ``"preact_resnet18"``,
      ``"wrn34_10"``, ``"wrn28_10"``, ``"wide_resnet"``, ``"small_cnn"``),
      built with ``model_kwargs`` (e.g. ``final_bn=False``, ``num_classes``,
      ``mean``/``std``: see the module docstring on normalisation), or a
      model instance (then no ``model_kwargs``).
    input_shape: ``(H, W, C)`` the model will see; only ``small_cnn``'s fc1
      depends on H, W. Default: C from ``mean``/``std`` when per-channel,
      else from ``conv1.weight``; H = W = 32, or for ``small_cnn`` the square
      size that fits ``fc1.weight``.
    ignore: key names or prefixes (ending in ``.``) to drop before matching,
      e.g. a normalising wrapper's buffers. WideResNets always drop TRADES'
      unused ``sub_block1.``. DMWideResNet's ``mean`` / ``std`` buffers are
      checked against the model's fields (see the module docstring).
    strip_prefixes: as for ``load_torch_state_dict``.

  Returns:
    ``(params, model_state)``: ``model_state`` is ``{"batch_stats": ...}``
    for the BN models and ``{}`` for ``small_cnn``; use
    ``model.apply({"params": params, **model_state}, x)``.

  Raises:
    ValueError: listing missing keys, unexpected keys and shape mismatches
      (PyTorch's shape vs the expected one), naming the model and its
      parameter count, with hints for likely wrong options; or naming
      DMWideResNet normalisation buffers that differ from ``mean`` / ``std``.
  """
  model, name = _build_model(model, model_kwargs)
  _check_supported(model, name)
  sd = _clean(state_dict, strip_prefixes)
  drop = tuple(ignore) + (("sub_block1.",) if isinstance(model, WideResNet)
                          else ())
  sd = {k: v for k, v in sd.items()
        if not any(k == d or (d.endswith(".") and k.startswith(d))
                   for d in drop)}
  norm = ({k: sd.pop(k) for k in NORM_BUFFERS if k in sd}
          if isinstance(model, DMWideResNet) else {})
  shape_in = _input_shape(model, input_shape, sd)
  entries, abstract = _spec(model, shape_in)
  expected = {e[0]: e for e in entries}
  bn_modules = {k[:-len(".running_mean")] for k in expected
                if k.endswith(".running_mean")}
  given = {k for k in sd
           if not (k.endswith(".num_batches_tracked")
                   and k[:-len(".num_batches_tracked")] in bn_modules)}
  missing = set(expected) - given
  unexpected = given - set(expected)
  mismatched = {k: (tuple(sd[k].shape), expected[k][4])
                for k in set(expected) & given
                if tuple(sd[k].shape) != expected[k][4]}
  if missing or unexpected or mismatched:
    n_params = sum(math.prod(l.shape)
                   for l in jax.tree.leaves(abstract["params"]))
    n_stats = len(expected) - len(jax.tree.leaves(abstract["params"]))
    parts = [f"the state_dict does not match {_describe(model, name)} "
             f"({n_params:,} parameters in "
             f"{len(jax.tree.leaves(abstract['params']))} tensors"
             f"{f' + {n_stats} BN statistics' if n_stats else ''}; "
             f"input {shape_in[1:]}); the state_dict has {len(sd)} keys"]
    if missing:
      parts.append(f"{len(missing)} missing key(s): {_listing(missing)}")
    if unexpected:
      parts.append(f"{len(unexpected)} unexpected key(s): "
                   f"{_listing(unexpected)}")
    if mismatched:
      items = [f"{k}: checkpoint {s} vs expected {e}"
               for k, (s, e) in sorted(mismatched.items())]
      more = (f"\n  ... and {len(items) - _MAX_LISTED} more"
              if len(items) > _MAX_LISTED else "")
      parts.append(f"{len(items)} shape mismatch(es):\n  "
                   + "\n  ".join(items[:_MAX_LISTED]) + more)
    hints = _hints(model, name, sd, missing, unexpected, mismatched)
    if hints:
      parts.insert(1, "hint: " + "; ".join(hints))
    raise ValueError("\n".join(parts))
  _check_norm_buffers(model, name, norm)

  variables: dict = {}
  for key, collection, path, kind, _, leaf in entries:
    value = _convert_value(sd[key], kind, model, shape_in)
    if not np.issubdtype(value.dtype, np.floating):
      raise ValueError(f"state_dict entry {key!r} has dtype {value.dtype}; "
                       f"expected floating point")
    node = variables.setdefault(collection, {})
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = jnp.asarray(np.ascontiguousarray(value), leaf.dtype)
  # The result must have exactly model.init's structure, shapes and dtypes.
  got = jax.tree.map(lambda a: (a.shape, a.dtype), variables)
  want = jax.tree.map(lambda a: (a.shape, a.dtype), abstract)
  if jax.tree.structure(variables) != jax.tree.structure(abstract) or (
      jax.tree.leaves(got) != jax.tree.leaves(want)):
    raise AssertionError("converted variables do not match model.init")
  params = variables.pop("params")
  return params, variables


def convert_torch_checkpoint(path: str | os.PathLike, model: str | nn.Module,
                             sha256: str | None = None, *,
                             input_shape: Sequence[int] | None = None,
                             ignore: Sequence[str] = (),
                             strip_prefixes: Sequence[str] = ("module.",),
                             weights_only: bool = True, **model_kwargs):
  """``load_torch_state_dict`` + ``convert_state_dict``.

  Returns ``(model, params, model_state)`` with ``model`` the Flax module
  (built from the registry name and ``model_kwargs``, or the one passed).
  A DMWideResNet built from a registry name without ``mean`` / ``std`` takes
  them from the checkpoint's ``mean`` / ``std`` buffers when it has both
  (else DM's CIFAR-10 defaults).
  """
  sd = load_torch_state_dict(path, sha256, strip_prefixes=strip_prefixes,
                             weights_only=weights_only)
  module, _ = _build_model(model, model_kwargs)
  if (isinstance(model, str) and isinstance(module, DMWideResNet)
      and not set(NORM_BUFFERS) & set(model_kwargs)
      and all(k in sd and k not in ignore for k in NORM_BUFFERS)):
    model_kwargs = dict(model_kwargs, **{k: buffer_values(sd[k])
                                         for k in NORM_BUFFERS})
    module, _ = _build_model(model, model_kwargs)
  params, state = convert_state_dict(
      sd, model, input_shape=input_shape, ignore=ignore,
      strip_prefixes=strip_prefixes, **model_kwargs)
  return module, params, state


__all__ = [
    "compute_sha256", "verify_sha256", "load_torch_state_dict",
    "save_state_dict_npz", "convert_state_dict", "convert_torch_checkpoint",
    "torch_state_dict_shapes", "robustbench_model", "buffer_values",
    "ROBUSTBENCH", "DM_MODELS",
]
