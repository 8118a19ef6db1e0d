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
and trained towards ``(1 - lambda) onehot(y) + lambda / C``.

Evaluation, as davidstutz/confidence-calibrated-adversarial-training runs it:

* the attacks (``Options.eval_attacks``, rows ``EvalAttack``) run on the
  first ``Options.eval_subset`` test images (experiments/config/cifar10.py:35,
  ``Cifar10TestSet(indices=range(1000))``); the default rows are the paper's
  white-box L-inf evaluation of experiments/eval/main.ipynb (``linf_ours``
  and the normalised PGD-CE of ``linf_pgd``): PGD-Conf 1000 iterations from
  zero and with 10 uniform attempts, PGD-CE 200 iterations with 50 attempts,
  all normalised (signed) gradients with momentum 0.9 and backtracking, the
  iteration counts paired with their lr factors as
  experiments/config/common.py:1399-1425 pairs them (20, 100, 200, 1000,
  2000, 4000 iterations with 1.5, 1.3, 1.25, 1.1, 1.05, 1.025);
* per example the worst case over every attempt of every attack is the
  adversarial example with the largest wrong-class probability
  (experiments/eval/misc.py:321-333, ``errors = -max_{k != y} p_k``);
  within one attack the attempts are kept by the attack's own objective
  (tsjax's ``keep_best``), so for the CE rows the kept attempt can differ;
* the threshold ``tau`` is fixed on the *last* ``Options.threshold_split``
  (10%) of the clean test set, on its correctly classified examples, at
  ``Options.tpr`` (99%) true positive rate (common/eval/
  adversarial_evaluation.py:144, 198-219, 249-270: ``sorted[floor(n *
  round(1 - tpr, 2))]``); with a test set smaller than ``eval_subset`` plus
  the split, the split is taken from the end and may overlap nothing;
* the confidence-thresholded robust test error over the attacked examples
  (adversarial_evaluation.py:428-443): ``#{(clean wrong and clean conf >=
  tau) or (adversarial wrong and adversarial conf >= tau)} / #{clean conf
  >= tau or adversarial conf >= tau}``.
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
class EvalAttack:
  """One row of the evaluation: the reference's ``normalized_pgd`` /
  ``normalized_zero_pgd`` (experiments/config/common.py) with ``objective``
  ``"conf"`` (F7P) or ``"ce"`` (F0), ``start`` ``"zero"`` or ``"uniform"``,
  ``iterations``, base ``lr``, backtracking ``lr_factor`` and ``attempts``
  (restarts; momentum 0.9)."""
  objective: str = "conf"
  start: str = "uniform"
  iterations: int = 1000
  lr: float = 0.001
  lr_factor: float = 1.1
  attempts: int = 1

  def __post_init__(self):
    cc.require(self, "objective", self.objective in ("conf", "ce"),
               "'conf' or 'ce'")
    cc.require(self, "start", self.start in ("zero", "uniform"),
               "'zero' or 'uniform'")
    cc.require(self, "iterations", cc.is_positive_int(self.iterations),
               "an integer >= 1")
    cc.require(self, "lr", cc.number_in(self.lr, 0, low_open=True), "> 0")
    cc.require(self, "lr_factor", cc.number_in(self.lr_factor, 1), ">= 1")
    cc.require(self, "attempts", cc.is_positive_int(self.attempts),
               "an integer >= 1")

  def spec(self, eps: float) -> AttackSpec:
    return AttackSpec(norm="linf", eps=eps, step_size=self.lr,
                      steps=self.iterations, start=self.start,
                      restarts=self.attempts, keep_best=True,
                      optimizer="backtrack", momentum=0.9,
                      lr_factor=self.lr_factor, bn_mode="eval")


# experiments/eval/main.ipynb, the L-inf white-box rows (see the docstring).
PAPER_EVAL = (("conf", "zero", 1000, 0.001, 1.1, 1),
              ("conf", "uniform", 1000, 0.001, 1.1, 10),
              ("ce", "uniform", 200, 0.005, 1.25, 50))


@dataclasses.dataclass(frozen=True)
class Options:
  rho: float = 10.0              # power of the transition lambda(delta)
  clean_fraction: float = 0.5    # first part of each batch trained clean
  tpr: float = 0.99              # evaluation: clean correct examples kept
  eval_attacks: tuple = PAPER_EVAL   # EvalAttack fields, one tuple a row
  eval_subset: int = 1000        # the first N test images are attacked
  threshold_split: float = 0.1   # last fraction of the clean test set: tau

  def __post_init__(self):
    cc.require(self, "rho", cc.number_in(self.rho, 0, low_open=True), "> 0")
    cc.require(self, "clean_fraction", cc.number_in(self.clean_fraction, 0, 1),
               "in [0, 1]")
    cc.require(self, "tpr", cc.number_in(self.tpr, 0, 1, low_open=True),
               "in (0, 1]")
    cc.require(self, "eval_subset", cc.is_positive_int(self.eval_subset),
               "an integer >= 1")
    cc.require(self, "threshold_split",
               cc.number_in(self.threshold_split, 0, 1, low_open=True)
               and self.threshold_split < 1, "in (0, 1)")
    cc.require(self, "eval_attacks", len(self.eval_attacks) > 0,
               "at least one (objective, start, iterations, lr, lr_factor, "
               "attempts) row")
    self.rows()

  def rows(self) -> tuple:
    """``eval_attacks`` as checked ``EvalAttack`` s (errors name the row)."""
    out = []
    for i, row in enumerate(self.eval_attacks):
      fields = [f.name for f in dataclasses.fields(EvalAttack)]
      if not isinstance(row, (tuple, list)) or len(row) != len(fields):
        raise cc.ConfigError(
            f"config field 'method.options.eval_attacks[{i}]' must be a "
            f"tuple ({', '.join(fields)}), got {row!r}")
      out.append(cc.build(EvalAttack, dict(zip(fields, row)),
                          f"method.options.eval_attacks[{i}]"))
    return tuple(out)


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


max_other_prob = losses.max_other_prob   # CCAT's attack objective


def confidence_threshold(clean_conf, clean_correct, tpr: float = 0.99):
  """tau such that a fraction ``tpr`` of correctly classified clean examples
  have confidence >= tau (host-side NumPy; adversarial_evaluation.py:249-270:
  ``sorted[floor(n * round(1 - tpr, 2))]``)."""
  conf = np.sort(np.asarray(clean_conf)[np.asarray(clean_correct, bool)])
  if conf.size == 0:
    raise ValueError("no correctly classified clean example to calibrate on")
  idx = int(np.floor(conf.size * round(1.0 - tpr, 2)))
  return float(conf[min(idx, conf.size - 1)])


def thresholded_errors(tau, clean_correct, clean_conf, adv_conf,
                       adv_correct) -> dict:
  """Confidence-thresholded evaluation of the attacked examples (NumPy).

  ``robust_error``: the reference's ``robust_test_error_at_confidence``
  (adversarial_evaluation.py:428-443), errors among the examples of which
  the clean or the adversarial input is accepted (confidence >= tau);
  ``robust_error_unthresholded``: clean or adversarial wrong (its
  ``robust_test_error``); also the clean error and the fraction of
  adversarial examples rejected.
  """
  clean_correct = np.asarray(clean_correct, bool)
  clean_ok = np.asarray(clean_conf) >= tau
  adv_ok = np.asarray(adv_conf) >= tau
  adv_correct = np.asarray(adv_correct, bool)
  wrong = (~clean_correct & clean_ok) | (~adv_correct & adv_ok)
  accepted = clean_ok | adv_ok
  return {"tau": float(tau),
          "clean_error": float(np.mean(~clean_correct)),
          "robust_error": (float(wrong.sum() / accepted.sum())
                           if accepted.any() else 0.0),
          "robust_error_unthresholded": float(np.mean(~clean_correct |
                                                      ~adv_correct)),
          "adv_rejected": float(np.mean(~adv_ok))}


def test_attacks(eval_attack: AttackSpec, train_attack: AttackSpec,
                 options: Options) -> tuple[dict, int]:
  """The evaluation's attacks at the evaluation radius (``options.rows()``)
  and the number of leading test images they run on."""
  del train_attack
  attacks = {f"ccat{i}": (row.objective, row.spec(eval_attack.eps))
             for i, row in enumerate(options.rows())}
  return attacks, int(options.eval_subset)


def worst_case(per_example: dict, names) -> tuple[np.ndarray, np.ndarray]:
  """Per example, over the attacks ``names``: the adversarial confidence and
  correctness of the one with the largest wrong-class probability
  (experiments/eval/misc.py:321-333)."""
  other = np.stack([per_example[f"{n}/other"] for n in names])
  pick = np.argmax(other, axis=0)
  cols = np.arange(other.shape[1])
  conf = np.stack([per_example[f"{n}/conf"] for n in names])[pick, cols]
  correct = np.stack([per_example[f"{n}/correct"] for n in names])[pick, cols]
  return conf, correct


def report(per_example: dict, options: Options) -> dict:
  """Confidence-thresholded robust error at ``options.tpr`` (``ccat_*``
  fields of a results row): tau from the last ``threshold_split`` of the
  clean test set, errors over the attacked first ``eval_subset``."""
  names = sorted(k[:-len("/other")] for k in per_example
                 if k.startswith("ccat") and k.endswith("/other"))
  clean_conf = np.asarray(per_example["clean/conf"])
  clean_correct = np.asarray(per_example["clean/correct"], bool)
  n_split = int(options.threshold_split * len(clean_conf))
  held_out = slice(len(clean_conf) - n_split, None)
  if not clean_correct[held_out].any():   # e.g. a smoke run's 20 examples
    return {"ccat_tau": float("nan"), "ccat_robust_error": float("nan"),
            "ccat_robust_error_unthresholded": float("nan"),
            "ccat_adv_rejected": float("nan"), "ccat_num_threshold": n_split,
            "ccat_warning": f"no correctly classified example among the "
                            f"last {n_split} test images to fix tau on"}
  tau = confidence_threshold(clean_conf[held_out], clean_correct[held_out],
                             options.tpr)
  adv_conf, adv_correct = worst_case(per_example, names)
  n = len(adv_conf)
  th = thresholded_errors(tau, clean_correct[:n], clean_conf[:n], adv_conf,
                          adv_correct)
  row = {f"ccat_{k}": v for k, v in th.items()}
  row.update(ccat_num_attacked=n, ccat_num_threshold=n_split,
             ccat_conf_attack_acc=float(np.mean(adv_correct)))
  return row


METHOD = Method("ccat", make_loss, Options, test_attacks=test_attacks,
                report=report,
                reference="davidstutz/confidence-calibrated-adversarial-"
                          "training (experiments/config/common.py)")
