r"""Adversarial distillation of a student from a frozen teacher (KD, ARD, RSLAD,
IAD, FunMatch, AdvFunMatch) or from a jointly trained peer (PeerAiD).

  python -m experiments.distill --config configs/distill.py:rslad,fashion_mnist \
      --config.teacher.checkpoint=runs/fmnist_teacher --workdir runs/rslad
  python -m experiments.distill --config configs/distill.py:peeraid,fashion_mnist,smoke

The same loop as ``experiments.train`` (validation model selection, EMA / SWA
with batch-norm re-estimation, Orbax resume, JSONL + TensorBoard, progress
bar), with the method's loss from ``tsjax.methods.<method>``; the teacher is
loaded once (``tsjax.train.teachers.load_teacher``), passed to the jitted
step as a constant and never written to the student's checkpoints. The work
dir holds the student only (PeerAiD: student and peer during training; the
``best/`` and SWA entries and ``results.json`` are the student's), so
``experiments.evaluate --config.checkpoint=WORKDIR`` evaluates the student.
Test-set results: clean, PGD-20 and (``eval.autoattack_subset`` > 0)
AutoAttack accuracy of the last, best, EMA and SWA students.
"""

from __future__ import annotations

import os


METHODS = ("kd", "ard", "rslad", "iad", "funmatch", "peeraid", "advfunmatch")
TEACHER_FREE = ("peeraid",)


def validate(config) -> None:
  """Everything checkable before data loading and compiling."""
  from experiments import train
  from tsjax import config_checks as cc
  from tsjax import losses

  train.validate(config, METHODS)
  o = config.method.options
  name = config.method.name
  if name in TEACHER_FREE:
    pass
  else:
    ck, tk = config.teacher.get("checkpoint"), config.teacher.get("torch_checkpoint")
    if bool(ck) == bool(tk):
      raise cc.ConfigError(
          f"method {name!r} needs a teacher: set exactly one of config fields "
          f"'teacher.checkpoint' (work dir of an experiments.train run) and "
          f"'teacher.torch_checkpoint' (a PyTorch state_dict file); got "
          f"{ck!r} and {tk!r}")
    if ck and not os.path.isdir(ck):
      raise cc.ConfigError(f"config field 'teacher.checkpoint': no such "
                           f"directory {ck!r}")
    if ck and not os.path.exists(os.path.join(ck, "config.json")):
      raise cc.ConfigError(f"config field 'teacher.checkpoint': {ck!r} is not "
                           f"a work dir of experiments.train (no config.json)")
    if tk and not os.path.exists(tk):
      raise cc.ConfigError(f"config field 'teacher.torch_checkpoint': no such "
                           f"file {tk!r}")
    cc.check_choice(config, "teacher.which", ("best", "last", "swa"))
  positive = {"kd": ("temperature",), "ard": ("temperature",),
              "iad": ("temperature",), "funmatch": ("temperature",),
              "advfunmatch": ("temperature",), "peeraid": ("tau", "tau_p")}
  for f in positive.get(name, ()):
    cc.check_number(config, f"method.options.{f}", low=0, low_open=True)
  for f in ("alpha", "adv_weight"):
    if f in o:
      cc.check_number(config, f"method.options.{f}", low=0, high=1)
  for f in ("kl_scale", "beta", "mixup_alpha", "clean_weight", "gamma1",
            "gamma2", "lambda1", "lambda2", "lambda3"):
    if f in o:
      cc.check_number(config, f"method.options.{f}", low=0)
  if "begin_epoch" in o:
    cc.check_number(config, "method.options.begin_epoch", low=0, integer=True)
  if "reduction" in o:
    cc.check_choice(config, "method.options.reduction", losses.KL_REDUCTIONS)


def build_distill(config, model, data, key):
  """The ``train.Built`` of a distillation method."""
  from experiments.train import Built, build_attack
  from tsjax import models
  from tsjax.methods import (advfunmatch, ard, funmatch, iad, kd, peeraid,
                             rslad)
  from tsjax.methods.distill import teacher_ctx
  from tsjax.train import classifier as clf
  from tsjax.train.teachers import load_teacher

  name, o = config.method.name, config.method.options
  attack = build_attack(config)
  init = lambda k: clf.init_model(model, k, data.image_shape)
  if name == "peeraid":
    w = peeraid.PeerAiDWeights(**{f: o[f] for f in (
        "tau", "tau_p", "gamma1", "gamma2", "lambda1", "lambda2", "lambda3",
        "reduction")})
    params, ms = peeraid.init_pair(init, key)
    return Built(peeraid.make_loss(model, model, attack, w), params, ms,
                 view=peeraid.student_view)

  normalize = bool(config.model.get("normalize", True))
  teacher, t_params, t_state = load_teacher(
      config.teacher, num_classes=data.num_classes,
      mean=data.mean if normalize else (0.0,),
      std=data.std if normalize else (1.0,), input_shape=data.image_shape)
  models.check_input_shape(teacher, data.image_shape)
  params, ms = init(key)
  if name == "kd":
    loss = kd.make_loss(model, teacher, alpha=o.alpha,
                        temperature=o.temperature, reduction=o.reduction)
  elif name == "ard":
    loss = ard.make_loss(model, teacher, attack, alpha=o.alpha,
                         temperature=o.temperature, reduction=o.reduction)
  elif name == "rslad":
    loss = rslad.make_loss(model, teacher, attack, adv_weight=o.adv_weight,
                           kl_scale=o.kl_scale)
  elif name == "iad":
    loss = iad.make_loss(model, teacher, attack, temperature=o.temperature,
                         beta=o.beta, begin_epoch=int(o.begin_epoch))
  elif name == "funmatch":
    loss = funmatch.make_loss(model, teacher, temperature=o.temperature,
                              mixup_alpha=o.mixup_alpha, reduction=o.reduction)
  elif name == "advfunmatch":
    loss = advfunmatch.make_loss(model, teacher, attack,
                                 temperature=o.temperature,
                                 clean_weight=o.clean_weight)
  else:
    raise ValueError(f"unknown distillation method {name!r}; expected one of "
                     f"{METHODS}")
  return Built(loss, params, ms, ctx=teacher_ctx(t_params, t_state))


def run(config, workdir: str, **kwargs):
  from experiments import train
  validate(config)
  return train.run(config, workdir, build=build_distill, methods=METHODS,
                   **kwargs)


if __name__ == "__main__":
  from experiments import common
  common.launch("distill", run, "configs/distill.py",
                "Experiment config (ml_collections file with "
                "':method,dataset[,smoke]').",
                default_variant="rslad,fashion_mnist")
