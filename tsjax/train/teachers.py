"""Loading trained classifiers: as frozen teachers for distillation, or for
evaluation.

``load_run(run_dir, which)`` reads the work dir of ``experiments.train`` or
``experiments.distill`` (``config.json`` + Orbax checkpoints) and returns the
model and its variables; ``load_teacher(teacher_config, ...)`` does the same
from a ``teacher`` config block, or converts a PyTorch checkpoint
(``tsjax.models.torch_convert``). The teacher's variables are handed to the
distillation step through ``ctx`` (``tsjax.methods.distill.teacher_ctx``), so
they are never trained and never written into the student's checkpoints.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections

from tsjax import config_checks as cc
from tsjax import models
from tsjax.data import images
from tsjax.models import torch_convert
from tsjax.train.checkpoint import CheckpointStore

WHICH = ("best", "last", "swa")


def _student_of(params, model_state):
  """Runs that train several networks (PeerAiD: student + peer) checkpoint a
  joint tree; the classifier of the run is the student."""
  if isinstance(params, dict) and set(params) == {"student", "peer"}:
    return params["student"], (model_state or {}).get("student", {})
  return params, model_state or {}


def run_config(run_dir: str):
  path = os.path.join(run_dir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{run_dir!r} is not a work dir of experiments.train or "
        f"experiments.distill (no config.json there)")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def model_from_config(cfg, num_classes: int | None = None):
  """The Flax model of a run config (data-set normalisation inside)."""
  data_dir = cfg.data.get("data_dir")  # tfds:NAME data sets are read there
  mean, std = images.dataset_stats(cfg.data.name, data_dir)
  if not cfg.model.get("normalize", True):
    mean, std = (0.0,), (1.0,)
  num_classes = num_classes or images.dataset_num_classes(cfg.data.name,
                                                          data_dir)
  # config.json stores tuples as lists; modules must stay hashable (jit
  # static arguments, the compiled-attack caches).
  kwargs = {k: tuple(v) if isinstance(v, list) else v
            for k, v in cfg.model.kwargs.to_dict().items()}
  return models.get_model(cfg.model.name, num_classes=num_classes, mean=mean,
                          std=std, **kwargs)


def load_run(run_dir: str, which: str = "best"):
  """``(model, params, model_state, config)`` of a finished (or killed) run.

  ``which``: ``"best"`` (validation-selected), ``"last"`` (the latest
  epoch's checkpoint) or ``"swa"`` (the SWA average, when the run kept one).
  """
  if which not in WHICH:
    raise cc.ConfigError(f"'which' must be one of {WHICH}, got {which!r}")
  cfg = run_config(run_dir)
  model = model_from_config(cfg)
  if which == "best":
    store = CheckpointStore(os.path.join(run_dir, "best"), max_to_keep=1)
    if store.latest_step() is None:
      store.close()
      raise FileNotFoundError(f"no best/ checkpoint in {run_dir} (the run had "
                              f"no validation split?); use which='last'")
    tree = store.restore_raw()
    params, ms = tree["params"], tree.get("model_state") or {}
  else:
    store = CheckpointStore(os.path.join(run_dir, "checkpoints"))
    if store.latest_step() is None:
      store.close()
      raise FileNotFoundError(f"no checkpoints/ in {run_dir}")
    tree = store.restore_raw()
    if which == "swa":
      swa = tree.get("swa") or {}
      if not swa or int(swa.get("count", 0)) == 0:
        store.close()
        raise FileNotFoundError(f"{run_dir} has no SWA average (SWA off, or "
                                f"not started yet)")
      params, ms = swa["params"], swa.get("model_state") or {}
    else:
      params, ms = _student_of(tree["state"]["params"],
                               tree["state"].get("model_state"))
  store.close()
  return model, params, ms, cfg


def _teacher_norm(tcfg, model_cls, sd, student_mean, student_std,
                  entry_kwargs: dict):
  """The teacher's ``(mean, std)``: ``teacher.mean`` / ``teacher.std`` when
  given; else a RobustBench entry's; else a DeepMind model's checkpoint
  buffers; else the student's normalisation. A DeepMind model without any of
  these is refused: its normalisation is part of the network, and guessing it
  from the student's ``normalize`` computes wrong logits without an error."""
  mean, std = tcfg.get("mean"), tcfg.get("std")
  if (mean is None) != (std is None):
    raise cc.ConfigError("set both config fields 'teacher.mean' and "
                         f"'teacher.std' or neither; got mean={mean!r}, "
                         f"std={std!r}")
  if mean is not None:
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)
  if "mean" in entry_kwargs:
    return entry_kwargs["mean"], entry_kwargs["std"]
  if issubclass(model_cls, torch_convert.DM_MODELS):
    if all(k in sd for k in torch_convert.NORM_BUFFERS):
      return tuple(torch_convert.buffer_values(sd[k])
                   for k in torch_convert.NORM_BUFFERS)
    raise cc.ConfigError(
        f"config fields 'teacher.mean' / 'teacher.std': the DeepMind model "
        f"{tcfg.model.name!r} normalises inside the network and this "
        f"checkpoint has no mean / std buffers; give the values it was "
        f"trained with (CIFAR-10: "
        f"--config.teacher.mean='{models.CIFAR10_MEAN}' "
        f"--config.teacher.std='{models.CIFAR10_STD}'), or name its "
        f"RobustBench entry in 'teacher.robustbench'")
  return tuple(student_mean), tuple(student_std)


def _torch_teacher(tcfg, *, num_classes: int, mean, std, input_shape):
  """A teacher converted from a PyTorch state_dict (see ``load_teacher``)."""
  entry = tcfg.get("robustbench")
  if entry:
    try:
      name, kwargs, ignore = torch_convert.robustbench_model(entry)
    except ValueError as e:
      raise cc.ConfigError(f"config field 'teacher.robustbench': {e}") from None
  else:
    name, ignore = cc.get_field(tcfg, "model.name"), ()
    if name not in models.REGISTRY:
      raise cc.ConfigError(f"config field 'teacher.model.name' must be one of "
                           f"{sorted(models.REGISTRY)}, got {name!r}")
    kwargs = tcfg.model.kwargs.to_dict()
  entry_norm = {k: kwargs.pop(k) for k in ("mean", "std") if k in kwargs}
  sha256 = tcfg.get("sha256") or None
  try:
    sd = torch_convert.load_torch_state_dict(tcfg.torch_checkpoint,
                                             sha256=sha256)
  except ValueError as e:
    field = "sha256" if sha256 and "sha" in str(e).lower() else (
        "torch_checkpoint")
    raise cc.ConfigError(f"config field 'teacher.{field}': {e}") from None
  t_mean, t_std = _teacher_norm(tcfg, models.model_class(name), sd, mean, std,
                                entry_norm)
  arch = "robustbench" if entry else "model"
  try:
    model = models.get_model(name, num_classes=num_classes, mean=t_mean,
                             std=t_std, **kwargs)
    params, ms = torch_convert.convert_state_dict(
        sd, model, input_shape=input_shape, ignore=ignore)
  except ValueError as e:    # the checkpoint is not this architecture
    raise cc.ConfigError(f"config field 'teacher.{arch}' ({name}): "
                         f"{e}") from None
  return model, params, ms


def load_teacher(tcfg, *, num_classes: int, mean, std, input_shape=None):
  """``(model, params, model_state)`` of a frozen teacher from a ``teacher``
  config block: ``checkpoint`` (a tsjax work dir, with ``which``) or
  ``torch_checkpoint`` (a PyTorch state_dict file, ``.pt``/``.pth``/``.npz``;
  ``sha256`` the expected file checksum; ``input_shape`` (H, W, C) the
  data's). A PyTorch teacher's architecture is ``robustbench`` (a RobustBench
  CIFAR-10 entry name, ``torch_convert.ROBUSTBENCH``: picks the model, its
  block variant and normalisation; ``model`` is then not read) or
  ``model.name`` / ``model.kwargs``; its
  input normalisation ``mean`` / ``std`` when given, else the entry's, else
  a DeepMind checkpoint's buffers, else the student's ``mean`` / ``std``."""
  ckpt = tcfg.get("checkpoint")
  torch_ckpt = tcfg.get("torch_checkpoint")
  if bool(ckpt) == bool(torch_ckpt):
    raise cc.ConfigError("set exactly one of config fields "
                         "'teacher.checkpoint' (a tsjax work dir of "
                         "experiments.train) and 'teacher.torch_checkpoint' "
                         f"(a PyTorch state_dict); got {ckpt!r} and "
                         f"{torch_ckpt!r}")
  if ckpt:
    for field in ("robustbench", "mean", "std"):
      if tcfg.get(field) is not None:
        raise cc.ConfigError(
            f"config field 'teacher.{field}' applies to a PyTorch teacher "
            f"('teacher.torch_checkpoint'); a tsjax work dir records its "
            f"own architecture and normalisation: leave it None")
    if not os.path.isdir(ckpt):
      raise FileNotFoundError(f"config field 'teacher.checkpoint': no such "
                              f"directory {ckpt!r}")
    model, params, ms, cfg = load_run(ckpt, tcfg.get("which", "best"))
    t_classes = model.num_classes
  else:
    model, params, ms = _torch_teacher(tcfg, num_classes=num_classes,
                                       mean=mean, std=std,
                                       input_shape=input_shape)
    t_classes = num_classes
  if t_classes != num_classes:
    raise ValueError(f"the teacher has {t_classes} classes but the data set "
                     f"has {num_classes}")
  params = jax.tree.map(jnp.asarray, params)
  ms = jax.tree.map(jnp.asarray, ms)
  return model, params, ms
