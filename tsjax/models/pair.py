"""The synthetic teacher–student network pair (Yang et al. 2021): a teacher
and a student MLP evaluated together, and their per-example disagreement.

Used by the regimes (``tsjax.methods.teacher_student``), the robustness
metrics (``tsjax.metrics.robustness``) and the study's training loop; it
sits with the models so that the metrics below the methods can use it.
"""

from __future__ import annotations

import dataclasses

import jax

from tsjax import losses
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
