"""Pieces shared by the image-classification methods.

``forward`` runs a Flax model in train mode (batch statistics used and
updated; the new ``model_state`` is returned) or eval mode (running
statistics; ``model_state`` returned unchanged). ``attack_model`` runs a
method's inner maximisation (an ``AttackSpec``) against a network in the
spec's batch-norm mode: ``"eval"`` (running statistics, the common choice)
or ``"train"`` (batch statistics, every attack step updating the running
statistics, as the ARD / IAD reference code does).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from tsjax import losses
from tsjax.attacks import AttackSpec


def variables(params, model_state):
  return {"params": params, **model_state}


def forward(model, params, model_state, x, train: bool):
  """``(logits, new_model_state)``; eval mode leaves ``model_state`` as is.

  Logits come back in at least float32 whatever the model computes in
  (``tsjax.models.with_compute_dtype``), so every loss, softmax and KL is
  float32."""
  if train and model_state:
    logits, updates = model.apply(variables(params, model_state), x,
                                  train=True, mutable=list(model_state))
    return _at_least_f32(logits), {**model_state, **updates}
  logits = model.apply(variables(params, model_state), x, train=train)
  return _at_least_f32(logits), model_state


def _at_least_f32(logits):
  return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))


@dataclasses.dataclass(frozen=True)
class ModelLogits:
  """``(variables, x) -> logits`` of ``model`` with ``variables = (params,
  model_state)``, no state update, no gradient to the parameters. Hashable
  and equal for equal models, so attacks compiled for it can take the
  parameters as an argument and be reused for other parameters
  (``autoattack(ModelLogits(model), x, y, key, params=(params, state))``).

  ``key`` (optional) is accepted and ignored: the forward pass is
  deterministic (eval-mode layers, or batch statistics of ``x`` with
  ``bn_mode="train"``), so the same function serves callers that pass a
  random draw per call, as AutoAttack's ``version="rand"`` does
  (``logits_fn(params, x, key)``); its EOT average then equals the plain
  logits' log-softmax."""
  model: object
  bn_mode: str = "eval"

  def __call__(self, variables, x, key=None):
    del key   # deterministic forward pass (see the class docstring)
    params, model_state = variables
    return forward(self.model, jax.lax.stop_gradient(params), model_state, x,
                   self.bn_mode == "train")[0]


def logits_fn(model, params, model_state, bn_mode: str = "eval"):
  """``x -> logits`` with fixed parameters for an attack (no state update)."""
  return functools.partial(ModelLogits(model, bn_mode), (params, model_state))


def attack_model(attack: AttackSpec, model, params, model_state, x, key,
                 objective):
  """Maximises ``objective(logits, x_adv) -> [B]`` over the ball around
  ``x``, the network ``model`` run in ``attack.bn_mode`` with its
  parameters held fixed. Returns ``(x_adv, model_state)``: in ``"train"``
  mode the running statistics after one update per attack step (the loss at
  the returned point is not counted), else ``model_state`` unchanged."""
  params = jax.lax.stop_gradient(params)
  if attack.bn_mode == "train" and model_state:
    def stateful(xa, st):
      logits, new = forward(model, params, st, xa, True)
      new = jax.tree.map(lambda n, o: n.astype(o.dtype), new, st)
      return objective(logits, xa), new
    return attack.run(stateful, x, key, state=model_state)
  f = logits_fn(model, params, model_state, attack.bn_mode)
  return attack.run(lambda xa: objective(f(xa), xa), x, key), model_state


def ce_attack(model, params, model_state, x, y, key, attack: AttackSpec):
  """PGD on the cross-entropy with the true labels (Madry et al.);
  ``(x_adv, model_state)``."""
  return attack_model(attack, model, params, model_state, x, key,
                      lambda logits, _: losses.cross_entropy(logits, y))


def state_updates(model, params, model_state, x, count: int):
  """``count`` train-mode passes at ``x`` whose outputs a reference computes
  and discards (or uses detached): only their batch-norm running-statistic
  updates are kept, so the statistics match the reference's."""
  params = jax.lax.stop_gradient(params)
  for _ in range(count):
    _, model_state = forward(model, params, model_state, x, True)
  return jax.lax.stop_gradient(model_state)


def accuracy(logits, labels):
  if labels.ndim == logits.ndim:
    labels = jnp.argmax(labels, -1)
  return jnp.mean(jnp.argmax(logits, -1) == labels)
