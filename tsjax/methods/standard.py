"""Standard training.

* ``make_ts_loss``: teacher–student regression (Tian 2019; Yang et al. 2021
  regime (a)): the student minimises ``0.5 ||f_s(x) - f_t(x)||^2`` averaged
  over the batch.
* ``make_loss``: image classification with cross-entropy.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from tsjax import config_checks as cc
from tsjax import losses
from tsjax.methods.common import accuracy, forward
from tsjax.methods.registry import Method
from tsjax.methods.teacher_student import Networks, regression_loss


@dataclasses.dataclass(frozen=True)
class Options:
  label_smoothing: float = 0.0

  def __post_init__(self):
    cc.require(self, "label_smoothing",
               cc.number_in(self.label_smoothing, 0, 1), "in [0, 1]")


def make_ts_loss(nets: Networks):
  def loss_fn(params, model_state, batch, key, ctx):
    del key
    loss = regression_loss(nets, params, ctx, batch["x"])
    return loss, ({"loss": loss}, model_state)
  return loss_fn


def make_loss(model, *, teacher=None, attack=None,
              options: Options = Options()):
  """Image classification: mean cross-entropy on the (augmented) batch.

  ``batch = {"image": [B, H, W, C] in [0, 1], "label": [B] ints or [B, C]
  probabilities (mixup / CutMix)}``.
  """
  del teacher, attack
  label_smoothing = options.label_smoothing

  def loss_fn(params, model_state, batch, key, ctx):
    del key, ctx
    y = batch["label"]
    logits, model_state = forward(model, params, model_state, batch["image"],
                                  train=True)
    if label_smoothing:
      c = logits.shape[-1]
      y = y if y.ndim == 2 else jax.nn.one_hot(y, c, dtype=logits.dtype)
      y = (1.0 - label_smoothing) * y + label_smoothing / c
    loss = jnp.mean(losses.cross_entropy(logits, y))
    return loss, ({"loss": loss, "acc": accuracy(logits, batch["label"])},
                  model_state)
  return loss_fn


METHOD = Method("standard", make_loss, Options, uses_attack=False,
                reference="cross-entropy training (no attack)")
