"""FGSM / PGD: constraints, analytic optima of linear losses, restarts, jit."""

import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tsjax.attacks import fgsm, pgd
from tsjax.attacks import norms as N
from tsjax.attacks.pgd import CPU_UNROLL_MAX_STEPS, auto_unroll

B, D, K = 6, 8, 3


def _basis(seed=0):
  rng = np.random.default_rng(seed)
  U, _ = np.linalg.qr(rng.normal(size=(D, K)))
  return jnp.asarray(U)


def _inputs(seed=1, low=0.0, high=1.0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.uniform(low, high, size=(B, D)))


def _nonlinear_loss(seed=2):
  """A fixed smooth non-linear per-example loss x [B, D] -> [B]."""
  rng = np.random.default_rng(seed)
  A = jnp.asarray(rng.normal(size=(D, 5)))
  v = jnp.asarray(rng.normal(size=(5,)))
  return lambda x: jnp.tanh(x @ A) @ v + 0.1 * jnp.sum(x * x, axis=1)


def _linear_loss(w):
  return lambda x: x @ w


def _norm(delta, norm):
  delta = np.asarray(delta).reshape(delta.shape[0], -1)
  if norm == "linf":
    return np.abs(delta).max(1)
  return np.linalg.norm(delta, axis=1)


def _split(delta, U):
  """(in-span component, orthogonal component), rows of delta [B, D]."""
  delta = np.asarray(delta)
  U = np.asarray(U)
  inside = delta @ U @ U.T
  return inside, delta - inside


EPS = {"linf": 0.15, "l2": 0.6}


@pytest.mark.parametrize("norm,restrict,bounded", list(itertools.product(
    ("linf", "l2"), (None, "in", "orth"), (False, True))))
def test_pgd_respects_every_constraint(norm, restrict, bounded):
  x = _inputs()
  U = _basis()
  eps = EPS[norm]
  bounds = (0.0, 1.0) if bounded else None
  x_adv, loss = pgd(_nonlinear_loss(), x, jax.random.key(3), eps=eps,
                    step_size=eps / 3, steps=8, norm=norm, restarts=2,
                    bounds=bounds, U=U if restrict else None,
                    restrict=restrict, return_loss=True)
  delta = np.asarray(x_adv - x)
  n = _norm(delta, norm)
  assert np.all(n <= eps + 1e-6), n
  assert np.all(n > 1e-3)  # the attack did move
  if bounded:
    assert np.all(np.asarray(x_adv) >= 0.0) and np.all(np.asarray(x_adv) <= 1.0)
  inside, orth = _split(delta, U)
  scale = np.linalg.norm(delta, axis=1)
  if restrict == "in":
    assert np.all(np.linalg.norm(orth, axis=1) <= 1e-9 * scale)
  elif restrict == "orth":
    assert np.all(np.linalg.norm(inside, axis=1) <= 1e-9 * scale)
  # The reported loss is the loss at the returned point, and beats the start.
  np.testing.assert_allclose(loss, _nonlinear_loss()(x_adv), rtol=1e-12)
  assert np.all(np.asarray(loss) >= np.asarray(_nonlinear_loss()(x)) - 1e-12)



@pytest.mark.parametrize("restrict,bounded", [("in", False), ("orth", False),
                                              ("in", True)])
def test_pgd_l2_restricted_skips_no_constraint(restrict, bounded, monkeypatch):
  """l2 steps along a restricted gradient stay in the subspace, so ``pgd``
  does not restrict them again (``norms.step_keeps_subspace``): the result
  equals the always-restrict loop's up to rounding."""
  x, U = _inputs(), _basis()
  bounds = (0.0, 1.0) if bounded else None
  kw = dict(eps=0.6, step_size=0.2, steps=12, norm="l2", restarts=2,
            bounds=bounds, U=U, restrict=restrict, return_loss=True)
  fast = pgd(_nonlinear_loss(), x, jax.random.key(5), **kw)
  monkeypatch.setattr(N, "step_keeps_subspace", lambda norm: False)
  ref = pgd(_nonlinear_loss(), x, jax.random.key(5), **kw)
  np.testing.assert_allclose(fast[0], ref[0], rtol=1e-12, atol=1e-13)
  np.testing.assert_allclose(fast[1], ref[1], rtol=1e-12)
  assert not N.step_keeps_subspace("linf")  # sign() leaves the subspace

def test_pgd_linf_linear_loss_analytic_optimum():
  rng = np.random.default_rng(4)
  w = jnp.asarray(rng.normal(size=D))
  x = _inputs()
  eps = 0.1
  x_adv = pgd(_linear_loss(w), x, jax.random.key(0), eps=eps, step_size=0.05,
              steps=10, norm="linf")
  np.testing.assert_allclose(x_adv, x + eps * np.sign(np.asarray(w)),
                             atol=1e-12)
  # With the box (0, 1) the optimum is the coordinate-wise clip.
  x_adv = pgd(_linear_loss(w), x, jax.random.key(0), eps=0.4, step_size=0.2,
              steps=10, norm="linf", bounds=(0.0, 1.0))
  np.testing.assert_allclose(
      x_adv, np.clip(np.asarray(x) + 0.4 * np.sign(np.asarray(w)), 0, 1),
      atol=1e-12)


def test_pgd_l2_linear_loss_analytic_optimum():
  rng = np.random.default_rng(5)
  w = np.asarray(rng.normal(size=D))
  x = _inputs()
  eps = 0.7
  x_adv = pgd(_linear_loss(jnp.asarray(w)), x, jax.random.key(1), eps=eps,
              step_size=eps, steps=60, norm="l2")
  np.testing.assert_allclose(x_adv, x + eps * w / np.linalg.norm(w), atol=1e-9)


@pytest.mark.parametrize("restrict", ["in", "orth"])
def test_pgd_l2_restricted_linear_loss_analytic_optimum(restrict):
  rng = np.random.default_rng(6)
  w = np.asarray(rng.normal(size=D))
  U = _basis()
  Un = np.asarray(U)
  Pw = Un @ Un.T @ w if restrict == "in" else w - Un @ Un.T @ w
  x = _inputs()
  eps = 0.5
  x_adv = pgd(_linear_loss(jnp.asarray(w)), x, jax.random.key(2), eps=eps,
              step_size=eps, steps=60, norm="l2", U=U, restrict=restrict)
  np.testing.assert_allclose(x_adv, x + eps * Pw / np.linalg.norm(Pw),
                             atol=1e-9)
  # The unrestricted optimum is strictly better: the restriction was active.
  assert np.all(np.asarray(x_adv - x) @ w < eps * np.linalg.norm(w) - 1e-3)


def test_pgd_per_example_eps():
  rng = np.random.default_rng(7)
  w = np.asarray(rng.normal(size=D))
  x = _inputs()
  eps = jnp.asarray([0.0, 0.05, 0.1, 0.3, 0.6, 1.2])
  e = np.asarray(eps)[:, None]
  x_adv = pgd(_linear_loss(jnp.asarray(w)), x, jax.random.key(3), eps=eps,
              step_size=eps, steps=60, norm="l2")
  np.testing.assert_allclose(x_adv, x + e * w / np.linalg.norm(w), atol=1e-9)
  x_adv = pgd(_linear_loss(jnp.asarray(w)), x, jax.random.key(3), eps=eps,
              step_size=eps / 2, steps=6, norm="linf")
  np.testing.assert_allclose(x_adv, x + e * np.sign(w), atol=1e-12)
  # Non-linear loss: each example stays in its own ball.
  for norm in ("linf", "l2"):
    x_adv = pgd(_nonlinear_loss(), x, jax.random.key(4), eps=eps,
                step_size=eps / 4, steps=5, norm=norm)
    assert np.all(_norm(x_adv - x, norm) <= np.asarray(eps) + 1e-6)


def _multimodal_loss(x):
  """Per-example sum of sin(5 x): many local maxima inside the ball."""
  return jnp.sum(jnp.sin(5.0 * x), axis=1)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_restarts_keep_best_per_example(norm):
  rng = np.random.default_rng(8)
  x = jnp.asarray(rng.normal(size=(16, 3)))
  eps = 2.0
  kwargs = dict(eps=eps, step_size=0.05, steps=30, norm=norm, return_loss=True)
  key = jax.random.key(11)
  R = 5
  attack = jax.jit(lambda x, k, r: pgd(_multimodal_loss, x, k, restarts=r,
                                       **kwargs), static_argnums=2)
  x_r, loss_r = attack(x, key, R)
  runs = [attack(x, k, 1) for k in jax.random.split(key, R)]
  run_x = np.stack([np.asarray(r[0]) for r in runs])
  run_loss = np.stack([np.asarray(r[1]) for r in runs])
  # The individual runs really end in different local maxima ...
  assert np.any(run_loss.max(0) - run_loss.min(0) > 1e-2)
  # ... and restarts keep, per example, the best of them.
  np.testing.assert_allclose(loss_r, run_loss.max(0), rtol=1e-10, atol=1e-12)
  win = run_loss.argmax(0)
  np.testing.assert_allclose(x_r, run_x[win, np.arange(16)], atol=1e-10)
  np.testing.assert_allclose(loss_r, _multimodal_loss(x_r), rtol=1e-12)
  # More restarts never lose to any single one of their runs, and beat the
  # first one somewhere.
  assert np.all(np.asarray(loss_r) >= run_loss[0] - 1e-12)
  assert np.any(np.asarray(loss_r) > run_loss[0] + 1e-3)


def test_fgsm_matches_gradient_step():
  loss_fn = _nonlinear_loss()
  x = _inputs()
  U = _basis()
  g = np.asarray(jax.grad(lambda z: jnp.sum(loss_fn(z)))(x))
  eps = 0.1
  np.testing.assert_allclose(fgsm(loss_fn, x, eps=eps, norm="linf"),
                             x + eps * np.sign(g), atol=1e-12)
  gn = g / np.linalg.norm(g, axis=1, keepdims=True)
  np.testing.assert_allclose(fgsm(loss_fn, x, eps=eps, norm="l2"),
                             x + eps * gn, atol=1e-12)
  np.testing.assert_allclose(
      fgsm(loss_fn, x, eps=0.5, norm="linf", bounds=(0.0, 1.0)),
      np.clip(np.asarray(x) + 0.5 * np.sign(g), 0, 1), atol=1e-12)
  Un = np.asarray(U)
  gin = g @ Un @ Un.T
  gin = gin / np.linalg.norm(gin, axis=1, keepdims=True)
  x_in, loss_in = fgsm(loss_fn, x, eps=eps, norm="l2", U=U, restrict="in",
                       return_loss=True)
  np.testing.assert_allclose(x_in, x + eps * gin, atol=1e-12)
  np.testing.assert_allclose(loss_in, loss_fn(x_in), rtol=1e-12)


def test_pgd_compiles_under_jit_with_traced_eps():
  """The whole attack (restarts, fori_loop) inside jit, eps a traced array."""
  rng = np.random.default_rng(9)
  w = np.asarray(rng.normal(size=D))
  U = _basis()
  Un = np.asarray(U)
  x = _inputs()

  @jax.jit
  def attack(x, key, eps):
    return pgd(_linear_loss(jnp.asarray(w)), x, key, eps=eps, step_size=eps,
               steps=40, norm="l2", restarts=3, U=U, restrict="in",
               return_loss=True)

  eps = jnp.linspace(0.1, 0.6, B)
  x_adv, loss = attack(x, jax.random.key(5), eps)
  Pw = Un @ Un.T @ w
  opt = np.asarray(x) + np.asarray(eps)[:, None] * Pw / np.linalg.norm(Pw)
  np.testing.assert_allclose(x_adv, opt, atol=1e-9)
  np.testing.assert_allclose(loss, opt @ w, rtol=1e-10)
  # Same compiled function, other radii: no retrace needed, still optimal.
  x_adv2, _ = attack(x, jax.random.key(6), 2 * eps)
  np.testing.assert_allclose(x_adv2 - x, 2 * (opt - np.asarray(x)), atol=1e-9)
  assert attack._cache_size() == 1


def test_pgd_unrolls_convolutional_losses_on_cpu():
  """``unroll=None``: on the CPU backend a loss with a convolution gets an
  unrolled step loop (one while loop fewer in the compiled attack; XLA:CPU's
  input-gradient convolution in a loop body is slow), an MLP loss keeps the
  loop; unrolled and looped attacks agree."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.uniform(size=(4, 8, 8, 2)))
  w = jnp.asarray(rng.normal(size=(3, 3, 2, 5)))

  def conv_loss(xa):
    y = jax.lax.conv_general_dilated(xa, w, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO",
                                                        "NHWC"))
    return jnp.sum(jnp.tanh(y) ** 2, axis=(1, 2, 3))

  on_cpu = jax.default_backend() == "cpu"
  assert auto_unroll(conv_loss, x, 10) == on_cpu
  assert auto_unroll(jax.jit(conv_loss), x, 10) == on_cpu    # nested jaxpr
  assert not auto_unroll(conv_loss, x, 1)
  assert not auto_unroll(conv_loss, x, CPU_UNROLL_MAX_STEPS + 1)
  assert not auto_unroll(_nonlinear_loss(), _inputs(), 10)
  kw = dict(eps=0.1, step_size=0.02, steps=10, bounds=(0.0, 1.0),
            return_loss=True)
  attack = lambda unroll: jax.jit(lambda x: pgd(
      conv_loss, x, jax.random.key(0), unroll=unroll, **kw))
  n_while = {u: len(re.findall(r" while\(", attack(u).lower(x).compile()
                               .as_text())) for u in (None, False)}
  assert n_while[None] == n_while[False] - on_cpu
  (xa, la), (xb, lb) = attack(True)(x), attack(False)(x)
  np.testing.assert_allclose(xa, xb, atol=1e-12)
  np.testing.assert_allclose(la, lb, rtol=1e-12)


def test_invalid_arguments_raise():
  x = _inputs()
  f = _nonlinear_loss()
  with pytest.raises(ValueError, match="norm"):
    pgd(f, x, jax.random.key(0), eps=0.1, step_size=0.1, steps=1, norm="l1")
  with pytest.raises(ValueError, match="U"):
    pgd(f, x, jax.random.key(0), eps=0.1, step_size=0.1, steps=1,
        restrict="in")
  with pytest.raises(ValueError, match="restarts"):
    pgd(f, x, jax.random.key(0), eps=0.1, step_size=0.1, steps=1, restarts=0)
