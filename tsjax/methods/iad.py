"""Introspective Adversarial Distillation, IAD-I on top of ARD (Zhu et al.,
ICLR 2022), spec §4.7.

``x' = PGD`` on the student's cross-entropy (as ARD). Per-example trust in
the teacher ``alpha_i = softmax(T(x'_i))_{y_i} ** beta`` (no gradient).

``L = tau^2 (1/B) sum_i KL(softmax(T(x_i)/tau) || softmax(S(x'_i)/tau))
      + [epoch >= begin] (1/B) sum_i (1 - alpha_i) KL(softmax S(x_i) || softmax S(x'_i))``

KL summed over classes, averaged over the batch; ``S(x)`` is not detached
(gradient through both sides of the introspection term). The epoch comes from
``batch["epoch"]`` (a scalar the experiment adds to every batch; missing means
epoch 0, i.e. only the first term). Reference: tau = 1, beta = 0.1, begin = 60
of 200 epochs (0-based ``epoch >= begin``, ZFancy/IAD IAD-I.py:173).

Batch-norm statistics as the reference updates them (IAD-I.py:95-106,
164-178, the student in train mode throughout): one update per attack step
(``bn_mode="train"`` in the recipes), ``S(x')``, a discarded ``S(x')``
(``basicop``), then ``S(x)`` once before ``begin`` and twice from ``begin``
on (the KL target and the unused cross-entropy term each run it).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from tsjax import config_checks as cc
from tsjax import losses
from tsjax.attacks import AttackSpec
from tsjax.methods.common import accuracy, ce_attack, forward, state_updates
from tsjax.methods.distill import teacher_logits
from tsjax.methods.registry import Method


@dataclasses.dataclass(frozen=True)
class Options:
  temperature: float = 1.0
  beta: float = 0.1
  begin_epoch: int = 60

  def __post_init__(self):
    cc.require(self, "temperature", cc.number_in(self.temperature, 0, low_open=True), "> 0")
    cc.require(self, "beta", cc.number_in(self.beta, 0), ">= 0")
    cc.require(self, "begin_epoch", cc.number_in(self.begin_epoch, 0) and
               int(self.begin_epoch) == self.begin_epoch, "an integer >= 0")


def iad_objective(s_adv, s_clean, t_clean, t_adv, labels, active, *,
                  temperature=1.0, beta=0.1):
  """``active``: 0/1 (or bool) scalar, whether the introspection term is on."""
  p_t_adv = jax.nn.softmax(t_adv, -1)
  alpha = jax.lax.stop_gradient(
      jnp.take_along_axis(p_t_adv, labels[:, None], -1)[:, 0] ** beta)
  first = temperature ** 2 * losses.kl(t_clean, s_adv, temperature=temperature,
                                       reduction="batchmean")
  intro = jnp.mean((1.0 - alpha) * losses.kl(s_clean, s_adv, reduction="none"))
  return first + jnp.asarray(active, first.dtype) * intro, first, intro, alpha


def make_loss(student, *, teacher, attack: AttackSpec,
              options: Options = Options()):
  temperature, beta = options.temperature, options.beta
  begin_epoch = int(options.begin_epoch)

  def loss_fn(params, model_state, batch, key, ctx):
    x, y = batch["image"], batch["label"]
    active = jnp.asarray(batch.get("epoch", 0)) >= begin_epoch
    x_adv, model_state = ce_attack(student, params, model_state, x, y, key,
                                   attack)
    t_nat = teacher_logits(teacher, ctx, x)
    t_adv = teacher_logits(teacher, ctx, x_adv)
    s_adv, model_state = forward(student, params, model_state, x_adv, True)
    model_state = state_updates(student, params, model_state, x_adv, 1)
    s_nat, model_state = forward(student, params, model_state, x, True)
    twice = state_updates(student, params, model_state, x, 1)
    model_state = jax.tree.map(lambda a, b: jnp.where(active, a, b), twice,
                               model_state)
    loss, first, intro, alpha = iad_objective(
        s_adv, s_nat, t_nat, t_adv, y, active, temperature=temperature,
        beta=beta)
    return loss, ({"loss": loss, "kl_teacher": first, "introspection": intro,
                   "mean_trust": jnp.mean(alpha), "acc": accuracy(s_nat, y),
                   "adv_acc": accuracy(s_adv, y)}, model_state)
  return loss_fn


METHOD = Method("iad", make_loss, Options, needs_teacher=True,
                reference="ZFancy/IAD IAD-I.py")
