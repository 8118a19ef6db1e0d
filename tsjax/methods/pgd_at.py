"""PGD adversarial training (Madry et al. 2018), spec §4.1.

``make_loss``: image classification. ``make_ts_loss``: teacher–student
regression (Yang et al. regime (b)): each input is replaced by
``x + delta*`` where ``delta*`` maximises the teacher–student squared error
inside the eps-ball (PGD, random start); the target at ``x + delta*`` is the
teacher's output *there* (the teacher is an oracle).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from tsjax import config_checks as cc
from tsjax import losses
from tsjax.attacks import AttackSpec
from tsjax.methods.common import accuracy, ce_attack, forward
from tsjax.methods.registry import Method
from tsjax.methods.teacher_student import (Networks, regression_loss,
                                           worst_case_inputs)


def make_ts_loss(nets: Networks, attack: AttackSpec):
  def loss_fn(params, model_state, batch, key, ctx):
    x_adv = worst_case_inputs(nets, params, ctx, batch["x"], key, attack)
    loss = regression_loss(nets, params, ctx, x_adv)
    return loss, ({"loss": loss}, model_state)
  return loss_fn


@dataclasses.dataclass(frozen=True)
class Options:
  # A train-mode pass on the clean batch that only updates the batch-norm
  # running statistics (no loss term). Rice et al. train_cifar.py:339 runs
  # ``output = model(normalize(X))`` in train mode after ``opt.step()`` (for
  # its logged clean accuracy), so its batch statistics enter the running
  # averages; here the pass runs inside the loss, with the parameters before
  # the step (the one difference).
  clean_bn_pass: bool = False

  def __post_init__(self):
    cc.require(self, "clean_bn_pass", isinstance(self.clean_bn_pass, bool),
               "True or False")


def make_loss(model, *, teacher=None, attack: AttackSpec,
              options: Options = Options()):
  """Image classification (Madry et al.): mean CE at PGD-CE adversarial
  examples, the model in train mode for the loss and in ``attack.bn_mode``
  while attacking (``"train"``: every attack step updates the running
  statistics, as Rice et al.'s ``model.train()`` attack does);
  ``options.clean_bn_pass`` adds a clean train-mode pass after the loss's.
  ``batch = {"image", "label"}``.
  """
  del teacher
  clean_bn_pass = options.clean_bn_pass

  def loss_fn(params, model_state, batch, key, ctx):
    del ctx
    x, y = batch["image"], batch["label"]
    x_adv, model_state = ce_attack(model, params, model_state, x, y, key,
                                   attack)
    logits, model_state = forward(model, params, model_state, x_adv, train=True)
    loss = jnp.mean(losses.cross_entropy(logits, y))
    metrics = {"loss": loss, "adv_acc": accuracy(logits, y)}
    if clean_bn_pass:
      clean, model_state = forward(model, params, model_state, x, train=True)
      metrics["acc"] = accuracy(clean, y)
    return loss, (metrics, model_state)
  return loss_fn


METHOD = Method("pgd_at", make_loss, Options,
                reference="Madry et al. 2018; CIFAR recipe: PreAct ResNet-18 "
                          "as in Rice et al. / Pang et al. (bag of tricks)")
