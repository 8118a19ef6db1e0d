"""Robust Soft Label Adversarial Distillation (Zi et al., ICCV 2021), spec §4.6.

Inner: ``x' = argmax_{||x' - x||_inf <= eps} KL(softmax T(x) || softmax S(x'))``
(sum over classes per example; start ``x + 0.001 N(0, I)``; the student in
eval mode; the teacher's clean probabilities fixed).

Outer, as the reference code writes it:
``L = w_adv * KLe(T(x) || S(x')) + (1 - w_adv) * KLe(T(x) || S(x))`` with
``KLe(p || q) = mean_{b,c} p (log(p + 1e-5) - log q)`` (element-wise mean over
B * C), ``w_adv = 5/6``, both student terms trainable, the teacher detached.
``kl_scale`` multiplies both terms (the reference's x10 on CIFAR-100).
"""

from __future__ import annotations

import dataclasses

from tsjax import config_checks as cc
from tsjax import losses
from tsjax.attacks import AttackSpec
from tsjax.methods.common import accuracy, attack_model, forward
from tsjax.methods.distill import teacher_logits
from tsjax.methods.registry import Method

RSLAD_EPS = 1e-5


def rslad_objective(s_adv, s_clean, t_clean, *, adv_weight=5 / 6,
                    kl_scale=1.0):
  adv = losses.kl(t_clean, s_adv, reduction="mean", target_eps=RSLAD_EPS)
  nat = losses.kl(t_clean, s_clean, reduction="mean", target_eps=RSLAD_EPS)
  return kl_scale * (adv_weight * adv + (1 - adv_weight) * nat), adv, nat


@dataclasses.dataclass(frozen=True)
class Options:
  adv_weight: float = 5 / 6
  kl_scale: float = 1.0          # the reference's x10 on CIFAR-100

  def __post_init__(self):
    cc.require(self, "adv_weight", cc.number_in(self.adv_weight, 0, 1),
               "in [0, 1]")
    cc.require(self, "kl_scale", cc.number_in(self.kl_scale, 0), ">= 0")


def make_loss(student, *, teacher, attack: AttackSpec,
              options: Options = Options()):
  adv_weight, kl_scale = options.adv_weight, options.kl_scale

  def loss_fn(params, model_state, batch, key, ctx):
    x, y = batch["image"], batch["label"]
    t = teacher_logits(teacher, ctx, x)
    x_adv, model_state = attack_model(
        attack, student, params, model_state, x, key,
        lambda logits, _: losses.kl(t, logits, reduction="none"))
    s_adv, model_state = forward(student, params, model_state, x_adv, True)
    s_nat, model_state = forward(student, params, model_state, x, True)
    loss, adv, nat = rslad_objective(s_adv, s_nat, t, adv_weight=adv_weight,
                                     kl_scale=kl_scale)
    return loss, ({"loss": loss, "kl_adv": adv, "kl_nat": nat,
                   "acc": accuracy(s_nat, y), "adv_acc": accuracy(s_adv, y)},
                  model_state)
  return loss_fn


METHOD = Method("rslad", make_loss, Options, needs_teacher=True,
                reference="zibojia/RSLAD resnet18_rslad_cifar10.py, rslad_loss.py")
