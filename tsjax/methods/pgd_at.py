"""PGD adversarial training (Madry et al. 2018), spec §4.1.

``make_loss``: image classification. ``make_ts_loss``: teacher–student
regression (Yang et al. regime (b)): each input is replaced by
``x + delta*`` where ``delta*`` maximises the teacher–student squared error
inside the eps-ball (PGD, random start); the target at ``x + delta*`` is the
teacher's output *there* (the teacher is an oracle).
"""

from __future__ import annotations

import jax.numpy as jnp

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


def make_loss(model, *, teacher=None, attack: AttackSpec, options=None):
  """Image classification (Madry et al.): mean CE at PGD-CE adversarial
  examples, the model in train mode for the loss and in ``attack.bn_mode``
  while attacking. ``batch = {"image", "label"}``.
  """
  del teacher, options

  def loss_fn(params, model_state, batch, key, ctx):
    del ctx
    x, y = batch["image"], batch["label"]
    x_adv, model_state = ce_attack(model, params, model_state, x, y, key,
                                   attack)
    logits, model_state = forward(model, params, model_state, x_adv, train=True)
    loss = jnp.mean(losses.cross_entropy(logits, y))
    return loss, ({"loss": loss, "adv_acc": accuracy(logits, y)}, model_state)
  return loss_fn


METHOD = Method("pgd_at", make_loss,
                reference="Madry et al. 2018; CIFAR recipe: PreAct ResNet-18 "
                          "as in Rice et al. / Pang et al. (bag of tricks)")
