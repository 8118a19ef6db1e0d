"""Whole training runs as one ``lax.fori_loop`` over steps (synthetic data).

``train_steps`` samples each batch with replacement from an in-memory data
set (Tian's protocol) using ``fold_in(state.key, step)``, so the batch order
depends only on the key and the step, never on how the run was chunked or
resumed. It is a pure function of its inputs: ``vmap`` it over seeds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_BATCH_STREAM = 0x5EED


def sample_batch(key, step, x_train, batch_size):
  k = jax.random.fold_in(jax.random.fold_in(key, _BATCH_STREAM), step)
  idx = jax.random.randint(k, (batch_size,), 0, x_train.shape[0])
  return {"x": x_train[idx]}


def train_steps(step_fn, state, x_train, ctx, num_steps: int, batch_size: int):
  """Runs ``num_steps`` steps; returns ``(state, stats)``.

  ``stats``: ``loss`` (mean loss over these steps), ``last_loss`` and
  ``all_finite`` (False if any step met a non-finite loss or gradient; those
  steps were skipped).
  """
  def body(_, carry):
    state, loss_sum, last, ok = carry
    batch = sample_batch(state.key, state.step, x_train, batch_size)
    state, m = step_fn(state, batch, ctx)
    loss = m["loss"].astype(loss_sum.dtype)
    return (state, loss_sum + jnp.where(m["finite"], loss, 0.0), loss,
            ok & m["finite"])

  zero = jnp.zeros((), x_train.dtype)
  state, loss_sum, last, ok = jax.lax.fori_loop(
      0, int(num_steps), body, (state, zero, zero, jnp.array(True)))
  return state, {"loss": loss_sum / max(int(num_steps), 1), "last_loss": last,
                 "all_finite": ok}
