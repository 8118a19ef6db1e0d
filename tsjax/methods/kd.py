"""Knowledge distillation (Hinton et al. 2015), spec §4.8.

``L = alpha * tau^2 * KL(softmax(T(x)/tau) || softmax(S(x)/tau))
      + (1 - alpha) * CE(S(x), y)``

Teacher and student see the same (augmented) clean batch; the teacher is
frozen (``ctx``, see ``tsjax.methods.distill``); the student runs in train
mode. ``tau^2`` keeps the gradient scale comparable across temperatures. The
KL reduction is explicit (``"batchmean"``: sum over classes, mean over the
batch, Hinton's form; ``"mean"`` divides by B * C like ``nn.KLDivLoss()``).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from tsjax import config_checks as cc
from tsjax import losses
from tsjax.methods.common import accuracy, forward
from tsjax.methods.distill import teacher_logits
from tsjax.methods.registry import Method


@dataclasses.dataclass(frozen=True)
class Options:
  alpha: float = 0.9
  temperature: float = 4.0
  reduction: str = "batchmean"

  def __post_init__(self):
    cc.require(self, "alpha", cc.number_in(self.alpha, 0, 1), "in [0, 1]")
    cc.require(self, "temperature", cc.number_in(self.temperature, 0, low_open=True), "> 0")
    cc.require(self, "reduction", self.reduction in losses.KL_REDUCTIONS[:3],
               f"one of {list(losses.KL_REDUCTIONS[:3])}")


def kd_objective(student_logits, teacher_logits_, labels, *, alpha: float,
                 temperature: float, reduction: str = "batchmean"):
  """The KD loss value from logits (the teacher's are taken as given)."""
  soft = losses.kl(teacher_logits_, student_logits, temperature=temperature,
                   reduction=reduction)
  hard = jnp.mean(losses.cross_entropy(student_logits, labels))
  return alpha * temperature ** 2 * soft + (1.0 - alpha) * hard, soft, hard


def make_loss(student, *, teacher, attack=None, options: Options = Options()):
  del attack
  alpha, temperature, reduction = (options.alpha, options.temperature,
                                   options.reduction)

  def loss_fn(params, model_state, batch, key, ctx):
    del key
    x, y = batch["image"], batch["label"]
    t = teacher_logits(teacher, ctx, x)
    s, model_state = forward(student, params, model_state, x, train=True)
    loss, soft, hard = kd_objective(s, t, y, alpha=alpha,
                                    temperature=temperature, reduction=reduction)
    return loss, ({"loss": loss, "kl": soft, "ce": hard,
                   "acc": accuracy(s, y)}, model_state)
  return loss_fn


METHOD = Method("kd", make_loss, Options, needs_teacher=True,
                uses_attack=False,
                reference="Hinton et al. 2015 (clean inputs; a reference point)")
