"""Pieces shared by the distillation methods (KD, ARD, RSLAD, IAD, FunMatch,
AdvFunMatch; PeerAiD trains its own tutor and needs no fixed teacher).

A distillation loss has the signature of every tsjax method loss,
``loss_fn(params, model_state, batch, key, ctx)``, where ``params`` /
``model_state`` are the *student's* and the frozen teacher travels in
``ctx = teacher_ctx(teacher_params, teacher_model_state)``. The train step
passes ``ctx`` through untouched, so the teacher receives no gradient, is
never updated and is never written into the student's checkpoints.

The teacher always runs in eval mode (running batch-norm statistics) and its
outputs are wrapped in ``stop_gradient``; which *student* terms carry gradient
is decided in each method file, as in its reference code (spec §5).
"""

from __future__ import annotations

from typing import Any

import jax

from tsjax.methods.common import logits_fn

TEACHER = "teacher"


def teacher_ctx(params, model_state=None) -> dict:
  """The ``ctx`` a distillation step needs: the frozen teacher variables."""
  return {TEACHER: {"params": params, "model_state": model_state or {}}}


def _teacher_vars(ctx: Any) -> dict:
  if not isinstance(ctx, dict) or TEACHER not in ctx:
    raise ValueError("a distillation loss needs ctx=teacher_ctx(params, "
                     "model_state) with the frozen teacher's variables")
  return ctx[TEACHER]


def teacher_logits(teacher, ctx: Any, x) -> jax.Array:
  """Logits of the frozen ``teacher`` (a Flax module) at ``x``, eval mode,
  no gradient to anything."""
  return jax.lax.stop_gradient(teacher_logits_fn(teacher, ctx)(x))


def teacher_logits_fn(teacher, ctx: Any):
  """``x -> logits`` of the frozen ``teacher`` (eval mode) for an inner
  maximisation that moves the teacher's input (AdvFunMatch / AdaAD): the
  gradient flows to ``x`` through the teacher, never to its variables."""
  t = _teacher_vars(ctx)
  return logits_fn(teacher, t["params"],
                   jax.lax.stop_gradient(t["model_state"]), "eval")
