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

from tsjax import losses
from tsjax.methods.common import accuracy, forward, logits_fn, run_attack
from tsjax.methods.distill import teacher_logits

RSLAD_EPS = 1e-5


def rslad_objective(s_adv, s_clean, t_clean, *, adv_weight=5 / 6,
                    kl_scale=1.0):
  adv = losses.kl(t_clean, s_adv, reduction="mean", target_eps=RSLAD_EPS)
  nat = losses.kl(t_clean, s_clean, reduction="mean", target_eps=RSLAD_EPS)
  return kl_scale * (adv_weight * adv + (1 - adv_weight) * nat), adv, nat


def make_loss(student, teacher, attack, *, adv_weight: float = 5 / 6,
              kl_scale: float = 1.0):
  def loss_fn(params, model_state, batch, key, ctx):
    x, y = batch["image"], batch["label"]
    t = teacher_logits(teacher, ctx, x)
    f = logits_fn(student, params, model_state, attack.bn_mode)
    x_adv = run_attack(attack, lambda xa: losses.kl(t, f(xa), reduction="none"),
                       x, key)
    s_adv, model_state = forward(student, params, model_state, x_adv, True)
    s_nat, model_state = forward(student, params, model_state, x, True)
    loss, adv, nat = rslad_objective(s_adv, s_nat, t, adv_weight=adv_weight,
                                     kl_scale=kl_scale)
    return loss, ({"loss": loss, "kl_adv": adv, "kl_nat": nat,
                   "acc": accuracy(s_nat, y), "adv_acc": accuracy(s_adv, y)},
                  model_state)
  return loss_fn
