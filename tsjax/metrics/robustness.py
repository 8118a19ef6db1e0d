"""Robustness of a student against its teacher (synthetic study).

Robust error is the worst-case teacher–student mean squared error in the
eps-ball (teacher recomputed at the perturbed point: oracle semantics), found
by PGD with vmapped restarts, the best kept per example (spec §1.5: one start
finds only part of the error that 10 restarts find).

The argmax (classification) reading is reported on clean data only: with
oracle labels, any perturbation budget that reaches the teacher's decision
boundaries lets an attack exploit arbitrarily small teacher–student
differences there, so a robust 0/1 error saturates for every student.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tsjax import losses
from tsjax.attacks import AttackSpec
from tsjax.models.pair import Networks, disagreement


def robust_regression_error(nets: Networks, params, ctx, x, key,
                            att: AttackSpec) -> jax.Array:
  """Per-example worst-case MSE (mean over outputs) in the ball; [N]."""
  x_adv = att.run(disagreement(nets, params, ctx), x, key, U=ctx["U"])
  return losses.mean_squared_error(*nets.outputs(params, ctx, x_adv))


def clean_errors(nets: Networks, params, ctx, x) -> dict:
  s, t = nets.outputs(params, ctx, x)
  return {"mse": jnp.mean(losses.mean_squared_error(s, t)),
          "cls_error": jnp.mean(jnp.argmax(s, -1) != jnp.argmax(t, -1)),
          "teacher_var": jnp.mean(jnp.var(t, axis=0))}
