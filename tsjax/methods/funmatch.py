"""FunMatch: knowledge distillation as function matching (Beyer et al.,
CVPR 2022), spec §4.9.

Consistent teaching: teacher and student see the *same* view of every image
(the experiment's augmentation is applied once, before this loss). Function
matching: the view is further mixed up with the batch rolled by one,
``a ~ Beta(m, m)`` once per batch, ``a <- max(a, 1 - a)`` (big_vision's
``mixup`` with ``fold_in=None, p=1.0``), and the loss ignores labels:

``L = tau^2 (1/B) sum_i KL(softmax(T(x_mix)/tau) || softmax(S(x_mix)/tau))``

with tau = 1 in the paper. Labels are used only for the logged accuracy
(``a >= 1/2``, so the own label dominates).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from tsjax import config_checks as cc
from tsjax import losses
from tsjax.methods.common import accuracy, forward
from tsjax.methods.distill import teacher_logits
from tsjax.methods.registry import Method


@dataclasses.dataclass(frozen=True)
class Options:
  temperature: float = 1.0
  mixup_alpha: float = 1.0
  reduction: str = "batchmean"

  def __post_init__(self):
    cc.require(self, "temperature", cc.number_in(self.temperature, 0, low_open=True), "> 0")
    cc.require(self, "mixup_alpha", cc.number_in(self.mixup_alpha, 0), ">= 0")
    cc.require(self, "reduction", self.reduction in losses.KL_REDUCTIONS[:3],
               f"one of {list(losses.KL_REDUCTIONS[:3])}")


def funmatch_mixup(key, x, mixup_alpha: float = 1.0):
  """``(a x + (1 - a) roll(x, 1), a)`` with ``a = max(b, 1 - b)``,
  ``b ~ Beta(mixup_alpha, mixup_alpha)`` (``mixup_alpha = 0``: no mixing)."""
  if not mixup_alpha:
    return x, jnp.ones((), x.dtype)
  b = jax.random.beta(key, mixup_alpha, mixup_alpha, dtype=x.dtype)
  a = jnp.maximum(b, 1.0 - b)
  return a * x + (1.0 - a) * jnp.roll(x, 1, axis=0), a


def make_loss(student, *, teacher, attack=None, options: Options = Options()):
  del attack
  temperature, mixup_alpha, reduction = (options.temperature,
                                         options.mixup_alpha, options.reduction)

  def loss_fn(params, model_state, batch, key, ctx):
    x, y = batch["image"], batch["label"]
    x_mix, a = funmatch_mixup(key, x, mixup_alpha)
    t = teacher_logits(teacher, ctx, x_mix)
    s, model_state = forward(student, params, model_state, x_mix, train=True)
    loss = temperature ** 2 * losses.kl(t, s, temperature=temperature,
                                        reduction=reduction)
    return loss, ({"loss": loss, "mix_weight": a, "acc": accuracy(s, y),
                   "teacher_agreement": jnp.mean(
                       jnp.argmax(s, -1) == jnp.argmax(t, -1))}, model_state)
  return loss_fn


METHOD = Method("funmatch", make_loss, Options, needs_teacher=True,
                uses_attack=False,
                reference="google-research/big_vision configs/proj/distill "
                          "(function matching)")
