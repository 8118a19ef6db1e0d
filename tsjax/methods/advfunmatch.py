"""AdvFunMatch (Wu et al. 2023): function matching on the worst-case points
of the eps-ball, spec §3.

Inner maximisation ("mismatched examples"), per example:
``x* = argmax_{||x' - x||_p <= eps} KL(softmax(T(x')/tau) || softmax(S(x')/tau))``
with *both* networks recomputed at ``x'`` (consistent teaching: the teacher
gets the same point as the student), the student in ``attack.bn_mode``
(eval by default) and the teacher in eval mode; the ascent direction is the
gradient through *both* networks (AdaAD's inner loss does not detach
``teacher_model(x_adv)``; neither network's variables get gradient); PGD from
``x + 0.001 N(0, I)`` (``attack.start_std``), ``attack.restarts`` random
restarts vmapped with the per-example best (highest KL) kept.

Outer minimisation at those points:
``L = tau^2 KL(T(x*) || S(x*)) + clean_weight * tau^2 KL(T(x) || S(x))``
(KL summed over classes, averaged over the batch; teacher detached). The
clean term is off by default (the paper's objective); ``clean_weight =
(1 - a) / a`` with the whole loss scaled by ``a`` gives AdaAD's
``a KL_adv + (1 - a) KL_clean``. Strong augmentation (e.g. AutoAugment) is
the experiment's ``augment`` spec: the augmented view is the ``x`` that both
networks see.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tsjax import losses
from tsjax.attacks import pgd
from tsjax.methods.common import accuracy, forward, logits_fn
from tsjax.methods.distill import teacher_logits, teacher_logits_fn


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
                        attack, *, temperature: float = 1.0):
  """The inner maximisation: ``(x*, KL at x*)`` (no gradient)."""
  obj = mismatch_kl(teacher, student, params, model_state, ctx,
                    temperature=temperature, bn_mode=attack.bn_mode)
  x_adv, kl_adv = pgd(obj, x, key, eps=attack.eps, step_size=attack.step_size,
                      steps=attack.steps, norm=attack.norm,
                      restarts=attack.restarts,
                      random_start=attack.random_start,
                      start_std=attack.start_std, bounds=attack.bounds,
                      keep_best=True, return_loss=True)
  return jax.lax.stop_gradient(x_adv), jax.lax.stop_gradient(kl_adv)


def make_loss(student, teacher, attack, *, temperature: float = 1.0,
              clean_weight: float = 0.0):
  def loss_fn(params, model_state, batch, key, ctx):
    x, y = batch["image"], batch["label"]
    x_adv, inner = mismatched_examples(teacher, student, params, model_state,
                                       ctx, x, key, attack,
                                       temperature=temperature)
    t_adv = teacher_logits(teacher, ctx, x_adv)
    s_adv, model_state = forward(student, params, model_state, x_adv, True)
    adv = temperature ** 2 * losses.kl(t_adv, s_adv, temperature=temperature)
    loss, metrics = adv, {}
    if clean_weight:
      t_nat = teacher_logits(teacher, ctx, x)
      s_nat, model_state = forward(student, params, model_state, x, True)
      nat = temperature ** 2 * losses.kl(t_nat, s_nat, temperature=temperature)
      loss = adv + clean_weight * nat
      metrics = {"kl_clean": nat, "acc": accuracy(s_nat, y)}
    return loss, ({"loss": loss, "kl_adv": adv, "inner_kl": jnp.mean(inner),
                   "adv_acc": accuracy(s_adv, y), **metrics}, model_state)
  return loss_fn
