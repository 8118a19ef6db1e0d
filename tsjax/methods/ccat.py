"""Confidence-calibrated adversarial training (Stutz, Hein, Schiele 2020).

``ccat_lambda`` is CCAT's power transition
``lambda(delta) = 1 - (1 - min(1, ||delta|| / eps)) ** rho``: the weight of the
uninformative target grows with the perturbation size.

Teacher–student analogue (Yang et al. regime (c), spec §1.5 / §4.3): half of
each batch is clean (target ``f_t(x)``); the other half is attacked with the
teacher–student error objective and trained towards
``(1 - lambda) f_t(x + delta) + lambda * y_mean``, ``y_mean`` being the teacher's
mean output (the regression counterpart of the uniform distribution).
Loss = 0.5 * clean + 0.5 * adversarial.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tsjax.attacks import per_example_norm
from tsjax.methods.teacher_student import (AttackConfig, Networks,
                                           regression_loss, worst_case_inputs)


def ccat_lambda(delta_norm: jax.Array, eps, rho: float) -> jax.Array:
  """CCAT power transition; 0 at ``delta = 0`` and 1 at ``||delta|| >= eps``."""
  r = jnp.minimum(1.0, delta_norm / eps)
  return 1.0 - (1.0 - r) ** rho


def make_ts_loss(nets: Networks, attack: AttackConfig, rho: float,
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
