"""Shared pieces of the synthetic teacher–student regimes (Yang et al. 2021).

A regime's loss has the signature every tsjax method has::

    loss, (metrics, model_state) = loss_fn(params, model_state, batch, key, ctx)

with ``batch = {"x": [B, d]}`` and ``ctx`` a pytree of per-seed arrays:
``{"teacher": teacher variables, "U": [d, k] basis of the data subspace,
"y_mean": [c] mean teacher output}``. Targets come from the teacher at the
very inputs the student sees ("oracle" semantics), so adversarial and
augmented inputs are labelled by recomputing the teacher there.
Static pieces (the two modules, hyper-parameters) are bound by the regime's
``make_loss`` factory.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from tsjax import losses
from tsjax.attacks import AttackSpec
from tsjax.models.mlp import MLP


@dataclasses.dataclass(frozen=True)
class Networks:
  """The teacher and student modules (static; parameters live elsewhere)."""
  teacher: MLP
  student: MLP

  def teacher_out(self, ctx, x):
    return self.teacher.apply(ctx["teacher"], x)

  def student_out(self, params, x):
    return self.student.apply({"params": params}, x)

  def hiddens(self, params, ctx, x):
    """(teacher hidden activations, student hidden activations)."""
    _, ht = self.teacher.apply(ctx["teacher"], x, return_hidden=True)
    _, hs = self.student.apply({"params": params}, x, return_hidden=True)
    return ht, hs


def disagreement(nets: Networks, params, ctx):
  """Per-example teacher–student squared error at an input: ``x -> [B]``."""
  def fn(x):
    return losses.squared_error(nets.student_out(params, x),
                                jax.lax.stop_gradient(nets.teacher_out(ctx, x)))
  return fn


def ts_attack(norm: str, eps: float, step_size: float, steps: int,
              restarts: int = 1, restrict: str | None = None) -> AttackSpec:
  """The study's attacks: uniform start in the ball, no box, the best
  iterate (and restart) kept per example."""
  return AttackSpec(norm=norm, eps=eps, step_size=step_size, steps=int(steps),
                    restarts=int(restarts), restrict=restrict, keep_best=True,
                    bounds=None)


def worst_case_inputs(nets: Networks, params, ctx, x, key, att: AttackSpec):
  """Inputs in the ball around ``x`` maximising the teacher–student error
  (student parameters held fixed; no gradient flows out of the attack)."""
  params = jax.lax.stop_gradient(params)
  return att.run(disagreement(nets, params, ctx), x, key, U=ctx["U"])


def regression_loss(nets: Networks, params, ctx, x, target=None):
  """Batch mean of ``0.5 ||student(x) - target||^2``; target = teacher(x)."""
  if target is None:
    target = nets.teacher_out(ctx, x)
  per_ex = losses.squared_error(nets.student_out(params, x),
                                jax.lax.stop_gradient(target))
  return jnp.mean(per_ex)


Batch = dict[str, Any]
