"""Square attack (Andriushchenko, Croce, Flammarion & Hein, ECCV 2020).

A score-based black-box random search, the fourth attack of AutoAttack. It
only queries ``logits_fn`` (no gradients) and minimises the margin

    m(x) = z_y(x) - max_{j != y} z_j(x)        (z = logits),

accepting a candidate when its margin is lower than the current one (or <= 0).
A point stops being queried once its margin is <= 0.

Semantics follow the AutoAttack implementation (fra31/auto-attack
``square.py``, ported in torchattacks ``Square``), with inputs in NHWC:

* ``p_selection``: the fraction of pixels changed per query, ``p_init`` halved
  after iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000. With
  ``resc_schedule=True`` (the default of the reference ``SquareAttack``) the
  iteration is first rescaled to a 10 000-query run
  (``it -> int(it / n_queries * 10000)``); the AutoAttack ensemble builds its
  Square with ``resc_schedule=False`` (fra31/auto-attack ``autoattack.py``),
  so with its 5000 queries p only halves 7 times (last: after 4000).
* Square side at iteration i: ``s = round(sqrt(p * n_features / c))``
  (= round(sqrt(p * H * W))), at least 1 (linf) or at least 3 and odd (l2).
* linf: start at ``x + eps * v`` with vertical stripes ``v in {-1, 1}`` per
  (column, channel), clipped to the box; each query adds ``+-2 eps`` (one
  sign per channel) on an s x s square of the current best point, then clips
  to the eps-ball and the box.
* l2: start from a 5 x 5 grid of centred "meta pseudo-Gaussian" squares with
  random signs per channel, rescaled to norm eps; each query replaces window 1
  by a new pseudo-Gaussian square plus the old (normalised) content, zeroes a
  second window 2 and moves its mass (and the budget left to eps) into
  window 1, then rescales the whole perturbation to norm eps and clips to the
  box.
* Random positions are ``floor(u * (H - s))``, i.e. in {0, ..., H - s - 1}
  (0 when s = H), as in the reference.

Differences to the AutoAttack code, by design: positions, signs and the
transposition of the pseudo-Gaussian square are drawn per example (the
AutoAttack/torchattacks code draws one square position and one sign vector
per iteration, shared by the whole batch; the original square-attack code
draws linf positions per image); the square size stays common to the batch.
Each example's search has the same distribution as in the reference, only
the correlation across examples differs. Every iteration runs one forward
pass on the whole batch (finished examples are masked, not dropped) inside a
``lax.while_loop`` that stops once every example is done; restarts are a
``lax.fori_loop``, each on the examples still robust.

Performance notes (CPU): one ``jax.random.bits`` draw per iteration (each
random call costs a hash evaluation), the l2 update in a [B, C, H*W] layout with
pixel sums as matmuls, the pseudo-Gaussian square placed by slicing a
precomputed canvas, int32 index arithmetic (int64 under x64 is ~4x slower).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from tsjax.attacks import norms as N

LogitsFn = Callable[[jax.Array], jax.Array]

# Iterations after which p halves (of the schedule rescaled to 10 000
# queries when rescaling, reference ``p_selection``).
_P_BREAKS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


# --------------------------------------------------------------------------
# Schedule (static, plain Python / numpy)
# --------------------------------------------------------------------------

def p_selection(it: int, n_queries: int, p_init: float = 0.8,
                rescale: bool = True) -> float:
  """Fraction of pixels changed at iteration ``it`` (0-based) of a run of
  ``n_queries`` queries; with ``rescale`` the schedule is stretched to
  ``n_queries`` as if it were 10 000 (``int(it / n_queries * 10000)``)."""
  it = int(it)
  if rescale:
    it = int(it / n_queries * 10000)
  halvings = sum(it > b for b in _P_BREAKS)
  return p_init / 2 ** halvings


def square_size(p: float, n_features: int, c: int, norm: str) -> int:
  """Side of the square for a pixel fraction ``p`` (the reference formula,
  without the clipping to the image that :func:`square_sizes` adds)."""
  s = int(round(math.sqrt(p * n_features / c)))
  if norm == "linf":
    return max(s, 1)
  s = max(s, 3)
  return s + 1 if s % 2 == 0 else s


def square_sizes(n_queries: int, p_init: float, shape, norm: str,
                 rescale: bool = True) -> np.ndarray:
  """[n_queries] int32: the square side at every iteration for inputs of
  shape ``(H, W, C)`` (clipped to min(H, W), which only matters for images
  smaller than the reference's squares)."""
  h, w, c = shape
  n_features = h * w * c
  sizes = [min(square_size(p_selection(i, n_queries, p_init, rescale),
                           n_features, c, norm), h, w)
           for i in range(int(n_queries))]
  return np.asarray(sizes, np.int32).reshape(-1)


def _eta_rectangles(a: int, b: int) -> np.ndarray:
  """[a, b] nested rectangles around the centre with weights 1/(k+1)^2,
  unit l2 norm (reference ``eta_rectangles``)."""
  d = np.zeros((a, b))
  if a == 0 or b == 0:
    return d
  c0, c1 = a // 2, b // 2
  for k in range(max(a // 2 + 1, b // 2 + 1)):
    d[max(c0, 0):min(c0 + 2 * k + 1, a),
      max(c1, 0):min(c1 + 2 * k + 1, b)] += 1.0 / (k + 1) ** 2
    c0 -= 1
    c1 -= 1
  return d / np.sqrt((d ** 2).sum())


def meta_pseudo_gaussian(s: int) -> np.ndarray:
  """[s, s] unit-norm pattern: positive nested rectangles in the top
  ``s // 2`` rows, negative ones below (reference ``eta`` before its random
  transposition)."""
  d = np.zeros((s, s))
  d[:s // 2] = _eta_rectangles(s // 2, s)
  d[s // 2:] = -_eta_rectangles(s - s // 2, s)
  return d / np.sqrt((d ** 2).sum())


# --------------------------------------------------------------------------
# Pieces of one query (pure jnp; usable and tested on their own)
# --------------------------------------------------------------------------

def margin(logits: jax.Array, y: jax.Array) -> jax.Array:
  """[B] ``z_y - max_{j != y} z_j``."""
  z_y = jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0]
  is_y = jnp.arange(logits.shape[1])[None, :] == y[:, None]
  return z_y - jnp.max(jnp.where(is_y, -jnp.inf, logits), axis=1)


def _box(v, bounds):
  return v if bounds is None else jnp.clip(v, bounds[0], bounds[1])


def _l2_unit(v):
  n = jnp.sqrt(jnp.sum(v * v, axis=(1, 2, 3), keepdims=True))
  return v / (n + 1e-12)


def _local(pos, s, n):
  """Per-example local coordinate ([B, n]) of the window starting at
  ``pos`` [B] with side ``s``, and whether each index is inside it."""
  loc = jnp.arange(n, dtype=jnp.int32)[None, :] - pos.astype(jnp.int32)[:, None]
  return loc, (loc >= 0) & (loc < s)


def _position(bits, n):
  """``floor(u * n)`` with u uniform in [0, 1) from the top 24 of 32 random
  bits (the reference's ``random_int(0, n)`` with a float32 ``torch.rand``):
  a start in {0, ..., n - 1}, or 0 when n = 0."""
  n = jnp.asarray(n, jnp.int32)
  u = (bits >> 8).astype(jnp.float32) * (1.0 / (1 << 24))
  pos = jnp.floor(u * n.astype(jnp.float32)).astype(jnp.int32)
  return jnp.clip(pos, 0, jnp.maximum(n - 1, 0))


def window(vh, vw, s, h, w, dtype):
  """[B, H, W, 1] 0/1 mask of the s x s squares at (vh, vw)."""
  _, in_h = _local(vh, s, h)
  _, in_w = _local(vw, s, w)
  return (in_h[:, :, None] & in_w[:, None, :]).astype(dtype)[..., None]


def pattern_canvases(sizes, h, w, dtype):
  """[K, 2, 2H, 2W]: for every distinct square side in ``sizes``, the meta
  pseudo-Gaussian square (and its transpose) at offset (H, W) of a zero
  canvas, so that placing it at (vh, vw) is one [H, W] slice per example."""
  canv = np.zeros((len(sizes), 2, 2 * h, 2 * w))
  for i, s in enumerate(sizes):
    e = meta_pseudo_gaussian(s)
    canv[i, 0, h:h + s, w:w + s] = e
    canv[i, 1, h:h + s, w:w + s] = e.T
  return jnp.asarray(canv, dtype)


def place_pattern(canvases, k, vh, vw, transpose):
  """[B, H, W, 1]: square ``k`` of ``canvases`` (transposed where
  ``transpose`` [B]) put at (vh, vw) per example, zero outside."""
  _, _, h2, w2 = canvases.shape
  h, w = h2 // 2, w2 // 2
  canv = canvases[k]                                        # [2, 2H, 2W]
  cut = lambda t, a, b: jax.lax.dynamic_slice(canv, (t, a, b), (1, h, w))[0]
  i32 = lambda v: jnp.asarray(v).astype(jnp.int32)
  out = jax.vmap(cut)(i32(transpose), i32(h - vh), i32(w - vw))
  return out[..., None]


def linf_candidate(x, x_best, eps_b, mask, signs, bounds):
  """``x_best`` plus ``2 eps * signs`` (one sign per channel) on ``mask``,
  clipped to the eps-ball around ``x`` and to the box."""
  x_new = x_best + mask * (2.0 * eps_b * signs)
  return _box(jnp.clip(x_new, x - eps_b, x + eps_b), bounds)


def to_bcp(v):
  """[B, H, W, C] -> [B, C, H*W] (the layout of the l2 update: per-channel
  sums over pixels run along the minor axis, several times faster on CPU)."""
  b, h, w, c = v.shape
  return jnp.transpose(v.reshape(b, h * w, c), (0, 2, 1))


def from_bcp(v, h, w):
  """[B, C, H*W] -> [B, H, W, C]."""
  b, c, _ = v.shape
  return jnp.transpose(v, (0, 2, 1)).reshape(b, h, w, c)


def _sum_minor(v):
  """Sum over the last axis, kept as size 1. A matmul with ones: on CPU,
  XLA's fused reductions are several times slower here."""
  return jnp.matmul(v, jnp.ones((v.shape[-1], 1), v.dtype))


def l2_candidate(x, x_best, eps_b, mask1, mask2, pattern, signs, bounds):
  """The reference l2 update, on arrays in the [B, C, H*W] layout.

  ``x``, ``x_best`` [B, C, P]; ``mask1``/``mask2`` [B, 1, P]: windows 1 and
  2; ``pattern`` [B, 1, P]: the unit-norm pseudo-Gaussian square placed on
  window 1; ``signs`` [B, C, 1]; ``eps_b`` [B, 1, 1]. Window 1 becomes
  (pattern * sign + old window-1 content / its norm), per channel rescaled to
  sqrt(max(eps^2 - |delta|^2, 0) / C + |delta on windows 1 and 2|^2);
  window 2 is zeroed outside window 1; the result is rescaled to l2 norm eps
  and clipped to the box.
  """
  b, c, _ = x.shape
  delta = x_best - x
  sq = delta * delta
  sum_p = _sum_minor
  sum_all = lambda v: _sum_minor(v.reshape(b, 1, -1))
  norm_w1 = jnp.sqrt(sum_p(mask1 * sq))                        # [B, C, 1]
  norm_img2 = sum_all(sq)                                      # [B, 1, 1]
  both = jnp.maximum(mask1, mask2)
  norm_wins2 = sum_all(both * sq)                              # [B, 1, 1]
  new = mask1 * (pattern * signs + delta / (1e-12 + norm_w1))
  scale = jnp.sqrt(jnp.maximum(eps_b ** 2 - norm_img2, 0.0) / c + norm_wins2)
  new = new * (scale / (1e-12 + jnp.sqrt(sum_p(new * new))))
  delta = delta * (1.0 - both) + new
  delta = delta * (eps_b / (jnp.sqrt(sum_all(delta * delta)) + 1e-12))
  return _box(x + delta, bounds)


def _linf_init(key, x, eps_b, bounds):
  b, _, w, c = x.shape
  stripes = jax.random.rademacher(key, (b, 1, w, c), x.dtype)
  return _box(x + eps_b * stripes, bounds)


def _l2_init_layout(h, w):
  """Static layout of the l2 start: tile id per pixel (-1: none), local
  coordinates, tile side s = H // 5 and the number of tiles."""
  s = max(h // 5, 1)
  start = max((h - 5 * s) // 2, 0)
  tid = -np.ones((h, w), np.int32)
  li = np.zeros((h, w), np.int32)
  lj = np.zeros((h, w), np.int32)
  t = 0
  for a in range(h // s):
    for bb in range(w // s):
      r0, c0 = start + a * s, start + bb * s
      for i in range(s):
        for j in range(s):
          if r0 + i < h and c0 + j < w:
            tid[r0 + i, c0 + j], li[r0 + i, c0 + j], lj[r0 + i, c0 + j] = t, i, j
      t += 1
  return tid, li, lj, s, t


def _l2_init(key, x, eps_b, bounds):
  b, h, w, c = x.shape
  tid, li, lj, s, n_tiles = _l2_init_layout(h, w)
  eta = meta_pseudo_gaussian(s)
  e = jnp.asarray(eta[li, lj], x.dtype)                         # [H, W]
  et = jnp.asarray(eta[lj, li], x.dtype)
  k_t, k_s = jax.random.split(key)
  flip = jax.random.bernoulli(k_t, 0.5, (b, n_tiles))
  signs = jax.random.rademacher(k_s, (b, n_tiles, c), x.dtype)
  t = jnp.asarray(np.maximum(tid, 0))
  val = jnp.where(flip[:, t], et[None], e[None])                # [B, H, W]
  delta = jnp.where(jnp.asarray(tid >= 0)[None, :, :, None],
                    val[..., None] * signs[:, t, :], 0.0)
  return _box(x + _l2_unit(delta) * eps_b, bounds)


# --------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------

def _single_run(logits_fn, x, y, key, active, *, norm, eps, queries, p_init,
                bounds, resc_schedule=True, record=False):
  """One Square run from a fresh start on the examples where ``active``.

  Returns ``(x_best, margin, n_queries[, history])``: the current point and
  its margin per example, the queries spent (1 for the start plus one per
  iteration the example was still unbroken; 0 where not ``active``) and, with
  ``record``, the [queries, B] margin after every iteration.
  """
  b, h, w, c = x.shape
  eps_b = N.batch_eps(eps, x)
  sizes_np = square_sizes(queries, p_init, (h, w, c), norm,
                          rescale=resc_schedule)
  distinct = sorted(set(sizes_np.tolist())) or [1]
  sizes = jnp.asarray(sizes_np if len(sizes_np) else np.ones(1, np.int32))
  k_of = {s: i for i, s in enumerate(distinct)}
  pat_idx = jnp.asarray(np.asarray([k_of[s] for s in sizes_np] or [0],
                                   np.int32))
  if norm == "l2":
    canvases = pattern_canvases(distinct, h, w, x.dtype)

  k_init, k_loop = jax.random.split(key)
  if norm == "linf":
    x_best = _linf_init(k_init, x, eps_b, bounds)
  else:
    x_best = _l2_init(k_init, x, eps_b, bounds)
  m = margin(logits_fn(x_best), y)
  nq = active.astype(jnp.int32)
  hist = jnp.zeros((max(int(queries), 1) if record else 1, b), m.dtype)
  # The l2 search runs in the [B, C, H*W] layout (see ``to_bcp``).
  if norm == "l2":
    x_work, x_best, eps_w = to_bcp(x), to_bcp(x_best), eps_b.reshape(b, 1, 1)

  def todo(m):
    return active & (m > 0)

  def cond(state):
    i, _, m, _, _ = state
    return (i < queries) & jnp.any(todo(m))

  def body(state):
    i, x_best, m, nq, hist = state
    act = todo(m)
    s = sizes[i]
    # One draw of random bits per iteration (each jax.random call costs a
    # hash evaluation): [B, c] signs, then 2 (linf) or 5 (l2) fields.
    bits = jax.random.bits(jax.random.fold_in(k_loop, i),
                           (b, c + (2 if norm == "linf" else 5)), jnp.uint32)
    signs = 1.0 - 2.0 * (bits[:, :c] >> 31).astype(x.dtype)       # [B, c]
    vh = _position(bits[:, c], h - s)
    vw = _position(bits[:, c + 1], w - s)
    mask1 = window(vh, vw, s, h, w, x.dtype)
    if norm == "linf":
      cand = linf_candidate(x, x_best, eps_b, mask1,
                            signs[:, None, None, :], bounds)
      cand_img = cand
    else:
      signs = signs[:, :, None]
      vh2 = _position(bits[:, c + 2], h - s)
      vw2 = _position(bits[:, c + 3], w - s)
      mask2 = window(vh2, vw2, s, h, w, x.dtype)
      flip = (bits[:, c + 4] >> 31) == 1
      pattern = place_pattern(canvases, pat_idx[i], vh, vw, flip)
      flat = lambda v: v.reshape(b, 1, h * w)
      cand = l2_candidate(x_work, x_best, eps_w, flat(mask1), flat(mask2),
                          flat(pattern), signs, bounds)
      cand_img = from_bcp(cand, h, w)
    m_new = margin(logits_fn(cand_img), y)
    take = act & ((m_new < m) | (m_new <= 0))
    x_best = jnp.where(take.reshape((b,) + (1,) * (cand.ndim - 1)), cand,
                       x_best)
    m = jnp.where(take, m_new, m)
    nq = nq + act.astype(jnp.int32)
    if record:
      hist = hist.at[i].set(m)
    return i + 1, x_best, m, nq, hist

  i, x_best, m, nq, hist = jax.lax.while_loop(
      cond, body, (jnp.asarray(0, jnp.int32), x_best, m, nq, hist))
  if norm == "l2":
    x_best = from_bcp(x_best, h, w)
  if record:
    rows = jnp.arange(hist.shape[0])[:, None]
    hist = jnp.where(rows >= i, m[None, :], hist)
    return x_best, m, nq, hist
  return x_best, m, nq


# --------------------------------------------------------------------------
# The attack
# --------------------------------------------------------------------------

def square(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, key: jax.Array, *,
           norm: str = "linf", eps, queries: int = 5000, p_init: float = 0.8,
           restarts: int = 1, bounds=(0.0, 1.0), resc_schedule: bool = True):
  """Untargeted Square attack with the margin loss.

  Args:
    logits_fn: ``x [B, H, W, C] -> logits [B, K]``; examples must not
      interact. Only queried, never differentiated.
    x: clean inputs [B, H, W, C] inside ``bounds``.
    y: int labels [B].
    key: PRNG key.
    norm: ``"linf"`` or ``"l2"``.
    eps: radius (scalar or per-example [B]).
    queries: iterations per restart (each one batched forward pass; the
      start costs one more).
    p_init: initial fraction of pixels changed per query.
    restarts: runs from fresh random starts, each on the examples still
      robust.
    bounds: ``(low, high)`` box, or ``None``.
    resc_schedule: stretch the schedule of p (the fraction of pixels changed
      per query, see :func:`p_selection`) to ``queries`` as if it were
      10 000 (the reference ``SquareAttack`` default); ``False``: halve p
      after the fixed iterations 10, 50, ..., 8000, as AutoAttack's ensemble
      runs Square.
  Returns:
    ``(x_adv, info)``. ``x_adv``: the misclassified point found for broken
    examples, the clean input otherwise (as the reference). ``info``:
    ``robust`` [B] bool (correctly classified at ``x`` and no misclassified
    point found; decided by argmax as in the reference), ``queries`` [B] int32
    (forward passes spent on the example over all restarts, the start
    included; 0 for examples misclassified at ``x``, which are not attacked),
    ``margin`` [B] (the lowest margin the search reached over the restarts:
    at ``x_adv`` for broken examples; for robust ones at the best point seen,
    which is not returned; the clean margin for examples not attacked).
  """
  if norm not in N.NORMS:
    raise ValueError(f"unknown norm {norm!r}; expected one of {N.NORMS}")
  if int(queries) < 0:
    raise ValueError(f"queries must be >= 0, got {queries}")
  if int(restarts) < 1:
    raise ValueError(f"restarts must be >= 1, got {restarts}")
  if not p_init > 0:
    raise ValueError(f"p_init must be > 0, got {p_init}")
  if x.ndim != 4:
    raise ValueError(f"x must be [B, H, W, C], got shape {x.shape}")
  y = jnp.asarray(y).astype(jnp.int32)
  queries, restarts, p_init = int(queries), int(restarts), float(p_init)

  logits0 = logits_fn(x)
  robust = jnp.argmax(logits0, axis=1) == y
  best_m = jnp.where(robust, jnp.inf, margin(logits0, y)).astype(logits0.dtype)
  nq = jnp.zeros(x.shape[0], jnp.int32)

  def one_restart(r, carry):
    x_adv, robust, nq, best_m = carry
    xb, m, q = _single_run(logits_fn, x, y, jax.random.fold_in(key, r), robust,
                           norm=norm, eps=eps, queries=queries, p_init=p_init,
                           bounds=bounds, resc_schedule=bool(resc_schedule))
    broken = robust & (jnp.argmax(logits_fn(xb), axis=1) != y)
    x_adv = jnp.where(broken[:, None, None, None], xb, x_adv)
    best_m = jnp.where(robust, jnp.minimum(best_m, m), best_m)
    return x_adv, robust & ~broken, nq + q, best_m

  x_adv, robust, nq, best_m = jax.lax.fori_loop(
      0, restarts, one_restart, (x, robust, nq, best_m))
  return x_adv, {"robust": robust, "queries": nq, "margin": best_m}
