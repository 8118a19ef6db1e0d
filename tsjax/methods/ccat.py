"""Confidence-calibrated adversarial training (Stutz, Hein, Schiele 2020),
spec §4.3.

``ccat_lambda`` is CCAT's power transition
``lambda(delta) = 1 - (1 - min(1, ||delta|| / eps)) ** rho``: the weight of the
uninformative target grows with the perturbation size.

Teacher–student analogue (Yang et al. regime (c), spec §1.5 / §4.3): half of
each batch is clean (target ``f_t(x)``); the other half is attacked with the
teacher–student error objective and trained towards
``(1 - lambda) f_t(x + delta) + lambda * y_mean``, ``y_mean`` being the teacher's
mean output (the regression counterpart of the uniform distribution).
Loss = 0.5 * clean + 0.5 * adversarial.

Image classification (``make_loss``): half of each batch clean with one-hot
targets, half attacked by maximising the largest non-true-class probability
(CCAT's training objective; plain sign-gradient PGD here, where the reference
adds momentum and backtracking) and trained towards
``(1 - lambda) onehot(y) + lambda / C``. Evaluation rejects low-confidence
inputs: ``confidence_threshold`` picks tau so 99% of correctly classified
clean test examples are kept (99% TPR), and ``thresholded_errors`` counts an
adversarial example as an error only if it is misclassified with confidence
>= tau.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tsjax import losses
from tsjax.attacks import per_example_norm
from tsjax.methods.common import accuracy, forward, logits_fn, run_attack
from tsjax.methods.teacher_student import (AttackConfig, Networks,
                                           regression_loss, worst_case_inputs)


def ccat_lambda(delta_norm: jax.Array, eps, rho: float) -> jax.Array:
  """CCAT power transition; 0 at ``delta = 0`` and 1 at ``||delta|| >= eps``
  (with ``eps = 0`` every perturbation is zero and lambda is 0)."""
  eps = jnp.asarray(eps, delta_norm.dtype)
  safe = jnp.where(eps > 0, eps, 1.0)
  r = jnp.where(eps > 0, jnp.minimum(1.0, delta_norm / safe), 0.0)
  return 1.0 - (1.0 - r) ** rho


def make_ts_loss(nets: Networks, attack: AttackConfig, rho: float,
                 clean_fraction: float = 0.5):
  def loss_fn(params, model_state, batch, key, ctx):
    x = batch["x"]
    n_clean = int(round(clean_fraction * x.shape[0]))
    x_clean, x_rest = x[:n_clean], x[n_clean:]
    x_adv = worst_case_inputs(nets, params, ctx, x_rest, key, attack)
    lam = ccat_lambda(per_example_norm(x_adv - x_rest, attack.norm),
                      attack.eps, rho)[:, None]
    target = (1.0 - lam) * nets.teacher_out(ctx, x_adv) + lam * ctx["y_mean"]
    l_clean = regression_loss(nets, params, ctx, x_clean)
    l_adv = regression_loss(nets, params, ctx, x_adv, target)
    loss = 0.5 * l_clean + 0.5 * l_adv
    return loss, ({"loss": loss, "lambda": jnp.mean(lam)}, model_state)
  return loss_fn


def make_loss(model, attack, rho: float = 10.0, clean_fraction: float = 0.5):
  """Image CCAT loss; ``attack`` is a ``methods.common.ImageAttack`` (linf)."""
  def loss_fn(params, model_state, batch, key, ctx):
    del ctx
    x, y = batch["image"], batch["label"]
    n_clean = int(round(clean_fraction * x.shape[0]))
    f = logits_fn(model, params, model_state, attack.bn_mode)
    x_rest, y_rest = x[n_clean:], y[n_clean:]
    x_adv = run_attack(attack, lambda xa: max_other_prob(f(xa), y_rest),
                       x_rest, key)
    lam = ccat_lambda(per_example_norm(x_adv - x_rest, attack.norm),
                      attack.eps, rho)
    logits, model_state = forward(model, params, model_state,
                                  jnp.concatenate([x[:n_clean], x_adv]),
                                  train=True)
    num_classes = logits.shape[-1]
    onehot = jax.nn.one_hot(y, num_classes, dtype=logits.dtype)
    target_adv = (1.0 - lam[:, None]) * onehot[n_clean:] + lam[:, None] / num_classes
    ce = losses.cross_entropy(logits, jnp.concatenate([onehot[:n_clean],
                                                       target_adv]))
    l_clean = jnp.mean(ce[:n_clean]) if n_clean else 0.0
    l_adv = jnp.mean(ce[n_clean:]) if n_clean < x.shape[0] else 0.0
    loss = 0.5 * l_clean + 0.5 * l_adv
    return loss, ({"loss": loss, "lambda": jnp.mean(lam),
                   "acc": accuracy(logits[:n_clean], y[:n_clean])},
                  model_state)
  return loss_fn


def max_other_prob(logits, labels):
  """Per-example ``max_{k != y} softmax_k`` (CCAT's attack objective)."""
  p = jax.nn.softmax(logits, axis=-1)
  mask = jax.nn.one_hot(labels, logits.shape[-1], dtype=bool)
  return jnp.max(jnp.where(mask, -1.0, p), axis=-1)


def confidence_threshold(clean_conf, clean_correct, tpr: float = 0.99):
  """tau such that a fraction ``tpr`` of correctly classified clean examples
  have confidence >= tau (host-side NumPy)."""
  import numpy as np
  conf = np.sort(np.asarray(clean_conf)[np.asarray(clean_correct, bool)])
  if conf.size == 0:
    raise ValueError("no correctly classified clean example to calibrate on")
  idx = int(np.floor((1.0 - tpr) * conf.size))
  return float(conf[min(idx, conf.size - 1)])


def thresholded_errors(tau, clean_correct, adv_conf, adv_correct) -> dict:
  """Confidence-thresholded robust error (CCAT evaluation, NumPy).

  An example is a robust error if it is misclassified clean, or its
  adversarial example is misclassified *and* not rejected (confidence >= tau).
  Also returns the clean error, the fraction of adversarial examples rejected
  and the unthresholded robust error.
  """
  import numpy as np
  clean_correct = np.asarray(clean_correct, bool)
  adv_conf = np.asarray(adv_conf)
  adv_correct = np.asarray(adv_correct, bool)
  accepted_wrong = (~adv_correct) & (adv_conf >= tau)
  return {"tau": float(tau),
          "clean_error": float(np.mean(~clean_correct)),
          "robust_error": float(np.mean(~clean_correct | accepted_wrong)),
          "robust_error_unthresholded": float(np.mean(~clean_correct |
                                                      ~adv_correct)),
          "adv_rejected": float(np.mean(adv_conf < tau))}
