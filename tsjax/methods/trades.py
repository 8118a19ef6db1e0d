"""TRADES (Zhang et al. 2019), spec §4.2, as in the reference code.

Inner: ``x' = argmax KL(f(x) || f(x'))`` from ``x + 0.001 N(0, I)`` (model in
``attack.bn_mode``, eval by default; the clean probabilities are fixed).
Outer: ``CE(f(x), y) + beta * (1/B) sum_i KL(f(x_i) || f(x'_i))`` with both
forward passes in train mode and gradient flowing through both ``f(x)`` and
``f(x')`` (the reference does not detach the clean term).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tsjax import losses
from tsjax.methods.common import accuracy, forward, logits_fn, run_attack


def make_loss(model, attack, beta: float = 6.0):
  def loss_fn(params, model_state, batch, key, ctx):
    del ctx
    x, y = batch["image"], batch["label"]
    f = logits_fn(model, params, model_state, attack.bn_mode)
    p_clean = jax.lax.stop_gradient(f(x))
    x_adv = run_attack(attack, lambda xa: losses.kl(p_clean, f(xa),
                                                    reduction="none"), x, key)
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
