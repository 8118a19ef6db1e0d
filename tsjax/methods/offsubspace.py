"""Off-subspace augmentation: the remedy Yang et al. point to.

A fraction of each batch is moved off the data subspace, ``x + scale * P_perp xi``
with ``xi ~ N(0, I_d)``, and labelled by the teacher at the moved point. The
gradient then reaches the first-layer weight components orthogonal to span(U),
which standard training never moves (spec §1.4).
"""

from __future__ import annotations

import jax

from tsjax.data.synthetic import project_out
from tsjax.methods.teacher_student import Networks, regression_loss


def make_ts_loss(nets: Networks, scale: float, fraction: float = 0.5):
  def loss_fn(params, model_state, batch, key, ctx):
    x = batch["x"]
    xi = jax.random.normal(key, x.shape, x.dtype)
    move = (jax.random.uniform(jax.random.fold_in(key, 1), (x.shape[0], 1))
            < fraction).astype(x.dtype)
    x_aug = x + move * scale * project_out(xi, ctx["U"])
    loss = regression_loss(nets, params, ctx, x_aug)
    return loss, ({"loss": loss}, model_state)
  return loss_fn
