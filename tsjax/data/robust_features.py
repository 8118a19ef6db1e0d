"""Robust-feature datasets (Ilyas et al. 2019), spec §4.4.

Each input ``x_i`` is re-synthesised as ``x_r = argmin_z ||g(z) - g(x_i)||_2^2``
where ``g`` is a robust network's representation; the optimisation starts from a
different, randomly chosen input and takes l2-normalised gradient steps whose
length decays linearly to zero. All examples are optimised at once (one
``lax.fori_loop``), so the function vmaps over seeds.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from tsjax.attacks.norms import ascent_direction


def synthesize(rep_fn: Callable[[jax.Array], jax.Array], x: jax.Array,
               key: jax.Array, *, steps: int, step_size: float,
               init: str = "shuffled", init_std: float = 1.0,
               bounds=None) -> jax.Array:
  """Inputs whose representation matches ``rep_fn(x)``; shape of ``x``.

  Args:
    rep_fn: ``[N, ...] -> [N, r]`` representation of the robust network.
    x: source inputs [N, ...].
    key: PRNG key for the starting points.
    steps: gradient steps.
    step_size: initial l2 length of a step (decays linearly to 0).
    init: ``"shuffled"`` (start from another input, Ilyas et al.) or
      ``"gaussian"`` (start from ``init_std * N(0, I)``).
    bounds: optional box, e.g. (0, 1) for images.
  """
  target = jax.lax.stop_gradient(rep_fn(x))
  if init == "shuffled":
    z0 = x[jax.random.permutation(key, x.shape[0])]
  elif init == "gaussian":
    z0 = init_std * jax.random.normal(key, x.shape, x.dtype)
  else:
    raise ValueError(f"unknown robust-feature init {init!r}; expected "
                     "'shuffled' or 'gaussian'")

  def loss(z):
    r = rep_fn(z) - target
    return jnp.sum(r * r)

  grad = jax.grad(loss)

  def body(t, z):
    lr = step_size * (1.0 - t / steps)
    z = z - lr * ascent_direction(grad(z), "l2")
    return z if bounds is None else jnp.clip(z, *bounds)

  return jax.lax.fori_loop(0, steps, body, z0)


def representation_error(rep_fn, x_r, x) -> jax.Array:
  """Relative residual ``||g(x_r) - g(x)|| / ||g(x)||`` per example."""
  a, b = rep_fn(x_r), rep_fn(x)
  return jnp.linalg.norm(a - b, axis=-1) / (jnp.linalg.norm(b, axis=-1) + 1e-12)
