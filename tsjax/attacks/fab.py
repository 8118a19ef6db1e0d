"""FAB, the fast adaptive boundary attack (Croce & Hein, ICML 2020), and its
targeted version FAB-T as run inside AutoAttack.

FAB looks for a minimally distorted adversarial example. Each step
linearises the classifier at the current iterate ``x1``: for every class
``k != y`` the logit difference ``f_k - f_y`` and its gradient define a
hyperplane; the one closest in the attacked norm (distance ``|f_k - f_y| /
||grad||_dual``) is chosen and both ``x1`` and the clean point ``x0`` are
projected onto it inside the box (:func:`projection_linf`,
:func:`projection_l2`: exact minimal-norm solutions of ``w . z = b``, ``low <=
z <= high``, batched with a sort and a binary search). The next iterate is the
convex combination ``(1 - alpha) (x1 + eta d1) + alpha (x0 + eta d2)`` with
``alpha = min(|d1| / (|d1| + |d2|), alpha_max)`` (biased towards the clean
point), clipped to the box. Whenever an iterate is adversarial it is recorded
if it is closer to ``x0`` than the best so far, and the iterate is pulled back
towards ``x0``: ``x1 <- x0 + beta (x1 - x0)`` (the backward step).

FAB-T (``targeted=True``) uses only the difference to one target class per
run; the targets are the classes ranked 2nd, 3rd, ... by the clean logits.
Success is still misclassification (``argmax != y``).

Runs are organised as in the reference (fra31/auto-attack ``fab_base.py``):
for each target (targeted) and each restart, one run of ``steps`` steps on the
points that are still robust. Restart 0 starts at ``x``; restart ``r > 0``
starts at ``clip(x + (eps / 2) u / ||u||)`` with ``u`` uniform in [-1, 1]^d
(linf) or standard normal (l2) -- the reference's ``min(res2, eps) / 2`` with
the run's fresh ``res2 = 1e10``. After each run a point counts as broken if the
run found an adversarial point whose perturbation has norm ``<= eps``; broken
points keep that adversarial point and are no longer attacked.

Everything is fixed-shape JAX: the steps are a ``lax.fori_loop``, the runs a
``lax.while_loop`` that stops early when no point is left robust, and points
that are not attacked in a run (already broken, or misclassified from the
start) are computed along but masked out (examples are independent, so this
is the same as running on the subset). Call inside ``jax.jit`` to compile the
whole attack once.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp

from tsjax.attacks import norms as N

LogitsFn = Callable[[jax.Array], jax.Array]

_MASKED_DIFF = 1e10   # the reference's logit difference for the true class
_R_BIG = 1e12         # the reference's clamp in projection_l2


def _take(a, idx):
  """``a[n, idx[n]]`` for a 2-D ``a`` and integer ``idx`` [N]."""
  return a[jnp.arange(a.shape[0]), idx]


def _sorted_values(v, descending: bool = False):
  """Row-wise sorted copy of the float array ``v`` [N, D].

  Sorts order-preserving integer images of the floats (one operand, no
  permutation): on XLA:CPU this is several times faster than ``argsort``."""
  i = jax.lax.sort(_to_ordered_int(v), dimension=1)
  out = _from_ordered_int(i, v.dtype)
  return out[:, ::-1] if descending else out


def _to_ordered_int(v):
  """Order-preserving integer image of a float array (inverse:
  ``_from_ordered_int``)."""
  bits = jnp.finfo(v.dtype).bits
  itype = {16: jnp.int16, 32: jnp.int32, 64: jnp.int64}[bits]
  flip = (1 << (bits - 1)) - 1
  i = jax.lax.bitcast_convert_type(v, itype)
  return i ^ ((i >> (bits - 1)) & flip)


def _from_ordered_int(i, dtype):
  bits = jnp.finfo(dtype).bits
  flip = (1 << (bits - 1)) - 1
  return jax.lax.bitcast_convert_type(i ^ ((i >> (bits - 1)) & flip), dtype)


def _bisect_threshold(test, lo, hi):
  """Per row, the smallest float ``t`` in ``(lo, hi]`` with ``test(t)``
  true, for a ``test`` monotone in ``t`` that is false at ``lo`` and true at
  ``hi`` (rows where that does not hold get a value in ``[lo, hi]``).
  Bisects the floats' order-preserving integer images: one ``test`` per bit
  of the type, every float in between reachable."""
  dtype = lo.dtype
  ilo, ihi = _to_ordered_int(lo), _to_ordered_int(hi)

  def step(_, bounds):
    ilo, ihi = bounds
    # Midpoint without overflow: floor((ilo + ihi) / 2).
    mid = (ilo >> 1) + (ihi >> 1) + (ilo & ihi & 1)
    ok = test(_from_ordered_int(mid, dtype))
    return jnp.where(ok, ilo, mid), jnp.where(ok, mid, ihi)

  _, ihi = jax.lax.fori_loop(0, jnp.finfo(dtype).bits, step, (ilo, ihi))
  return _from_ordered_int(ihi, dtype)


def _binary_search(step, n: int, D: int):
  """The reference's bisection over sorted positions: ``ceil(log2 D)`` steps
  of ``step`` from ``(lb, ub) = (0, D - 1)``."""
  niter = int(math.ceil(math.log2(D))) if D > 1 else 0
  init = (jnp.zeros((n,), jnp.int32), jnp.full((n,), D - 1, jnp.int32))
  return jax.lax.fori_loop(0, niter, step, init)


def _safe_div(num, den):
  ok = den != 0
  return jnp.where(ok, num / jnp.where(ok, den, 1), 0)


# The two projections follow fra31/auto-attack's ``projection_linf`` and
# ``projection_l2`` step by step (sign normalisation, breakpoints, sorted
# bisection with ceil(log2 D) steps, closed form on the bracketing segment,
# the same case split). One implementation detail differs: the reference sorts
# with a permutation and reads prefix sums over the sorted order from cumsums;
# here each prefix sum is evaluated as a sum over {i : breakpoint_i beyond the
# threshold}, and the threshold is found without a permutation: l2 sorts the
# breakpoint values only; linf sorts nothing and bisects over float values
# (see projection_linf).
# The two agree exactly in exact arithmetic (ties included: tied breakpoints
# contribute nothing to the bisection's test values, and the final segment
# never splits a tie) and to rounding in floating point; the sort without a
# permutation is several times faster on CPU.


@jax.jit
def projection_linf(points, w, b):
  """Minimal-linf-norm ``d`` with ``w . (points + d) = b`` and ``points + d``
  in [0, 1]^D, row by row (points, w [N, D]; b [N]).

  If the hyperplane does not meet the box, ``d`` moves to the box corner that
  gets closest to it. fra31/auto-attack's ``projection_linf``.
  """
  t = points
  dt = t.dtype
  sign = jnp.where(jnp.sum(w * t, axis=1) - b >= 0, 1, -1).astype(w.dtype)
  w = w * sign[:, None]
  b = b * sign
  a = (w < 0).astype(dt)
  nonzero = (w != 0).astype(dt)
  d = (a - t) * nonzero            # the move to the corner minimising w . z
  p = a - t * (2 * a - 1)          # room towards that corner (breakpoints)
  aw = jnp.abs(w)
  b = b - jnp.sum(w * t, axis=1)   # required change of w . z (<= 0)
  b0 = jnp.sum(w * d, axis=1)      # the largest decrease the box allows

  def b2_at(tau):
    # The reference's sb[k] - s[k] * p_(k) at tau = p_(k): minus the decrease
    # of w . z reached when every coordinate moves min(p_i, tau).
    return b0 + jnp.sum(aw * jnp.maximum(p - tau[:, None], 0), axis=1)

  c_l = b - b2_at(jnp.min(p, axis=1)) > 0   # the plain linf-ball step fits
  c2 = (b - b0 > 0) & ~c_l         # feasible, some coordinates hit the box
  # The reference bisects over the sorted breakpoints for p_(lb), the
  # smallest breakpoint at which b - b2_at > 0. In the c2 case that holds at
  # max(p) (b2_at = b0) and not at min(p), and b2_at is non-increasing in tau,
  # in floating point too (a fixed-order sum of terms each rounded
  # monotonically). So p_(lb) is also the smallest p_i at or above the
  # threshold where the test turns true, found by bisecting the float's
  # order-preserving integer image: no sort (which cost ~85% of this function
  # on XLA:CPU), the same breakpoint.
  threshold = _bisect_threshold(lambda tau: b - b2_at(tau) > 0,
                                jnp.min(p, axis=1), jnp.max(p, axis=1))
  p_lb = jnp.min(jnp.where(p >= threshold[:, None], p, jnp.inf), axis=1)
  # Prefix sums over the sorted positions 0..lb (all p_i >= p_(lb)).
  top = p >= p_lb[:, None]
  s_lb = jnp.sum(jnp.where(top, aw, 0), axis=1)
  sb_lb = b0 + jnp.sum(jnp.where(top, aw * p, 0), axis=1)
  s_all = jnp.sum(aw, axis=1)
  sb_all = b0 + jnp.sum(aw * p, axis=1)
  lmbd_l = jnp.maximum(_safe_div(b - sb_all, -s_all), 0)[:, None]
  d_l = (2 * a - 1) * lmbd_l
  lmbd_2 = jnp.maximum(_safe_div(b - sb_lb, -s_lb), 0)[:, None]
  d_2 = jnp.minimum(lmbd_2, d) * a + jnp.maximum(-lmbd_2, d) * (1 - a)
  d = jnp.where(c_l[:, None], d_l, jnp.where(c2[:, None], d_2, d))
  return d * nonzero


@jax.jit
def projection_l2(points, w, b):
  """Minimal-l2-norm ``d`` with ``w . (points + d) = b`` and ``points + d``
  in [0, 1]^D, row by row (points, w [N, D]; b [N]).

  If the hyperplane does not meet the box, ``d`` moves to the box corner that
  gets closest to it. fra31/auto-attack's ``projection_l2``.
  """
  t = points
  n, D = t.shape
  c = jnp.sum(w * t, axis=1) - b
  sign = jnp.where(c >= 0, 1, -1).astype(w.dtype)
  w = w * sign[:, None]
  c = c * sign
  small = jnp.abs(w) < 1e-8
  keep = (~small).astype(t.dtype)
  w_safe = jnp.where(small, 1, w)
  # Multiplier at which each coordinate reaches its bound (breakpoints).
  r = jnp.maximum(t / w_safe, (t - 1) / w_safe)
  r = jnp.clip(r, -_R_BIG, _R_BIG)
  r = jnp.where(small, _R_BIG, r)
  r = jnp.where(r == -_R_BIG, _R_BIG, r)
  rs = _sorted_values(r)
  w2 = w * w
  w2_fin = jnp.where(r == _R_BIG, 0, w2)
  w2_inf = jnp.sum(w2 - w2_fin, axis=1)    # coordinates without a breakpoint
  d = -(r * w) * keep              # every coordinate at its bound

  def s_at(tau):
    # The reference's s[k] at tau = rs_(k): minus w . (w min(r, tau)), with
    # its convention that positions without a breakpoint add nothing more.
    finite = tau < _R_BIG
    return -(jnp.sum(w2_fin * jnp.minimum(r, tau[:, None]), axis=1)
             + jnp.where(finite, tau, 0) * w2_inf)

  c4 = s_at(rs[:, 0]) + c < 0      # no coordinate hits the box
  c3 = jnp.sum(d * w, axis=1) + c > 0   # infeasible: stay at the corner
  c2 = ~(c4 | c3)

  def search(_, bounds):
    lb, ub = bounds
    mid = (lb + ub) // 2
    cc = s_at(_take(rs, mid)) + c > 0
    return jnp.where(cc, mid, lb), jnp.where(cc, ub, mid)

  lb, _ = _binary_search(search, n, D)
  rs_lb = _take(rs, lb)
  ws_lb = jnp.sum(jnp.where(r > rs_lb[:, None], w2, 0), axis=1)
  w5 = jnp.sum(w2, axis=1)
  d4 = -_safe_div(c, w5)[:, None] * w
  alpha = (_safe_div(s_at(rs_lb) + c, ws_lb)
           + jnp.where(rs_lb == _R_BIG, 0, rs_lb))
  alpha = jnp.where(ws_lb == 0, 0, alpha)[:, None]
  d2 = jnp.where(alpha > r, d, -alpha * w)
  d = jnp.where(c4[:, None], d4, jnp.where(c2[:, None], d2, d))
  return d * keep


@functools.partial(jax.jit, static_argnames=("norm", "bounds"))
def project_hyperplane(points, w, b, norm: str, bounds=(0.0, 1.0)):
  """Minimal-norm ``d`` with ``w . (points + d) = b`` inside the box
  ``bounds = (low, high)`` (rows of ``points``, ``w`` [N, D]; ``b`` [N]).

  The box is mapped affinely onto [0, 1]^D (exact for the default box)."""
  low, high = bounds
  scale = high - low
  if low == 0.0 and high == 1.0:
    tp, wp, bp = points, w, b
  else:
    tp = (points - low) / scale
    wp = w * scale
    bp = b - low * jnp.sum(w, axis=1)
  if norm == "linf":
    d = projection_linf(tp, wp, bp)
  elif norm == "l2":
    d = projection_l2(tp, wp, bp)
  else:
    raise ValueError(f"unknown norm {norm!r}; expected one of {N.NORMS}")
  return d if scale == 1.0 else d * scale


def _flat_norm(v, norm):
  if norm == "linf":
    return jnp.max(jnp.abs(v), axis=1)
  return jnp.sqrt(jnp.sum(v * v, axis=1))


def _diffs_untargeted(logits_fn, x1, y):
  """Logit differences ``f_k - f_y`` [B, C] (``1e10`` at ``k = y``) and their
  input gradients [B, C, D] (one VJP per class, vmapped)."""
  B = x1.shape[0]
  logits, vjp = jax.vjp(logits_fn, x1)
  C = logits.shape[-1]
  cot = jnp.broadcast_to(jnp.eye(C, dtype=logits.dtype)[:, None, :], (C, B, C))
  g = jax.vmap(vjp)(cot)[0].reshape(C, B, -1)
  g = jnp.swapaxes(g, 0, 1)                              # [B, C, D]
  df = logits - _take(logits, y)[:, None]
  dg = g - jnp.take_along_axis(g, y[:, None, None], axis=1)
  df = jnp.where(jax.nn.one_hot(y, C, dtype=bool), _MASKED_DIFF, df)
  return df, dg


def _diffs_targeted(logits_fn, x1, y, target):
  """``f_target - f_y`` [B, 1] and its input gradient [B, 1, D]."""
  B = x1.shape[0]

  def diff(z):
    lg = logits_fn(z)
    return _take(lg, target) - _take(lg, y)

  df, vjp = jax.vjp(diff, x1)
  dg = vjp(jnp.ones_like(df))[0].reshape(B, 1, -1)
  return df[:, None], dg


def _single_run(logits_fn, x0, y, target, x_start, *, steps, norm, eta,
                alpha_max, beta, bounds):
  """One FAB run of ``steps`` steps from ``x_start``.

  Returns the closest adversarial point found per example and its distance
  to ``x0`` (``inf`` where none was found)."""
  B = x0.shape[0]
  shape = x0.shape
  f0 = x0.reshape(B, -1)
  low, high = bounds

  def body(_, carry):
    x1, adv, res = carry
    if target is None:
      df, dg = _diffs_untargeted(logits_fn, x1, y)
    else:
      df, dg = _diffs_targeted(logits_fn, x1, y, target)
    if norm == "linf":
      dual = jnp.sum(jnp.abs(dg), axis=-1)
    else:
      dual = jnp.sqrt(jnp.sum(dg * dg, axis=-1))
    ind = jnp.argmin(jnp.abs(df) / (1e-12 + dual), axis=1)
    w = jnp.take_along_axis(dg, ind[:, None, None], axis=1)[:, 0]
    x1f = x1.reshape(B, -1)
    b = -_take(df, ind) + jnp.sum(w * x1f, axis=1)
    d3 = project_hyperplane(jnp.concatenate([x1f, f0]),
                            jnp.concatenate([w, w]),
                            jnp.concatenate([b, b]), norm, bounds)
    d1, d2 = d3[:B], d3[B:]
    a0 = jnp.maximum(_flat_norm(d3, norm), 1e-8)
    a1, a2 = a0[:B], a0[B:]
    alpha = jnp.minimum(jnp.maximum(a1 / (a1 + a2), 0), alpha_max)[:, None]
    x1f = jnp.clip((x1f + eta * d1) * (1 - alpha) + (f0 + eta * d2) * alpha,
                   low, high)
    x1 = x1f.reshape(shape)
    is_adv = jnp.argmax(logits_fn(x1), axis=-1) != y
    dist = _flat_norm(x1f - f0, norm)
    better = is_adv & (dist < res)
    adv = jnp.where(N._bcast(better, x1), x1, adv)
    res = jnp.where(better, dist, res)
    x1 = jnp.where(N._bcast(is_adv, x1), x0 + (x1 - x0) * beta, x1)
    return x1, adv, res

  res0 = jnp.full((B,), jnp.inf, x0.dtype)
  _, adv, res = jax.lax.fori_loop(0, int(steps), body, (x_start, x0, res0))
  return adv, res


def _random_start(key, x, eps, norm, bounds):
  """``clip(x + (eps / 2) u / ||u||)``: u uniform in [-1, 1]^d (linf) or
  standard normal (l2), as the reference's restarts."""
  B = x.shape[0]
  if norm == "linf":
    u = jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0)
  else:
    u = jax.random.normal(key, x.shape, x.dtype)
  un = _flat_norm(u.reshape(B, -1), norm)
  start = x + N._bcast(eps * 0.5 / un, x) * u
  return jnp.clip(start, bounds[0], bounds[1])


def fab(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, key: jax.Array, *,
        norm: str = "linf", eps, steps: int = 100, restarts: int = 1,
        targeted: bool = False, n_target_classes: int = 9,
        alpha_max: float = 0.1, eta: float = 1.05, beta: float = 0.9,
        bounds=(0.0, 1.0)):
  """FAB (untargeted) or FAB-T (``targeted``, as in AutoAttack).

  Args:
    logits_fn: ``x [B, ...] -> logits [B, C]``; examples must not interact.
    x: clean inputs [B, ...] inside ``bounds``.
    y: integer labels [B].
    key: PRNG key (random starting points of restarts ``r > 0``).
    norm: ``"linf"`` or ``"l2"``.
    eps: radius (scalar or [B]) deciding success: a point is broken when an
      adversarial point within ``eps`` of it is found.
    steps: FAB steps per run.
    restarts: runs per target (per attack if untargeted); restart 0 starts at
      ``x``, the others at a random point at distance ``eps / 2``.
    targeted: FAB-T: one run per target class, the targets being the classes
      ranked 2nd .. (n_target_classes + 1)-th by the clean logits (at most
      ``C - 1`` of them), each run only on the points still robust.
    alpha_max, eta, beta: FAB's bias towards the clean point, overshoot and
      backward step.
    bounds: the box ``(low, high)`` for the inputs.
  Returns:
    ``(x_adv, info)``: ``x_adv`` [B, ...] is the adversarial point found
    within ``eps`` where there is one, else the clean input. ``info`` has
    ``"robust"`` (bool [B]: correctly classified and no adversarial point
    within ``eps`` found) and ``"norm"`` ([B]: norm of the smallest
    adversarial perturbation found; ``0`` for points misclassified from the
    start, ``inf`` where none was found; for robust points it may be a
    perturbation larger than ``eps``).
  """
  if norm not in N.NORMS:
    raise ValueError(f"unknown norm {norm!r}; expected one of {N.NORMS}")
  if int(steps) < 0:
    raise ValueError(f"steps must be >= 0, got {steps}")
  if int(restarts) < 1:
    raise ValueError(f"restarts must be >= 1, got {restarts}")
  if targeted and int(n_target_classes) < 1:
    raise ValueError(f"n_target_classes must be >= 1, got {n_target_classes}")
  if bounds is None or len(bounds) != 2 or not bounds[1] > bounds[0]:
    raise ValueError(f"bounds must be a box (low, high), got {bounds!r}")
  bounds = (float(bounds[0]), float(bounds[1]))
  restarts = int(restarts)

  B = x.shape[0]
  y = jnp.asarray(y).astype(jnp.int32)
  eps_b = jnp.broadcast_to(jnp.asarray(eps, x.dtype), (B,))
  logits0 = logits_fn(x)
  C = logits0.shape[-1]
  correct = jnp.argmax(logits0, axis=-1) == y

  if targeted:
    n_t = min(int(n_target_classes), C - 1)
    order = jnp.argsort(logits0, axis=-1)                 # ascending
    targets = order[:, C - 2 - jnp.arange(n_t)].T        # [n_t, B]; rank 2..
    n_runs = n_t * restarts
  else:
    targets = None
    n_runs = restarts
  keys = jax.random.split(key, n_runs)
  run = dict(steps=steps, norm=norm, eta=eta, alpha_max=alpha_max, beta=beta,
             bounds=bounds)

  def cond(state):
    i, robust, _, _ = state
    return (i < n_runs) & jnp.any(robust)

  def body(state):
    i, robust, x_adv, best = state
    target = None if targets is None else targets[i // restarts]
    if restarts > 1:
      x_start = jnp.where(i % restarts > 0,
                          _random_start(keys[i], x, eps_b, norm, bounds), x)
    else:
      x_start = x
    adv, res = _single_run(logits_fn, x, y, target, x_start, **run)
    adv = jnp.where(N._bcast(res < jnp.inf, x), adv, x)
    still = jnp.argmax(logits_fn(adv), axis=-1) == y
    dist = _flat_norm((adv - x).reshape(B, -1), norm)
    broken = robust & ~(still | (dist > eps_b))
    x_adv = jnp.where(N._bcast(broken, x), adv, x_adv)
    best = jnp.where(robust, jnp.minimum(best, res), best)
    return i + 1, robust & ~broken, x_adv, best

  best0 = jnp.where(correct, jnp.inf, 0).astype(x.dtype)
  _, robust, x_adv, best = jax.lax.while_loop(
      cond, body, (jnp.asarray(0, jnp.int32), correct, x, best0))
  return x_adv, {"robust": robust, "norm": best}
