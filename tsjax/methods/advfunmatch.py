"""AdvFunMatch (Wu et al. 2023): function matching on the worst-case points
of the eps-ball, spec §3.

Inner maximisation ("mismatched examples"), per example:
``x* = argmax_{||x' - x||_p <= eps} KL(softmax(T(x')/tau) || softmax(S(x')/tau))``
with *both* networks recomputed at ``x'`` (consistent teaching: the teacher
gets the same point as the student), the student in ``attack.bn_mode``
(eval by default; "train" uses batch statistics and leaves the running ones
as they are) and the teacher in eval mode; the ascent direction is the
gradient through *both* networks (AdaAD's inner loss does not detach
``teacher_model(x_adv)``; neither network's variables get gradient); PGD from
``x + 0.001 N(0, I)`` (``attack.start_std``), ``attack.restarts`` random
restarts vmapped; the point returned is the per-example best (highest KL)
iterate with ``attack.keep_best=True`` (the default recipe: the worst case
of the ball the objective asks for) or the last iterate (``False``, AdaAD's
AT_helper.py:22-48).

Outer minimisation at those points:
``L = tau^2 KL(T(x*) || S(x*)) + clean_weight * tau^2 KL(T(x) || S(x))``
(teacher detached; ``Options.reduction``: ``"batchmean"`` sums over classes
and averages over the batch, FunMatch's convention and the default;
``"mean"`` divides by B * C like AdaAD's ``nn.KLDivLoss()``, main.py:342-345).
The paper's code is not public, so both choices are fields. The
clean term is off by default (the paper's objective); ``clean_weight =
(1 - a) / a`` with the whole loss scaled by ``a`` gives AdaAD's
``a KL_adv + (1 - a) KL_clean``. With a clean term, or with
``clean_pass=True``, the student's train-mode pass on ``x`` runs *before* the
one on ``x*`` (AdaAD boyellow/AdaAD main.py:333-334: ``net(inputs)`` then
``net(adv_inputs)``, both in train mode, even at ``alpha = 1`` where the
clean logits enter no loss but the batch-norm running statistics see the
clean batch first).

Where the defaults stand against AdaAD (the closest public code; the
``adaad`` config variant sets all of AdaAD's values): weight decay 2e-4 (the
distillation references' common setting) vs AdaAD's 5e-4 (main.py:64,
``train.weight_decay``); one train-mode pass vs two (``clean_pass``);
``reduction="batchmean"`` = AdaAD's CIFAR-100 branch (main.py:347-351,
``(1/B) sum KLDivLoss(reduce=False)``) vs its CIFAR-10 branch
``nn.KLDivLoss()`` = ``"mean"``, a division by B * C (main.py:342-345); the
best iterate (``attack.keep_best=True``) vs AdaAD's last (AT_helper.py:22-48). Strong augmentation (e.g. AutoAugment) is
the experiment's ``augment`` spec: the augmented view is the ``x`` that both
networks see.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from tsjax import config_checks as cc
from tsjax import losses
from tsjax.attacks import AttackSpec
from tsjax.methods.common import accuracy, forward, logits_fn
from tsjax.methods.distill import teacher_logits, teacher_logits_fn
from tsjax.methods.registry import Method


@dataclasses.dataclass(frozen=True)
class Options:
  temperature: float = 1.0
  clean_weight: float = 0.0
  reduction: str = "batchmean"
  clean_pass: bool = False       # AdaAD main.py:333: net(inputs) at alpha=1

  def __post_init__(self):
    cc.require(self, "temperature",
               cc.number_in(self.temperature, 0, low_open=True), "> 0")
    cc.require(self, "clean_weight", cc.number_in(self.clean_weight, 0), ">= 0")
    cc.require(self, "reduction", self.reduction in losses.KL_REDUCTIONS[:3],
               f"one of {list(losses.KL_REDUCTIONS[:3])}")
    cc.require(self, "clean_pass", isinstance(self.clean_pass, bool),
               "True or False")


def mismatch_kl(teacher, student, params, model_state, ctx, *,
                temperature: float = 1.0, bn_mode: str = "eval"):
  """``x' -> [B]`` per-example KL(T(x') || S(x')), the inner objective,
  differentiable in ``x'`` through the teacher and the student."""
  f = logits_fn(student, params, model_state, bn_mode)
  g = teacher_logits_fn(teacher, ctx)

  def objective(xa):
    return losses.kl(g(xa), f(xa), temperature=temperature, reduction="none")
  return objective


def mismatched_examples(teacher, student, params, model_state, ctx, x, key,
                        attack: AttackSpec, *, temperature: float = 1.0):
  """The inner maximisation: ``(x*, KL at x*)`` (no gradient)."""
  obj = mismatch_kl(teacher, student, params, model_state, ctx,
                    temperature=temperature, bn_mode=attack.bn_mode)
  return attack.run(obj, x, key, return_loss=True)


def make_loss(student, *, teacher, attack: AttackSpec,
              options: Options = Options()):
  temperature, clean_weight = options.temperature, options.clean_weight
  clean_pass = options.clean_pass or bool(clean_weight)
  kl = lambda t, s: temperature ** 2 * losses.kl(
      t, s, temperature=temperature, reduction=options.reduction)

  def loss_fn(params, model_state, batch, key, ctx):
    x, y = batch["image"], batch["label"]
    x_adv, inner = mismatched_examples(teacher, student, params, model_state,
                                       ctx, x, key, attack,
                                       temperature=temperature)
    metrics = {}
    if clean_pass:
      s_nat, model_state = forward(student, params, model_state, x, True)
      metrics["acc"] = accuracy(s_nat, y)
    t_adv = teacher_logits(teacher, ctx, x_adv)
    s_adv, model_state = forward(student, params, model_state, x_adv, True)
    adv = kl(t_adv, s_adv)
    loss = adv
    if clean_weight:
      nat = kl(teacher_logits(teacher, ctx, x), s_nat)
      loss = adv + clean_weight * nat
      metrics["kl_clean"] = nat
    return loss, ({"loss": loss, "kl_adv": adv, "inner_kl": jnp.mean(inner),
                   "adv_acc": accuracy(s_adv, y), **metrics}, model_state)
  return loss_fn


METHOD = Method("advfunmatch", make_loss, Options, needs_teacher=True,
                reference="Wu et al. 2023 (code not public); inner/outer as "
                          "AdaAD (main.py, AT_helper.py) with alpha = 1")
