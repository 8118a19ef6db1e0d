"""Square attack: schedule, the linf / l2 updates against the reference's
formulas, constraints, determinism, monotone margins and robust accuracy on a
Fashion-MNIST MLP, and (slow) a cross-check against torchattacks.Square."""

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tsjax.attacks import square as sq
from tsjax.attacks.square import square

from reference_models import (flax_logits_fn, fmnist_reference, to_torch_images,
                              torch_model)


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------

def _ref_p_selection(it, n_queries, p_init, rescale=True):
  """The reference's definition, verbatim (fra31/auto-attack square.py)."""
  if rescale:
    it = int(it / n_queries * 10000)
  if 10 < it <= 50:
    p = p_init / 2
  elif 50 < it <= 200:
    p = p_init / 4
  elif 200 < it <= 500:
    p = p_init / 8
  elif 500 < it <= 1000:
    p = p_init / 16
  elif 1000 < it <= 2000:
    p = p_init / 32
  elif 2000 < it <= 4000:
    p = p_init / 64
  elif 4000 < it <= 6000:
    p = p_init / 128
  elif 6000 < it <= 8000:
    p = p_init / 256
  elif 8000 < it:
    p = p_init / 512
  else:
    p = p_init
  return p


def _ref_eta_rectangles(x, y):
  """Reference ``eta_rectangles`` in numpy, verbatim."""
  delta = np.zeros([x, y])
  x_c, y_c = x // 2 + 1, y // 2 + 1
  counter2 = [x_c - 1, y_c - 1]
  for counter in range(0, max(x_c, y_c)):
    delta[max(counter2[0], 0):min(counter2[0] + (2 * counter + 1), x),
          max(0, counter2[1]):min(counter2[1] + (2 * counter + 1), y)] += (
              1.0 / (counter + 1) ** 2)
    counter2[0] -= 1
    counter2[1] -= 1
  delta /= np.sqrt((delta ** 2).sum(axis=(0, 1), keepdims=True))
  return delta


def _ref_eta(s):
  delta = np.zeros([s, s])
  delta[:s // 2] = _ref_eta_rectangles(s // 2, s)
  delta[s // 2:] = -1.0 * _ref_eta_rectangles(s - s // 2, s)
  delta /= np.sqrt((delta ** 2).sum(axis=(0, 1), keepdims=True))
  return delta


def _ref_l2_step(x, x_best, eps, s, vh, vw, vh2, vw2, eta, signs):
  """One reference l2 update for a single example, NCHW numpy, written as in
  the reference (slices, in-place assignment)."""
  c = x.shape[0]
  delta_curr = x_best - x
  norms_window_1 = np.sqrt((delta_curr[:, vh:vh + s, vw:vw + s] ** 2).sum(
      axis=(-2, -1), keepdims=True))
  m1 = np.zeros_like(x)
  m1[:, vh:vh + s, vw:vw + s] = 1.0
  m2 = np.zeros_like(x)
  m2[:, vh2:vh2 + s, vw2:vw2 + s] = 1.0
  norms_image = np.sqrt(((x_best - x) ** 2).sum())
  norms_windows = np.sqrt(((delta_curr * np.maximum(m1, m2)) ** 2).sum())
  new_deltas = np.ones([c, s, s]) * eta.reshape(1, s, s) * signs.reshape(c, 1, 1)
  old_deltas = delta_curr[:, vh:vh + s, vw:vw + s] / (1e-12 + norms_window_1)
  new_deltas = new_deltas + old_deltas
  new_deltas = (new_deltas / (1e-12 + np.sqrt((new_deltas ** 2).sum(
      axis=(-2, -1), keepdims=True))) * np.sqrt(
          np.maximum(eps ** 2 - norms_image ** 2, 0.0) / c
          + norms_windows ** 2))
  delta_curr[:, vh2:vh2 + s, vw2:vw2 + s] = 0.0
  delta_curr[:, vh:vh + s, vw:vw + s] = new_deltas + 0
  d = delta_curr / (np.sqrt((delta_curr ** 2).sum()) + 1e-12)
  return np.clip(x + d * eps, 0.0, 1.0)


def _norms(x_adv, x):
  d = np.asarray(x_adv - x, np.float64).reshape(x.shape[0], -1)
  return np.abs(d).max(1), np.linalg.norm(d, axis=1)


@pytest.fixture(scope="module")
def ref():
  """The Fashion-MNIST reference MLP (jitted logits) and 500 test images."""
  try:
    model, params, xt, yt = fmnist_reference()
  except FileNotFoundError as e:
    pytest.skip(f"Fashion-MNIST missing (apt-get install "
                f"dataset-fashion-mnist): {e}")
  f = jax.jit(flax_logits_fn(model, params))
  return f, params, jnp.asarray(xt), jnp.asarray(yt, jnp.int32)


def _attack_fn(f, norm, queries, restarts=1):
  """jitted ``(x, y, key, eps) -> (x_adv, info)``; ``eps`` traced and
  broadcast to [B], so scalar and per-example radii share one compile."""
  return jax.jit(lambda x, y, k, eps: square(
      f, x, y, k, norm=norm, eps=jnp.broadcast_to(eps, y.shape),
      queries=queries, restarts=restarts))


NB, QUERIES = 128, 150     # batch and budget of the fast attack-level tests


@pytest.fixture(scope="module")
def small(ref):
  """``(f, x, y, attack)`` on the first NB test images; ``attack(norm,
  restarts=1)`` is compiled once per module."""
  f, _, x, y = ref
  cache = {}

  def attack(norm, restarts=1):
    if (norm, restarts) not in cache:
      cache[norm, restarts] = _attack_fn(f, norm, QUERIES, restarts)
    fn = cache[norm, restarts]
    return lambda x, y, k, eps: fn(x, y, k, jnp.broadcast_to(
        jnp.asarray(eps, x.dtype), y.shape))

  return f, x[:NB], y[:NB], attack


# --------------------------------------------------------------------------
# Schedule and building blocks
# --------------------------------------------------------------------------

def test_p_selection_matches_reference_definition():
  for n in (7, 100, 333, 1000, 5000, 10000, 20000):
    for p_init in (0.8, 0.3):
      for it in range(n):
        assert sq.p_selection(it, n, p_init) == _ref_p_selection(it, n, p_init)
  for it in range(12000):
    assert (sq.p_selection(it, 5000, 0.8, rescale=False)
            == _ref_p_selection(it, 5000, 0.8, rescale=False))
  # A few by hand: 5000 queries map iteration i to int(2 * i).
  assert sq.p_selection(0, 5000) == 0.8
  assert sq.p_selection(5, 5000) == 0.8          # -> 10, not > 10
  assert sq.p_selection(6, 5000) == 0.4          # -> 12
  assert sq.p_selection(25, 5000) == 0.4         # -> 50
  assert sq.p_selection(26, 5000) == 0.2         # -> 52
  assert sq.p_selection(2500, 5000) == 0.8 / 128  # -> 5000
  assert sq.p_selection(4999, 5000) == 0.8 / 512  # -> 9998
  # 1000 queries: i -> 10 i; 10000: the identity.
  assert sq.p_selection(1, 1000) == 0.8 and sq.p_selection(2, 1000) == 0.4
  assert sq.p_selection(10, 10000) == 0.8 and sq.p_selection(11, 10000) == 0.4
  assert sq.p_selection(11, 123, rescale=False) == 0.4


# p at iteration ``it`` of a 5000-query run with p_init = 0.8, written out
# from the reference ``p_selection`` (fra31/auto-attack square.py): p_init
# halved for each of 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000 that the
# iteration exceeds, the iteration first mapped to int(it / 5000 * 10000) =
# 2 it with resc_schedule=True (the SquareAttack default), as is with False
# (how the AutoAttack ensemble builds it: autoattack.py,
# ``SquareAttack(..., n_queries=5000, ..., resc_schedule=False)``).
#         it: (rescaled, not rescaled)
P_5000 = {0: (0.8, 0.8),
          5: (0.8, 0.8),                  # 10 | 5
          6: (0.4, 0.8),                  # 12 | 6
          10: (0.4, 0.8),                 # 20 | 10: not > 10
          11: (0.4, 0.4),                 # 22 | 11
          26: (0.2, 0.4),                 # 52 | 26
          51: (0.2, 0.2),                 # 102 | 51
          101: (0.1, 0.2),                # 202 | 101
          201: (0.1, 0.1),                # 402 | 201
          251: (0.05, 0.1),               # 502 | 251
          501: (0.025, 0.05),             # 1002 | 501
          1001: (0.0125, 0.025),          # 2002 | 1001
          2001: (0.00625, 0.0125),        # 4002 | 2001
          3001: (0.003125, 0.0125),       # 6002 | 3001
          4000: (0.003125, 0.0125),       # 8000: not > 8000 | 4000: not > 4000
          4001: (0.0015625, 0.00625),     # 8002 | 4001
          4999: (0.0015625, 0.00625)}     # 9998 | 4999


def test_p_schedule_pinned_with_and_without_rescaling():
  for it, (resc, plain) in P_5000.items():
    assert sq.p_selection(it, 5000, 0.8) == pytest.approx(resc, rel=1e-12), it
    assert sq.p_selection(it, 5000, 0.8, rescale=True) == pytest.approx(
        resc, rel=1e-12), it
    assert sq.p_selection(it, 5000, 0.8, rescale=False) == pytest.approx(
        plain, rel=1e-12), it
  # Square sides on 28 x 28 x 1 (round(sqrt(p * 784))): the not rescaled
  # 5000-query run ends at p = 0.8 / 128 (side 2), the rescaled one at
  # 0.8 / 512 (side 1).
  resc = sq.square_sizes(5000, 0.8, (28, 28, 1), "linf")
  plain = sq.square_sizes(5000, 0.8, (28, 28, 1), "linf", rescale=False)
  assert resc[0] == plain[0] == 25
  assert resc[6] == 18 and plain[6] == 25      # p 0.4 | 0.8
  assert resc[-1] == 1 and plain[-1] == 2
  assert (plain >= resc).all() and (plain > resc).mean() > 0.5


def test_resc_schedule_reaches_the_run(monkeypatch):
  """``square(..., resc_schedule=...)`` decides the schedule its run uses
  (traced only); the default rescales, as the reference ``SquareAttack``."""
  calls = []
  real = sq.square_sizes

  def spy(n_queries, p_init, shape, norm, rescale=True):
    calls.append(bool(rescale))
    return real(n_queries, p_init, shape, norm, rescale)
  monkeypatch.setattr(sq, "square_sizes", spy)
  f = lambda z: z.reshape(len(z), -1)[:, :3]
  x = jnp.full((2, 4, 4, 1), 0.5)
  y = jnp.zeros(2, jnp.int32)
  for norm in ("linf", "l2"):
    for kw, want in (({}, True), ({"resc_schedule": True}, True),
                     ({"resc_schedule": False}, False)):
      calls.clear()
      jax.eval_shape(lambda k: square(f, x, y, k, norm=norm, eps=0.1,
                                      queries=3, **kw), jax.random.key(0))
      assert calls == [want], (norm, kw)


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("n", [100, 1000, 5000])
def test_square_sizes_match_reference_formula(norm, n):
  h, w, c = 28, 28, 1
  got = sq.square_sizes(n, 0.8, (h, w, c), norm)
  assert got.shape == (n,)
  for i in range(n):
    s = int(round(math.sqrt(_ref_p_selection(i, n, 0.8) * h * w * c / c)))
    if norm == "linf":
      s = max(s, 1)
    else:
      s = max(s, 3)
      s = s + 1 if s % 2 == 0 else s
    assert got[i] == s
  assert got[0] == 25 and np.all(np.diff(got) <= 0)


def test_meta_pseudo_gaussian_matches_reference():
  for s in (1, 2, 3, 4, 5, 6, 9, 25):
    e = sq.meta_pseudo_gaussian(s)
    np.testing.assert_allclose(e, _ref_eta(s), atol=1e-12)
    np.testing.assert_allclose((e ** 2).sum(), 1.0, atol=1e-12)
  e = sq.meta_pseudo_gaussian(5)
  assert np.all(e[:2] > 0) and np.all(e[2:] < 0)
  np.testing.assert_allclose(e, e[:, ::-1])      # symmetric left-right


def test_meta_pseudo_gaussian_matches_torchattacks():
  torch = pytest.importorskip("torch")
  torchattacks = pytest.importorskip("torchattacks")
  atk = torchattacks.Square(torch.nn.Linear(1, 1))
  atk.device = torch.device("cpu")
  for a, b in ((2, 5), (3, 5), (4, 9), (12, 25), (13, 25)):
    np.testing.assert_allclose(sq._eta_rectangles(a, b),
                               atk.eta_rectangles(a, b).numpy(), atol=1e-6)
  for s in (3, 5, 7, 25):
    e = atk.eta(s).numpy()                     # randomly transposed
    ok = [np.allclose(e, t, atol=1e-6)
          for t in (sq.meta_pseudo_gaussian(s), sq.meta_pseudo_gaussian(s).T)]
    assert any(ok)


def test_margin():
  z = jnp.asarray([[3.0, 1.0, 2.0], [0.0, 5.0, 5.0], [1.0, 0.0, -1.0]])
  y = jnp.asarray([0, 1, 2])
  np.testing.assert_allclose(jax.jit(sq.margin)(z, y), [1.0, 0.0, -2.0])


def test_linf_start_is_vertical_stripes_and_update_is_a_square():
  b, h, w, c, eps = 3, 6, 7, 3, 0.1
  x = jnp.full((b, h, w, c), 0.5, jnp.float32)
  x0 = jax.jit(sq._linf_init, static_argnums=3)(jax.random.key(0), x, eps,
                                                (0.0, 1.0))
  d = np.asarray(x0 - x)
  np.testing.assert_allclose(np.abs(d), eps, rtol=1e-5)
  np.testing.assert_array_equal(d, np.broadcast_to(d[:, :1], d.shape))  # const in H
  assert np.unique(np.sign(d[:, 0]).reshape(-1)).size == 2
  # One update from the start: +-2 eps per channel on an s x s square,
  # clipped to the ball: flipped to -d or kept, per channel, inside only.
  vh, vw, s = jnp.asarray([0, 2, 3]), jnp.asarray([0, 4, 1]), 3
  signs = jnp.asarray(np.random.default_rng(0).choice([-1.0, 1.0], (b, 1, 1, c)),
                      x.dtype)

  @jax.jit
  def step(x, x0, vh, vw, signs):
    mask = sq.window(vh, vw, s, h, w, x.dtype)
    return mask, sq.linf_candidate(x, x0, eps, mask, signs, (0.0, 1.0))

  mask, x1 = step(x, x0, vh, vw, signs)
  d1 = np.asarray(x1 - x)
  m = np.asarray(mask)[..., 0] > 0
  for i in range(b):
    assert m[i].sum() == s * s
    assert m[i, vh[i]:vh[i] + s, vw[i]:vw[i] + s].all()
    np.testing.assert_allclose(d1[i][~m[i]], d[i][~m[i]])
    inside = d1[i][m[i]]                                  # [s*s, c]
    np.testing.assert_allclose(inside, np.broadcast_to(
        eps * np.asarray(signs)[i, 0], inside.shape), rtol=1e-5)


def test_l2_start_has_norm_eps_and_centred_tiles():
  b, h, w, c, eps = 2, 28, 28, 3, 0.7
  x = jnp.full((b, h, w, c), 0.5, jnp.float32)
  x0 = jax.jit(sq._l2_init, static_argnums=3)(jax.random.key(1), x, eps,
                                              (0.0, 1.0))
  d = np.asarray(x0 - x, np.float64)
  np.testing.assert_allclose(np.linalg.norm(d.reshape(b, -1), axis=1), eps,
                             rtol=1e-5)
  # 5 x 5 tiles of side 5 starting at (1, 1): the border is untouched, each
  # tile is +-(a possibly transposed) meta pseudo-Gaussian, per channel.
  assert np.all(d[:, 0] == 0) and np.all(d[:, 26:] == 0)
  assert np.all(d[:, :, 0] == 0) and np.all(d[:, :, 26:] == 0)
  e = sq.meta_pseudo_gaussian(5)
  for i in range(b):
    for r in range(5):
      for q in range(5):
        for ch in range(c):
          t = d[i, 1 + 5 * r:6 + 5 * r, 1 + 5 * q:6 + 5 * q, ch]
          t = t / np.linalg.norm(t)
          assert any(np.allclose(t, sgn * p, atol=1e-5)
                     for sgn in (-1, 1) for p in (e, e.T))


def test_l2_update_matches_reference_formulas():
  rng = np.random.default_rng(0)
  b, h, w, c, eps = 4, 10, 9, 3, 1.3
  x = rng.uniform(0, 1, (b, h, w, c))
  d0 = rng.normal(size=(b, h, w, c))
  d0 *= (rng.uniform(0.3, 1.0, (b, 1, 1, 1)) * eps
         / np.linalg.norm(d0.reshape(b, -1), axis=1)[:, None, None, None])
  x_best = np.clip(x + d0, 0, 1)
  s = 5
  vh, vw = rng.integers(0, h - s, b), rng.integers(0, w - s, b)
  vh2, vw2 = rng.integers(0, h - s, b), rng.integers(0, w - s, b)
  vh2[0], vw2[0] = vh[0], vw[0]               # identical windows
  vh2[1], vw2[1] = vh[1] + 1, vw[1]            # overlapping windows
  flip = np.asarray([False, True, False, True])
  signs = rng.choice([-1.0, 1.0], (b, 1, 1, c))
  canvases = sq.pattern_canvases([3, s], h, w, jnp.float64)

  @jax.jit
  def step(x, x_best, vh, vw, vh2, vw2, flip, signs):
    m1 = sq.window(vh, vw, s, h, w, x.dtype)
    m2 = sq.window(vh2, vw2, s, h, w, x.dtype)
    pat = sq.place_pattern(canvases, 1, vh, vw, flip)
    flat = lambda v: v.reshape(b, 1, h * w)
    out = sq.l2_candidate(sq.to_bcp(x), sq.to_bcp(x_best), eps, flat(m1),
                          flat(m2), flat(pat), signs.reshape(b, c, 1),
                          (0.0, 1.0))
    return sq.from_bcp(out, h, w)

  got = np.asarray(step(*map(jnp.asarray, (x, x_best, vh, vw, vh2, vw2, flip,
                                            signs))))
  for i in range(b):
    eta = _ref_eta(s).T if flip[i] else _ref_eta(s)
    want = _ref_l2_step(x[i].transpose(2, 0, 1), x_best[i].transpose(2, 0, 1),
                        eps, s, vh[i], vw[i], vh2[i], vw2[i], eta,
                        signs[i].reshape(c))
    np.testing.assert_allclose(got[i], want.transpose(1, 2, 0), atol=1e-10)


# --------------------------------------------------------------------------
# The attack on the Fashion-MNIST reference model
# --------------------------------------------------------------------------

EPS = {"linf": 0.08, "l2": 1.5}


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_constraints_info_and_determinism(small, norm):
  f, x, y, attack = small
  run = attack(norm)
  eps = EPS[norm]
  x_adv, info = run(x, y, jax.random.key(0), eps)
  linf, l2 = _norms(x_adv, x)
  assert np.all((linf if norm == "linf" else l2) <= eps + 1e-6)
  assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
  clean_ok = np.asarray(jnp.argmax(f(x), 1) == y)
  robust = np.asarray(info["robust"])
  adv_ok = np.asarray(jnp.argmax(f(x_adv), 1) == y)
  np.testing.assert_array_equal(robust, adv_ok)
  assert not np.any(robust & ~clean_ok)
  broken = clean_ok & ~robust
  assert 0 < broken.sum() < clean_ok.sum()
  # Robust examples are returned clean, as in the reference.
  np.testing.assert_array_equal(np.asarray(x_adv)[robust], np.asarray(x)[robust])
  q, m = np.asarray(info["queries"]), np.asarray(info["margin"])
  assert np.all(q[~clean_ok] == 0) and np.all(q[robust] == QUERIES + 1)
  assert np.all((q[broken] >= 1) & (q[broken] <= QUERIES + 1))
  assert np.all(m[broken] <= 0) and np.all(m[robust] > 0)
  np.testing.assert_allclose(m[~clean_ok],
                             np.asarray(sq.margin(f(x), y))[~clean_ok])
  # Same key: identical; another key: a different search.
  x_adv2, info2 = run(x, y, jax.random.key(0), eps)
  np.testing.assert_array_equal(np.asarray(x_adv2), np.asarray(x_adv))
  for k in info:
    np.testing.assert_array_equal(np.asarray(info2[k]), np.asarray(info[k]))
  _, info3 = run(x, y, jax.random.key(1), eps)
  assert not np.array_equal(np.asarray(info3["margin"]), m)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_margin_never_increases(small, norm):
  f, x, y, _ = small
  eps = EPS[norm] / 2
  active = jnp.argmax(f(x), 1) == y
  run = jax.jit(lambda x, y, k: sq._single_run(
      f, x, y, k, active, norm=norm, eps=eps, queries=100, p_init=0.8,
      bounds=(0.0, 1.0), record=True))
  x_best, m, nq, hist = run(x, y, jax.random.key(3))
  hist = np.asarray(hist)
  assert hist.shape == (100, NB)
  act = np.asarray(active)
  assert np.all(np.diff(hist[:, act], axis=0) <= 0)
  assert np.any(np.diff(hist[:, act], axis=0) < 0)
  np.testing.assert_array_equal(hist[-1], np.asarray(m))
  # The stored margin is the margin of the stored point.
  np.testing.assert_allclose(np.asarray(sq.margin(f(x_best), y)), np.asarray(m),
                             rtol=1e-5, atol=1e-5)
  # Queries: 1 for the start, +1 per iteration begun with margin > 0 (the
  # first iteration's starting margin is not recorded: 0 or 1 more).
  nq = np.asarray(nq)
  extra = nq - (1 + np.sum(hist[:-1] > 0, axis=0))
  assert np.all(extra[act] >= 0) and np.all(extra[act] <= 1)
  assert np.all(extra[act & (hist[0] > 0)] == 1)
  assert np.all(nq[~act] == 0)


@pytest.mark.parametrize("norm,eps_grid", [
    ("linf", (0.0, 0.02, 0.05, 0.1, 1.0)),
    ("l2", (0.0, 0.5, 1.5, 3.0, 50.0))])
def test_robust_accuracy_decreases_with_eps(small, norm, eps_grid):
  f, x, y, attack = small
  run = attack(norm)
  clean = float(jnp.mean(jnp.argmax(f(x), 1) == y))
  accs = []
  for eps in eps_grid:
    x_adv, info = run(x, y, jax.random.key(0), eps)
    accs.append(float(jnp.mean(info["robust"])))
    assert float(jnp.mean(jnp.argmax(f(x_adv), 1) == y)) == accs[-1]
  assert accs[0] == clean
  assert all(a >= b for a, b in zip(accs, accs[1:])), accs
  assert accs[1] < clean and accs[-1] == 0.0, accs


def test_restarts_only_break_more(small):
  _, x, y, attack = small
  x1, info1 = jax.tree.map(np.asarray, attack("linf")(
      x, y, jax.random.key(5), 0.05))
  x2, info2 = jax.tree.map(np.asarray, attack("linf", restarts=3)(
      x, y, jax.random.key(5), 0.05))
  # Restart 0 is the single run; later restarts only attack what survived.
  assert not np.any(info2["robust"] & ~info1["robust"])
  assert info2["robust"].sum() < info1["robust"].sum()
  first = ~info1["robust"]
  np.testing.assert_array_equal(x2[first], x1[first])
  assert np.all(info2["queries"] <= 3 * (QUERIES + 1))
  np.testing.assert_array_equal(info2["queries"][info2["robust"]],
                                3 * (QUERIES + 1))
  assert np.all(info2["margin"] <= info1["margin"])


def test_per_example_eps(small):
  f, x, y, attack = small
  eps = np.resize([0.0, 0.01, 0.03, 0.3], NB)
  x_adv, info = attack("linf")(x, y, jax.random.key(0), jnp.asarray(eps))
  linf, _ = _norms(x_adv, x)
  assert np.all(linf <= eps + 1e-6)
  clean_ok = np.asarray(jnp.argmax(f(x), 1) == y)
  robust = np.asarray(info["robust"])
  np.testing.assert_array_equal(robust[eps == 0], clean_ok[eps == 0])
  assert robust[eps == 0.3].sum() < robust[eps == 0.01].sum()


def test_invalid_arguments_raise():
  f = lambda x: x.reshape(x.shape[0], -1)[:, :3]
  x = jnp.zeros((2, 4, 4, 1))
  y = jnp.zeros(2, jnp.int32)
  k = jax.random.key(0)
  with pytest.raises(ValueError, match="norm"):
    square(f, x, y, k, norm="l1", eps=0.1)
  with pytest.raises(ValueError, match="restarts"):
    square(f, x, y, k, eps=0.1, restarts=0)
  with pytest.raises(ValueError, match="queries"):
    square(f, x, y, k, eps=0.1, queries=-1)
  with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
    square(f, x.reshape(2, 16), y, k, eps=0.1)


# --------------------------------------------------------------------------
# Cross-check against torchattacks (slow)
# --------------------------------------------------------------------------

# 1000 queries (schedule rescaled as for 5000): torchattacks.Square takes about
# a minute per 5000-query run on 500 images here. Square is a random search:
# one run's robust accuracy has a seed spread of ~0.5 pp (sd) on this model,
# as large as the tolerance, so each side is averaged over XCHECK_SEEDS runs.
XCHECK_QUERIES = 1000
XCHECK_SEEDS = 3


def _torch_square_robust(params, x, y, norm, eps, queries, seed):
  """Per-example robustness after torchattacks.Square, and the wall time."""
  import torch
  import torchattacks
  threads = torch.get_num_threads()
  torch.set_num_threads(1)   # faster than 2 threads on the shared 2-core CPU
  try:
    net = torch_model(params)
    xt = to_torch_images(np.array(x))   # a writable copy for torch
    yt = torch.from_numpy(np.array(y)).long()
    atk = torchattacks.Square(net, norm=norm, eps=eps, n_queries=queries,
                              n_restarts=1, p_init=0.8, loss="margin",
                              resc_schedule=True, seed=seed)
    t0 = time.time()
    adv = atk(xt, yt)
    elapsed = time.time() - t0
    with torch.no_grad():
      robust = (net(adv).argmax(1) == yt).numpy()
    d = (adv - xt).flatten(1)
    size = (d.abs().max(1)[0] if norm == "Linf" else d.norm(dim=1)).max().item()
  finally:
    torch.set_num_threads(threads)
  assert size <= eps + 1e-5
  return robust, elapsed


@pytest.mark.slow
@pytest.mark.parametrize("norm,eps", [("linf", 0.02), ("linf", 0.05),
                                      ("linf", 0.1), ("l2", 1.0)])
def test_cross_check_torchattacks(ref, norm, eps):
  pytest.importorskip("torch")
  pytest.importorskip("torchattacks")
  f, params, x, y = ref
  n = x.shape[0]
  assert n == 500
  run = _attack_fn(f, norm, XCHECK_QUERIES)
  jax.block_until_ready(run(x[:2], y[:2], jax.random.key(0), eps))  # compile
  ours, theirs, t_ours, t_theirs = [], [], [], []
  for seed in range(XCHECK_SEEDS):
    t0 = time.time()
    x_adv, info = run(x, y, jax.random.key(seed), eps)
    robust = np.asarray(info["robust"])
    t_ours.append(time.time() - t0)
    ours.append(robust.mean())
    linf, l2 = _norms(x_adv, x)
    assert np.all((linf if norm == "linf" else l2) <= eps + 1e-6)
    r, t = _torch_square_robust(params, x, y, {"linf": "Linf", "l2": "L2"}[norm],
                                eps, XCHECK_QUERIES, seed)
    theirs.append(r.mean())
    t_theirs.append(t)
  ours, theirs = np.asarray(ours), np.asarray(theirs)
  diff = abs(ours.mean() - theirs.mean())
  se = math.sqrt(ours.var(ddof=1) / len(ours) + theirs.var(ddof=1) / len(theirs))
  tol = max(0.005, 2 / n)
  print(f"\nsquare {norm} eps={eps} queries={XCHECK_QUERIES}: "
        f"tsjax {np.round(ours, 3)} mean {ours.mean():.4f} "
        f"({np.mean(t_ours):.1f} s/run) | torchattacks {np.round(theirs, 3)} "
        f"mean {theirs.mean():.4f} ({np.mean(t_theirs):.1f} s/run) | "
        f"diff {100 * diff:.2f} pp (tol {100 * tol:.2f} pp, seed s.e. "
        f"{100 * se:.2f} pp)")
  # The tolerance of the brief on the seed-averaged accuracies, widened by
  # two standard errors of the remaining seed noise.
  assert diff <= tol + 2 * se + 1e-9
