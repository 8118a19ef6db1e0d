"""Norm balls, steepest-ascent steps, projections and subspace restrictions.

All functions act per example on arrays of shape [B, ...]; norms are taken over
every non-batch axis. ``restrict`` is one of ``None`` (no restriction), ``"in"``
(keep the component inside span(U)) or ``"orth"`` (keep the component in the
orthogonal complement of span(U)); U is ``[D, k]`` with orthonormal columns,
D the flattened input size.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

NORMS = ("linf", "l2")
RESTRICTIONS = (None, "in", "orth")
_TINY = 1e-12


def _flat(v):
  return v.reshape(v.shape[0], -1)


def batch_eps(eps, like: jax.Array) -> jax.Array:
  """A scalar or per-example [B] radius, shaped to broadcast against ``like``."""
  eps = jnp.broadcast_to(jnp.asarray(eps, like.dtype), (like.shape[0],))
  return _bcast(eps, like)


def per_example_norm(v: jax.Array, norm: str) -> jax.Array:
  """[B] norms over the non-batch axes."""
  f = _flat(v)
  if norm == "linf":
    return jnp.max(jnp.abs(f), axis=1)
  if norm == "l2":
    return jnp.sqrt(jnp.sum(f * f, axis=1))
  raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")


def _bcast(s, like):
  return s.reshape((-1,) + (1,) * (like.ndim - 1))


def restrict_subspace(v: jax.Array, U: jax.Array | None,
                      restrict: str | None) -> jax.Array:
  """Keeps the part of ``v`` in span(U) ("in") or its complement ("orth")."""
  if restrict is None:
    return v
  if U is None:
    raise ValueError(f"restrict={restrict!r} needs the subspace basis U")
  f = _flat(v)
  inside = (f @ U) @ U.T
  if restrict == "in":
    out = inside
  elif restrict == "orth":
    out = f - inside
  else:
    raise ValueError(f"unknown restriction {restrict!r}; expected one of "
                     f"{RESTRICTIONS}")
  return out.reshape(v.shape)


def step_keeps_subspace(norm: str) -> bool:
  """Whether a steepest-ascent step along a restricted gradient stays in the
  subspace: yes for l2 (the step is a multiple of the gradient), no for linf
  (its sign leaves the subspace)."""
  return norm == "l2"


def ascent_direction(g: jax.Array, norm: str) -> jax.Array:
  """Steepest-ascent direction for a unit step in the given norm."""
  if norm == "linf":
    return jnp.sign(g)
  if norm == "l2":
    return g / _bcast(per_example_norm(g, "l2") + _TINY, g)
  raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")


def project_ball(delta: jax.Array, eps, norm: str, *,
                 exact_linf: bool = True) -> jax.Array:
  """Maps ``delta`` into the eps-ball of the norm.

  l2: the Euclidean projection (radial rescaling). linf: coordinate clipping
  (the Euclidean projection) when ``exact_linf``; otherwise radial rescaling,
  which keeps ``delta`` inside any linear subspace it lies in.
  """
  eps = batch_eps(eps, delta)
  if norm == "linf" and exact_linf:
    return jnp.clip(delta, -eps, eps)
  n = _bcast(per_example_norm(delta, norm), delta)
  return delta * jnp.minimum(1.0, eps / (n + _TINY))


def fit_box(x: jax.Array, delta: jax.Array, bounds, *, exact: bool = True):
  """Keeps ``x + delta`` inside the box ``bounds = (low, high)``.

  ``exact``: clip coordinates (for x inside the box this never increases any
  |delta_i|, so it preserves every norm bound). Otherwise shrink ``delta``
  radially by the largest factor in [0, 1] that fits, which preserves the
  direction (and so any subspace restriction).
  """
  if bounds is None:
    return delta
  low, high = bounds
  if exact:
    return jnp.clip(x + delta, low, high) - x
  room_up = jnp.where(delta > 0, (high - x) / jnp.where(delta > 0, delta, 1.0),
                      jnp.inf)
  room_dn = jnp.where(delta < 0, (low - x) / jnp.where(delta < 0, delta, 1.0),
                      jnp.inf)
  t = jnp.minimum(jnp.min(_flat(room_up), axis=1), jnp.min(_flat(room_dn), axis=1))
  t = jnp.clip(t, 0.0, 1.0)
  return delta * _bcast(t, delta)


def feasible(x, delta, eps, norm, *, U=None, restrict=None, bounds=None,
             restricted: bool = False):
  """Maps ``delta`` to a perturbation satisfying every constraint at once.

  Restriction first, then the norm ball, then the box. With a restriction the
  linf ball and the box use radial rescaling so the restricted component stays
  exactly as zero as the restriction made it. ``restricted=True``: ``delta``
  already lies in the allowed subspace (``step_keeps_subspace``), so the
  restriction's two products are skipped; the ball and the box are applied
  as with the restriction.
  """
  exact = restrict is None
  if not restricted:
    delta = restrict_subspace(delta, U, restrict)
  delta = project_ball(delta, eps, norm, exact_linf=exact)
  return fit_box(x, delta, bounds, exact=exact)


def random_in_ball(key, x, eps, norm, *, U=None, restrict=None):
  """A random perturbation in the (restricted) eps-ball: uniform for linf
  without restriction, otherwise a uniformly random direction in the allowed
  subspace with radius ``eps * u ** (1 / dim)``."""
  eps = batch_eps(eps, x)
  if norm == "linf" and restrict is None:
    return jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0) * eps
  kd, kr = jax.random.split(key)
  g = restrict_subspace(jax.random.normal(kd, x.shape, x.dtype), U, restrict)
  dim = _flat(x).shape[1]
  if restrict == "in":
    dim = U.shape[1]
  elif restrict == "orth":
    dim = dim - U.shape[1]
  g = g / _bcast(per_example_norm(g, "l2") + _TINY, g)
  r = jax.random.uniform(kr, (x.shape[0],), x.dtype) ** (1.0 / max(dim, 1))
  delta = g * _bcast(r, x)
  # Scale so the perturbation fills the ball of the requested norm.
  scale = eps / (_bcast(per_example_norm(g, norm), x) + _TINY)
  return delta * scale


def check_inputs(x, U=None, eps=None, step_size=None) -> None:
  """Shapes and dtypes at an attack's boundary (static, free under jit):
  floating ``x`` [B, ...]; ``U`` [prod(x.shape[1:]), k]; ``eps`` and
  ``step_size`` scalars or [B]."""
  chex.assert_type(x, float, custom_message="attack input x must be floating")
  if x.ndim < 2:
    raise ValueError(f"attack input x must be batched [B, ...]; got shape "
                     f"{x.shape}")
  if U is not None:
    d = 1
    for n in x.shape[1:]:
      d *= n
    chex.assert_rank(U, 2, custom_message="subspace basis U must be [d, k]")
    if U.shape[0] != d:
      raise ValueError(f"subspace basis U has {U.shape[0]} rows; the inputs "
                       f"have d = {d} features per example (shape {x.shape})")
  for name, v in (("eps", eps), ("step_size", step_size)):
    if v is not None and jnp.ndim(v) != 0 and jnp.shape(v) != (x.shape[0],):
      raise ValueError(f"{name} must be a scalar or [B] = [{x.shape[0]}]; "
                       f"got shape {jnp.shape(v)}")
