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
from tsjax.models.mlp import MLP, dense_pair, mlp_tail


@dataclasses.dataclass(frozen=True)
class Networks:
  """The teacher and student modules (static; parameters live elsewhere)."""
  teacher: MLP
  student: MLP

  def teacher_out(self, ctx, x):
    return self.teacher.apply(ctx["teacher"], x)

  def student_out(self, params, x):
    return self.student.apply({"params": params}, x)

  def outputs(self, params, ctx, x):
    """``(student(x), teacher(x))``, the teacher's output held fixed
    (stop-gradient: derivatives flow through the student only).

    The two first layers share their input and run as one matrix product
    (``mlp.dense_pair``): the attack's objective, the regression loss and
    the evaluation call this at every step, and on XLA:CPU one wider product
    costs less than two (the study's PGD-AT step ~9% and its evaluation
    attack ~10% faster). The values are ``student_out`` / ``teacher_out``'s
    up to rounding.
    """
    ps, pt = params, ctx["teacher"]["params"]
    s0, t0 = dense_pair(x, ps["hidden_0"]["kernel"], ps["hidden_0"]["bias"],
                        pt["hidden_0"]["kernel"], pt["hidden_0"]["bias"])
    return (mlp_tail(ps, s0, len(self.student.widths)),
            jax.lax.stop_gradient(mlp_tail(pt, t0, len(self.teacher.widths))))

  def hiddens(self, params, ctx, x):
    """(teacher hidden activations, student hidden activations)."""
    _, ht = self.teacher.apply(ctx["teacher"], x, return_hidden=True)
    _, hs = self.student.apply({"params": params}, x, return_hidden=True)
    return ht, hs


def disagreement(nets: Networks, params, ctx):
  """Per-example teacher–student squared error at an input: ``x -> [B]``."""
  def fn(x):
    return losses.squared_error(*nets.outputs(params, ctx, x))
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
    out, target = nets.outputs(params, ctx, x)
  else:
    out = nets.student_out(params, x)
  per_ex = losses.squared_error(out, jax.lax.stop_gradient(target))
  return jnp.mean(per_ex)


Batch = dict[str, Any]
