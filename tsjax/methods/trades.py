"""TRADES (Zhang et al. 2019), spec §4.2, as in the reference code.

Inner: ``x' = argmax KL(f(x) || f(x'))`` from ``x + 0.001 N(0, I)`` (model in
``attack.bn_mode``, eval by default; the clean probabilities are fixed).
Outer: ``CE(f(x), y) + beta * (1/B) sum_i KL(f(x_i) || f(x'_i))`` with both
forward passes in train mode and gradient flowing through both ``f(x)`` and
``f(x')`` (the reference does not detach the clean term).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from tsjax import config_checks as cc
from tsjax import losses
from tsjax.attacks import AttackSpec
from tsjax.methods.common import accuracy, attack_model, forward, logits_fn
from tsjax.methods.registry import Method


@dataclasses.dataclass(frozen=True)
class Options:
  beta: float = 6.0

  def __post_init__(self):
    cc.require(self, "beta", cc.number_in(self.beta, 0), "a number >= 0")


def make_loss(model, *, teacher=None, attack: AttackSpec,
              options: Options = Options()):
  del teacher
  beta = options.beta

  def loss_fn(params, model_state, batch, key, ctx):
    del ctx
    x, y = batch["image"], batch["label"]
    p_clean = jax.lax.stop_gradient(
        logits_fn(model, params, model_state, attack.bn_mode)(x))
    x_adv, model_state = attack_model(
        attack, model, params, model_state, x, key,
        lambda logits, _: losses.kl(p_clean, logits, reduction="none"))
    logits, model_state = forward(model, params, model_state, x, train=True)
    logits_adv, model_state = forward(model, params, model_state, x_adv,
                                      train=True)
    natural = jnp.mean(losses.cross_entropy(logits, y))
    robust = losses.kl(logits, logits_adv, reduction="batchmean")
    loss = natural + beta * robust
    return loss, ({"loss": loss, "natural": natural, "robust_kl": robust,
                   "acc": accuracy(logits, y),
                   "adv_acc": accuracy(logits_adv, y)}, model_state)
  return loss_fn


METHOD = Method("trades", make_loss, Options,
                reference="yaodongyu/TRADES train_trades_cifar10.py")
