"""CCAT's F7P optimiser (``AttackSpec(optimizer="backtrack")``) against a
NumPy transcription of the reference loop
(confidence-calibrated-adversarial-training attacks/batch_gradient_descent.py,
written here for maximisation)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tsjax.attacks import AttackSpec


def _reference(x, c, eps, lr0, steps, mu, factor):
  def f(z):
    return -np.sum((z - c) ** 2, axis=1)

  def grad(z):
    return -2.0 * (z - c)

  def project(d):
    d = np.clip(d, -eps, eps)
    return np.clip(x + d, 0.0, 1.0) - x

  b = x.shape[0]
  delta, m = np.zeros_like(x), np.zeros_like(x)
  lr = np.full((b, 1), lr0)
  best, best_d = np.full(b, -np.inf), np.zeros_like(x)
  for i in range(steps + 1):
    delta = project(delta)
    loss = f(x + delta)
    better = loss > best
    best[better], best_d[better] = loss[better], delta[better]
    if i == steps:
      break
    m = mu * m + (1 - mu) * np.sign(grad(x + delta))
    ok = f(x + project(delta + lr * m)) >= loss
    delta = np.where(ok[:, None], delta + lr * m, delta)
    lr = np.where(ok[:, None], lr, np.maximum(lr / factor, 1e-20))
  return x + best_d


@pytest.mark.parametrize("steps", [1, 7, 40])
def test_backtracking_matches_reference_loop(steps):
  rng = np.random.default_rng(0)
  x = rng.uniform(0.2, 0.8, (5, 6))
  c = rng.uniform(0.0, 1.0, (5, 6))
  spec = AttackSpec(norm="linf", eps=0.1, step_size=0.05, steps=steps,
                    start="zero", optimizer="backtrack", momentum=0.9,
                    lr_factor=1.5)
  got = spec.run(lambda z: -jnp.sum((z - c) ** 2, axis=1), jnp.asarray(x),
                 jax.random.key(0))
  want = _reference(x, c, 0.1, 0.05, steps, 0.9, 1.5)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-12)
  assert np.all(np.abs(np.asarray(got) - x) <= 0.1 + 1e-12)


def test_mixed_start_with_restarts_stays_in_the_ball_and_improves():
  x = jnp.full((4, 8), 0.5)
  c = jnp.linspace(0.0, 1.0, 8)[None].repeat(4, 0)
  obj = lambda z: -jnp.sum((z - c) ** 2, axis=1)
  one = AttackSpec(eps=0.2, step_size=0.02, steps=5, start="mixed",
                   optimizer="backtrack")
  many = one.replace(restarts=6)
  key = jax.random.key(3)
  assert np.all(np.asarray(obj(many.run(obj, x, key)))
                >= np.asarray(obj(x)) - 1e-12)
  x_adv, loss = many.run(obj, x, key, return_loss=True)
  np.testing.assert_allclose(np.asarray(obj(x_adv)), np.asarray(loss))
  assert float(jnp.max(jnp.abs(x_adv - x))) <= 0.2 + 1e-12
