"""Whole training runs as one ``lax.fori_loop`` over steps (synthetic data).

``train_steps`` samples each batch with replacement from an in-memory data
set (Tian's protocol) using ``fold_in(state.key, step)``, so the batch order
depends only on the key and the step, never on how the run was chunked or
resumed. It is a pure function of its inputs: ``vmap`` it over seeds.

The data set is an ``[n, d]`` array, or any pytree with ``num_rows``,
``dtype``, ``take(idx)`` (stored rows) and ``expand(stored)`` (inputs), e.g.
``tsjax.data.synthetic.LowRankData``, which stores rank-k inputs as k
coordinates and rebuilds a batch's inputs with one small matrix product:
``k / d`` of the memory traffic of the gather.

The batch indices of ``index_block`` consecutive steps are drawn in one
vectorised call, and their rows gathered in one gather, before those steps
run (the same keys as ``sample_batch``, so the same batches). On a CPU this
matters twice over: a random-bits call per step costs about as much as the step
itself, and XLA splits a per-step gather from a large array over two threads,
so every step of a single run waited for a second core (2x slower wall time
on two busy cores).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_BATCH_STREAM = 0x5EED
INDEX_BLOCK = 64  # steps whose batches are drawn and gathered together


def _is_array(data) -> bool:
  return not hasattr(data, "expand")


def num_rows(data) -> int:
  """Number of examples of a data set (array or ``take``/``expand`` pytree)."""
  return data.shape[0] if _is_array(data) else data.num_rows


def take_rows(data, idx):
  """Rows ``idx`` of a data set as an input array."""
  return data[idx] if _is_array(data) else data.expand(data.take(idx))


def batch_indices(key, step, n, batch_size):
  """Indices of the batch of step ``step``: ``batch_size`` draws from [0, n)."""
  k = jax.random.fold_in(jax.random.fold_in(key, _BATCH_STREAM), step)
  return jax.random.randint(k, (batch_size,), 0, n)


def sample_batch(key, step, x_train, batch_size):
  idx = batch_indices(key, step, num_rows(x_train), batch_size)
  return {"x": take_rows(x_train, idx)}


def train_steps(step_fn, state, x_train, ctx, num_steps: int, batch_size: int,
                index_block: int = INDEX_BLOCK):
  """Runs ``num_steps`` steps; returns ``(state, stats)``.

  ``stats``: ``loss`` (mean loss over these steps), ``last_loss`` and
  ``all_finite`` (False if any step met a non-finite loss or gradient; those
  steps were skipped). ``index_block`` only trades memory (``index_block x
  batch_size`` indices and stored rows) for speed; results do not depend on
  it.
  """
  num_steps = int(num_steps)
  n = num_rows(x_train)
  block = max(1, min(int(index_block), num_steps))
  num_blocks = -(-num_steps // block)

  if _is_array(x_train):
    take, expand = (lambda idx: x_train[idx]), (lambda rows: rows)
  else:
    take, expand = x_train.take, x_train.expand

  def body(rows, i, carry):
    state, loss_sum, last, ok = carry
    state, m = step_fn(state, {"x": expand(rows[i])}, ctx)
    loss = m["loss"].astype(loss_sum.dtype)
    return (state, loss_sum + jnp.where(m["finite"], loss, 0.0), loss,
            ok & m["finite"])

  def block_body(b, carry):
    state = carry[0]
    steps = state.step + jnp.arange(block, dtype=state.step.dtype)
    idx = jax.vmap(lambda t: batch_indices(state.key, t, n, batch_size))(steps)
    rows = take(idx)  # [block, batch_size, ...] stored rows
    # The last block may be partial (its extra rows are never used).
    count = block if num_steps % block == 0 else jnp.minimum(
        block, num_steps - b * block)
    return jax.lax.fori_loop(0, count, lambda i, c: body(rows, i, c), carry)

  zero = jnp.zeros((), x_train.dtype)
  state, loss_sum, last, ok = jax.lax.fori_loop(
      0, num_blocks, block_body, (state, zero, zero, jnp.array(True)))
  return state, {"loss": loss_sum / max(num_steps, 1), "last_loss": last,
                 "all_finite": ok}
