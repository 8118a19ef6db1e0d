"""TrainState and the jit-able train step built from a method's pure loss."""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  params: Any
  model_state: Any
  opt_state: Any
  step: jax.Array
  key: jax.Array   # typed PRNG key; per-step keys are fold_in(key, step)

  @classmethod
  def create(cls, params, optimizer: optax.GradientTransformation, key,
             model_state=None):
    return cls(params=params, model_state={} if model_state is None else model_state,
               opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32),
               key=key)


def make_train_step(loss_fn: Callable, optimizer: optax.GradientTransformation):
  """``step(state, batch, ctx) -> (state, metrics)`` (pure; jit or scan it).

  ``loss_fn(params, model_state, batch, key, ctx) -> (loss, (metrics,
  model_state))``; the step key is ``fold_in(state.key, state.step)``.
  ``metrics["finite"]`` is False when the loss or a gradient is not finite;
  the update is then skipped so the state stays the last good one.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state: TrainState, batch, ctx):
    key = jax.random.fold_in(state.key, state.step)
    (loss, (metrics, model_state)), grads = grad_fn(
        state.params, state.model_state, batch, key, ctx)
    finite = jnp.isfinite(loss) & jnp.all(jnp.asarray(
        [jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(
        lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = state.replace(
        params=keep(params, state.params),
        model_state=keep(model_state, state.model_state),
        opt_state=keep(opt_state, state.opt_state),
        step=state.step + 1)
    return new_state, {**metrics, "loss": loss, "finite": finite}

  return step
