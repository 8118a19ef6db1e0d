"""Adversarially Robust Distillation (Goldblum et al., AAAI 2020), spec §4.5.

``x' = PGD`` on the *student's* cross-entropy with the true labels (uniform
start; the reference attacks with the student in train mode, recipes use
``bn_mode="train"``: every attack step updates the running statistics, so one
training step makes ``steps + 2`` updates as in goldblum/
AdversariallyRobustDistillation main.py:68-79, 121-123).

``L = alpha * tau^2 * KL(softmax(T(x)/tau) || softmax(S(x')/tau))
      + (1 - alpha) * CE(S(x), y)``

The teacher sees the clean ``x``. The KL uses the reference's
``nn.KLDivLoss()`` reduction (``"mean"``: / (B * C)). ``S(x)`` is always
computed in train mode after ``S(x')`` (as in the reference, where it also
updates the batch-norm statistics), even when ``alpha = 1``.
Reference defaults: tau = 30, alpha = 1.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from tsjax import config_checks as cc
from tsjax import losses
from tsjax.attacks import AttackSpec
from tsjax.methods.common import accuracy, ce_attack, forward
from tsjax.methods.distill import teacher_logits
from tsjax.methods.registry import Method


@dataclasses.dataclass(frozen=True)
class Options:
  alpha: float = 1.0
  temperature: float = 30.0
  reduction: str = "mean"       # nn.KLDivLoss(): / (B * C)

  def __post_init__(self):
    cc.require(self, "alpha", cc.number_in(self.alpha, 0, 1), "in [0, 1]")
    cc.require(self, "temperature", cc.number_in(self.temperature, 0, low_open=True), "> 0")
    cc.require(self, "reduction", self.reduction in losses.KL_REDUCTIONS[:3],
               f"one of {list(losses.KL_REDUCTIONS[:3])}")


def ard_objective(s_adv, s_clean, t_clean, labels, *, alpha, temperature,
                  reduction="mean"):
  soft = losses.kl(t_clean, s_adv, temperature=temperature, reduction=reduction)
  hard = jnp.mean(losses.cross_entropy(s_clean, labels))
  return alpha * temperature ** 2 * soft + (1.0 - alpha) * hard, soft, hard


def make_loss(student, *, teacher, attack: AttackSpec,
              options: Options = Options()):
  alpha, temperature, reduction = (options.alpha, options.temperature,
                                   options.reduction)

  def loss_fn(params, model_state, batch, key, ctx):
    x, y = batch["image"], batch["label"]
    x_adv, model_state = ce_attack(student, params, model_state, x, y, key,
                                   attack)
    t = teacher_logits(teacher, ctx, x)
    s_adv, model_state = forward(student, params, model_state, x_adv, True)
    s_nat, model_state = forward(student, params, model_state, x, True)
    loss, soft, hard = ard_objective(s_adv, s_nat, t, y, alpha=alpha,
                                     temperature=temperature,
                                     reduction=reduction)
    return loss, ({"loss": loss, "kl": soft, "ce": hard,
                   "acc": accuracy(s_nat, y), "adv_acc": accuracy(s_adv, y)},
                  model_state)
  return loss_fn


METHOD = Method("ard", make_loss, Options, needs_teacher=True,
                reference="goldblum/AdversariallyRobustDistillation main.py")
