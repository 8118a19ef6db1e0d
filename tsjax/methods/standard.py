"""Standard training.

Teacher–student regression (Tian 2019; Yang et al. 2021 regime (a)): the
student minimises ``0.5 ||f_s(x) - f_t(x)||^2`` averaged over the batch.
"""

from __future__ import annotations

from tsjax.methods.teacher_student import Networks, regression_loss


def make_ts_loss(nets: Networks):
  def loss_fn(params, model_state, batch, key, ctx):
    del key
    loss = regression_loss(nets, params, ctx, batch["x"])
    return loss, ({"loss": loss}, model_state)
  return loss_fn
