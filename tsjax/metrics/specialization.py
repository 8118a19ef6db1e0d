"""Student specialization: per-neuron teacher–student Pearson correlations.

For one hidden layer with teacher activations ``A_t [N, m]`` and student
activations ``A_s [N, n]`` (post-ReLU), ``C[j, k]`` is the Pearson correlation
of teacher node j and student node k over the N inputs (spec §1.3, as in
Tian's ``student_specialization`` code). Per teacher node the best student
match ``rho_j = max_k C[j, k]`` is summarised by its mean and by the number of
teacher nodes with ``rho_j`` above thresholds.

The statistics are streamed: ``corr_update`` merges a batch into running
means and *centred* second moments with the pairwise (Chan et al.) update, so
float32 stays accurate for activations with a large mean, unlike the one-pass
``E[x^2] - E[x]^2``. Every function is pure; ``vmap`` them over seeds.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

DEFAULT_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
_EPS = 1e-10


class CorrStats(NamedTuple):
  count: jax.Array   # [] number of examples seen
  mean_t: jax.Array  # [m]
  mean_s: jax.Array  # [n]
  m2_t: jax.Array    # [m] sum of squared deviations
  m2_s: jax.Array    # [n]
  cross: jax.Array   # [m, n] sum of products of deviations


def corr_init(m: int, n: int, dtype=jnp.float32) -> CorrStats:
  z = lambda *s: jnp.zeros(s, dtype)
  return CorrStats(z(), z(m), z(n), z(m), z(n), z(m, n))


def corr_update(stats: CorrStats, a_t: jax.Array, a_s: jax.Array,
                mask: jax.Array | None = None) -> CorrStats:
  """Merges a batch ``a_t [B, m]``, ``a_s [B, n]`` (optional 0/1 ``mask [B]``)."""
  dtype = stats.mean_t.dtype
  a_t, a_s = a_t.astype(dtype), a_s.astype(dtype)
  w = jnp.ones(a_t.shape[:1], dtype) if mask is None else mask.astype(dtype)
  nb = jnp.sum(w)
  safe_nb = jnp.maximum(nb, 1.0)
  mb_t = (w @ a_t) / safe_nb
  mb_s = (w @ a_s) / safe_nb
  dt = (a_t - mb_t) * w[:, None]
  ds = (a_s - mb_s) * w[:, None]
  m2b_t = jnp.sum(dt * (a_t - mb_t), axis=0)
  m2b_s = jnp.sum(ds * (a_s - mb_s), axis=0)
  crossb = dt.T @ (a_s - mb_s)
  na = stats.count
  n = na + nb
  safe_n = jnp.maximum(n, 1.0)
  delta_t = mb_t - stats.mean_t
  delta_s = mb_s - stats.mean_s
  f = na * nb / safe_n
  return CorrStats(
      count=n,
      mean_t=stats.mean_t + delta_t * nb / safe_n,
      mean_s=stats.mean_s + delta_s * nb / safe_n,
      m2_t=stats.m2_t + m2b_t + delta_t ** 2 * f,
      m2_s=stats.m2_s + m2b_s + delta_s ** 2 * f,
      cross=stats.cross + crossb + jnp.outer(delta_t, delta_s) * f,
  )


def corr_finalize(stats: CorrStats, eps: float = _EPS) -> jax.Array:
  """The [m, n] Pearson correlation matrix."""
  return (stats.cross * jax.lax.rsqrt(stats.m2_t + eps)[:, None]
          * jax.lax.rsqrt(stats.m2_s + eps)[None, :])


def active_nodes(stats: CorrStats, min_var: float = 1e-12) -> jax.Array:
  """Teacher nodes whose activation varies over the data ([m] bool)."""
  return stats.m2_t / jnp.maximum(stats.count, 1.0) > min_var


def specialization_summary(C: jax.Array,
                           thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                           active: jax.Array | None = None) -> dict:
  """Per-teacher-node best matches and their summaries (jittable).

  Returns a dict with ``best_corr [m]``, ``best_index [m]``, ``mean_best``
  (mean over active teacher nodes), ``count_above [T]`` (active teacher nodes
  with best correlation > each threshold), ``success [T, m]`` (bool per node)
  and ``num_active``.
  """
  best = jnp.max(C, axis=1)
  idx = jnp.argmax(C, axis=1)
  if active is None:
    active = jnp.ones(best.shape, bool)
  w = active.astype(C.dtype)
  num_active = jnp.sum(w)
  thr = jnp.asarray(thresholds, C.dtype)
  success = (best[None, :] > thr[:, None]) & active[None, :]
  return {
      "best_corr": best,
      "best_index": idx,
      "mean_best": jnp.sum(best * w) / jnp.maximum(num_active, 1.0),
      "count_above": jnp.sum(success, axis=1),
      "success": success,
      "num_active": num_active,
  }


def streamed_correlations(acts_fn, xs: jax.Array, batch_size: int,
                          dtype=None) -> list[CorrStats]:
  """Streams ``acts_fn(x_batch) -> (teacher_hiddens, student_hiddens)`` over
  ``xs [N, ...]`` in batches (``lax.scan``; the remainder is masked, every
  example counted once) and returns one CorrStats per hidden layer.

  A layer's activations are ``[B * P, units]``: ``P = 1`` row per example,
  or ``P`` rows per example stored example-major (a conv layer's spatial
  positions, ``h.reshape(-1, C)`` of ``[B, H, W, C]``); the example mask is
  repeated ``P`` times to match."""
  n_total = xs.shape[0]
  nb = -(-n_total // batch_size)
  pad = nb * batch_size - n_total
  xp = jnp.concatenate([xs, jnp.zeros((pad,) + xs.shape[1:], xs.dtype)])
  mask = jnp.arange(nb * batch_size) < n_total
  xb = xp.reshape((nb, batch_size) + xs.shape[1:])
  mb = mask.reshape(nb, batch_size)
  ht0, hs0 = jax.eval_shape(acts_fn, xb[0])
  dtype = dtype or xs.dtype
  init = [corr_init(t.shape[-1], s.shape[-1], dtype) for t, s in zip(ht0, hs0)]

  def body(stats, inp):
    x, m = inp
    ht, hs = acts_fn(x)
    return [corr_update(st, t, s, _rows_mask(m, t.shape[0]))
            for st, t, s in zip(stats, ht, hs)], None

  stats, _ = jax.lax.scan(body, init, (xb, mb))
  return stats


def _rows_mask(mask: jax.Array, rows: int) -> jax.Array:
  """The [B] example mask for ``rows = B * P`` example-major rows."""
  b = mask.shape[0]
  if rows % b:
    raise ValueError(f"a layer has {rows} rows for a batch of {b} examples; "
                     f"expected a multiple (rows per example, example-major)")
  return mask if rows == b else jnp.repeat(mask, rows // b)


def perp_drift(w1: jax.Array, w1_init: jax.Array, U: jax.Array) -> jax.Array:
  """``||P_perp (W1(t) - W1(0))||_F / ||W1(0)||_F`` for a first-layer kernel
  stored ``[d, n]`` (columns are fan-in vectors), ``P_perp = I - U U^T``."""
  dw = w1 - w1_init
  perp = dw - U @ (U.T @ dw)
  return jnp.linalg.norm(perp) / jnp.linalg.norm(w1_init)
