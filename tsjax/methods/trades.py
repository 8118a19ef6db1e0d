"""TRADES (Zhang et al. 2019), spec §4.2, as in the reference code.

Inner: ``x' = argmax KL(f(x) || f(x'))`` from ``x + 0.001 N(0, I)`` (model in
``attack.bn_mode``, eval by default; the clean probabilities are fixed).
Outer: ``CE(f(x), y) + beta * (1/B) sum_i KL(f(x_i) || f(x'_i))`` with the
forward passes in train mode and gradient flowing through both ``f(x)`` and
``f(x')`` (the reference does not detach the clean term).

Train-mode passes per step, as yaodongyu/TRADES trades.py:79-82 runs them:
``model(x)`` for the CE term, then inside the KL ``model(x_adv)`` and
``model(x)`` again for the KL's target, so the batch-norm running statistics
are updated three times (x, x', x). ``Options.recompute_clean=False`` reuses
the first pass's logits as the KL target instead: the same loss and gradient
(a train-mode pass is a deterministic function of the batch), one pass less,
running statistics updated twice.
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
  recompute_clean: bool = True   # trades.py:81-82: a third pass, model(x)

  def __post_init__(self):
    cc.require(self, "beta", cc.number_in(self.beta, 0), "a number >= 0")
    cc.require(self, "recompute_clean", isinstance(self.recompute_clean, bool),
               "True or False")


def make_loss(model, *, teacher=None, attack: AttackSpec,
              options: Options = Options()):
  del teacher
  beta, recompute_clean = options.beta, options.recompute_clean

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
    target = logits
    if recompute_clean:
      target, model_state = forward(model, params, model_state, x, train=True)
    natural = jnp.mean(losses.cross_entropy(logits, y))
    robust = losses.kl(target, logits_adv, reduction="batchmean")
    loss = natural + beta * robust
    return loss, ({"loss": loss, "natural": natural, "robust_kl": robust,
                   "acc": accuracy(logits, y),
                   "adv_acc": accuracy(logits_adv, y)}, model_state)
  return loss_fn


METHOD = Method("trades", make_loss, Options,
                reference="yaodongyu/TRADES train_trades_cifar10.py")
