"""Pieces shared by the image-classification methods.

``forward`` runs a Flax model in train mode (batch statistics used and
updated; the new ``model_state`` is returned) or eval mode (running
statistics; ``model_state`` returned unchanged). ``ImageAttack`` describes the
inner maximisation of a method, including the batch-norm mode used while
attacking (``"eval"``: running statistics, the common choice; ``"train"``:
batch statistics as in ARD/IAD code, with the statistic updates discarded).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from tsjax import losses
from tsjax.attacks import pgd

BN_MODES = ("eval", "train")


def variables(params, model_state):
  return {"params": params, **model_state}


def forward(model, params, model_state, x, train: bool):
  """``(logits, new_model_state)``; eval mode leaves ``model_state`` as is."""
  if train and model_state:
    logits, updates = model.apply(variables(params, model_state), x,
                                  train=True, mutable=list(model_state))
    return logits, {**model_state, **updates}
  return model.apply(variables(params, model_state), x, train=train), model_state


@dataclasses.dataclass(frozen=True)
class ImageAttack:
  """A PGD inner maximisation in pixel units (inputs in [0, 1])."""
  norm: str = "linf"
  eps: float = 8 / 255
  step_size: float = 2 / 255
  steps: int = 10
  bn_mode: str = "eval"
  random_start: bool = True
  start_std: float | None = None    # Gaussian start (TRADES, RSLAD: 0.001)
  restarts: int = 1
  bounds: tuple = (0.0, 1.0)

  def __post_init__(self):
    if self.bn_mode not in BN_MODES:
      raise ValueError(f"attack bn_mode must be one of {BN_MODES}, got "
                       f"{self.bn_mode!r}")


@dataclasses.dataclass(frozen=True)
class ModelLogits:
  """``(variables, x) -> logits`` of ``model`` with ``variables = (params,
  model_state)``, no state update, no gradient to the parameters. Hashable
  and equal for equal models, so attacks compiled for it can take the
  parameters as an argument and be reused for other parameters
  (``autoattack(ModelLogits(model), x, y, key, params=(params, state))``)."""
  model: object
  bn_mode: str = "eval"

  def __call__(self, variables, x):
    params, model_state = variables
    return forward(self.model, jax.lax.stop_gradient(params), model_state, x,
                   self.bn_mode == "train")[0]


def logits_fn(model, params, model_state, bn_mode: str = "eval"):
  """``x -> logits`` with fixed parameters for an attack (no state update)."""
  return functools.partial(ModelLogits(model, bn_mode), (params, model_state))


def run_attack(att: ImageAttack, loss_of_x, x, key):
  """Maximises ``loss_of_x(x_adv) -> [B]``; returns a gradient-free x_adv."""
  x_adv = pgd(loss_of_x, x, key, eps=att.eps, step_size=att.step_size,
              steps=att.steps, norm=att.norm, restarts=att.restarts,
              random_start=att.random_start, start_std=att.start_std,
              bounds=att.bounds, keep_best=False)
  return jax.lax.stop_gradient(x_adv)


def ce_attack(model, params, model_state, x, y, key, att: ImageAttack):
  """PGD on the cross-entropy with the true labels (Madry et al.)."""
  f = logits_fn(model, params, model_state, att.bn_mode)
  return run_attack(att, lambda xa: losses.cross_entropy(f(xa), y), x, key)


def accuracy(logits, labels):
  if labels.ndim == logits.ndim:
    labels = jnp.argmax(labels, -1)
  return jnp.mean(jnp.argmax(logits, -1) == labels)
