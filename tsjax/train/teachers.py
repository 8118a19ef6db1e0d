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


def load_teacher(tcfg, *, num_classes: int, mean, std, input_shape=None):
  """``(model, params, model_state)`` of a frozen teacher from a ``teacher``
  config block: ``checkpoint`` (a tsjax work dir, with ``which``) or
  ``torch_checkpoint`` (a PyTorch state_dict file, ``.pt``/``.pth``/``.npz``;
  ``model.name`` / ``model.kwargs`` name the architecture, ``sha256`` the
  expected file checksum; ``input_shape`` (H, W, C) the data's)."""
  from tsjax import models

  ckpt = tcfg.get("checkpoint")
  torch_ckpt = tcfg.get("torch_checkpoint")
  if bool(ckpt) == bool(torch_ckpt):
    raise cc.ConfigError("set exactly one of config fields "
                         "'teacher.checkpoint' (a tsjax work dir of "
                         "experiments.train) and 'teacher.torch_checkpoint' "
                         f"(a PyTorch state_dict); got {ckpt!r} and "
                         f"{torch_ckpt!r}")
  if ckpt:
    if not os.path.isdir(ckpt):
      raise FileNotFoundError(f"config field 'teacher.checkpoint': no such "
                              f"directory {ckpt!r}")
    model, params, ms, cfg = load_run(ckpt, tcfg.get("which", "best"))
    t_classes = model.num_classes
  else:
    name = cc.get_field(tcfg, "model.name")
    if name not in models.REGISTRY:
      raise cc.ConfigError(f"config field 'teacher.model.name' must be one of "
                           f"{sorted(models.REGISTRY)}, got {name!r}")
    model = models.get_model(name, num_classes=num_classes, mean=mean, std=std,
                             **tcfg.model.kwargs.to_dict())
    sd = torch_convert.load_torch_state_dict(torch_ckpt,
                                             sha256=tcfg.get("sha256") or None)
    params, ms = torch_convert.convert_state_dict(sd, model,
                                                  input_shape=input_shape)
    t_classes = num_classes
  if t_classes != num_classes:
    raise ValueError(f"the teacher has {t_classes} classes but the data set "
                     f"has {num_classes}")
  params = jax.tree.map(jnp.asarray, params)
  ms = jax.tree.map(jnp.asarray, ms)
  return model, params, ms
