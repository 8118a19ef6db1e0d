"""PGD adversarial training (Madry et al. 2018).

Teacher–student regression (Yang et al. regime (b)): each input is replaced by
``x + delta*`` where ``delta*`` maximises the teacher–student squared error
inside the eps-ball (PGD, random start); the target at ``x + delta*`` is the
teacher's output *there* (the teacher is an oracle).
"""

from __future__ import annotations

import jax

from tsjax.methods.teacher_student import (AttackConfig, Networks,
                                           regression_loss, worst_case_inputs)


def make_ts_loss(nets: Networks, attack: AttackConfig):
  def loss_fn(params, model_state, batch, key, ctx):
    x_adv = worst_case_inputs(nets, params, ctx, batch["x"], key, attack)
    loss = regression_loss(nets, params, ctx, x_adv)
    return loss, ({"loss": loss}, model_state)
  return loss_fn
