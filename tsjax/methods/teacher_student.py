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

from typing import Any

import jax
import jax.numpy as jnp

from tsjax import losses
from tsjax.attacks import AttackSpec
# The network pair sits with the models, below the metrics that use it.
from tsjax.models.pair import Networks, disagreement  # noqa: F401


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
