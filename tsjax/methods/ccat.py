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
(CCAT's F7P objective; the recipes use the reference's optimiser, momentum
0.9 with backtracking, ``AttackSpec(optimizer="backtrack", start="mixed")``)
and trained towards ``(1 - lambda) onehot(y) + lambda / C``. Evaluation
rejects low-confidence inputs: ``confidence_threshold`` picks tau so a
fraction ``Options.tpr`` (99%) of correctly classified clean test examples is
kept, and ``thresholded_errors`` counts an adversarial example as an error
only if it is misclassified with confidence >= tau. The test-set confidence
attack (``test_attacks``) is the training attack at the evaluation radius
with ``Options.eval_restarts`` restarts, the best kept per example.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from tsjax import config_checks as cc
from tsjax import losses
from tsjax.attacks import AttackSpec, per_example_norm
from tsjax.methods.common import accuracy, attack_model, forward
from tsjax.methods.registry import Method
from tsjax.methods.teacher_student import (Networks, regression_loss,
                                           worst_case_inputs)


@dataclasses.dataclass(frozen=True)
class Options:
  rho: float = 10.0              # power of the transition lambda(delta)
  clean_fraction: float = 0.5    # first part of each batch trained clean
  tpr: float = 0.99              # evaluation: clean correct examples kept
  eval_restarts: int = 1         # restarts of the test-set confidence attack

  def __post_init__(self):
    cc.require(self, "rho", cc.number_in(self.rho, 0, low_open=True), "> 0")
    cc.require(self, "clean_fraction", cc.number_in(self.clean_fraction, 0, 1),
               "in [0, 1]")
    cc.require(self, "tpr", cc.number_in(self.tpr, 0, 1, low_open=True),
               "in (0, 1]")
    cc.require(self, "eval_restarts", cc.is_positive_int(self.eval_restarts),
               "an integer >= 1")


def ccat_lambda(delta_norm: jax.Array, eps, rho: float) -> jax.Array:
  """CCAT power transition; 0 at ``delta = 0`` and 1 at ``||delta|| >= eps``
  (with ``eps = 0`` every perturbation is zero and lambda is 0)."""
  eps = jnp.asarray(eps, delta_norm.dtype)
  safe = jnp.where(eps > 0, eps, 1.0)
  r = jnp.where(eps > 0, jnp.minimum(1.0, delta_norm / safe), 0.0)
  return 1.0 - (1.0 - r) ** rho


def make_ts_loss(nets: Networks, attack: AttackSpec, rho: float,
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


def make_loss(model, *, teacher=None, attack: AttackSpec,
              options: Options = Options()):
  """Image CCAT loss (see the module docstring)."""
  del teacher
  rho, clean_fraction = options.rho, options.clean_fraction

  def loss_fn(params, model_state, batch, key, ctx):
    del ctx
    x, y = batch["image"], batch["label"]
    n_clean = int(round(clean_fraction * x.shape[0]))
    x_rest, y_rest = x[n_clean:], y[n_clean:]
    x_adv, model_state = attack_model(
        attack, model, params, model_state, x_rest, key,
        lambda logits, _: max_other_prob(logits, y_rest))
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


def test_attacks(eval_attack: AttackSpec, train_attack: AttackSpec,
                 options: Options) -> dict:
  """The confidence attack of the test evaluation: the training attack's
  optimiser (F7P) at the evaluation radius, ``options.eval_restarts``
  restarts with the best kept."""
  return {"pgd_conf": ("conf", train_attack.replace(
      eps=eval_attack.eps, restarts=int(options.eval_restarts),
      keep_best=True, bn_mode="eval"))}


def report(per_example: dict, options: Options) -> dict:
  """Confidence-thresholded robust error at ``options.tpr`` under the
  confidence attack (``ccat_*`` fields of a results row)."""
  tau = confidence_threshold(per_example["clean/conf"],
                             per_example["clean/correct"], options.tpr)
  th = thresholded_errors(tau, per_example["clean/correct"],
                          per_example["pgd_conf/conf"],
                          per_example["pgd_conf/correct"])
  row = {f"ccat_{k}": v for k, v in th.items()}
  row["ccat_conf_attack_acc"] = float(np.mean(per_example["pgd_conf/correct"]))
  return row


METHOD = Method("ccat", make_loss, Options, test_attacks=test_attacks,
                report=report,
                reference="davidstutz/confidence-calibrated-adversarial-"
                          "training (experiments/config/common.py)")
