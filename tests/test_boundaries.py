"""Shape and dtype checks at the public functions' boundaries (chex), the same
values with and without jit (``chex.variants``), and errors that name what
was expected."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from tsjax import losses
from tsjax.attacks import apgd, pgd

RNG = np.random.default_rng(0)
LOGITS = RNG.normal(size=(6, 5)).astype(np.float32)
TARGET = RNG.normal(size=(6, 5)).astype(np.float32)
LABELS = RNG.integers(0, 5, size=6).astype(np.int32)


def _np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


class LossesJitAndEager(chex.TestCase):
  """The losses as one computes them by hand, inside and outside jit."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_cross_entropy_and_kl_against_numpy(self):
    ce = self.variant(losses.cross_entropy)(LOGITS, LABELS)
    want = -_np_log_softmax(LOGITS)[np.arange(6), LABELS]
    np.testing.assert_allclose(ce, want, rtol=1e-5)
    kl = self.variant(lambda a, b: losses.kl(a, b, temperature=2.0,
                                             reduction="none"))(TARGET, LOGITS)
    lp, lq = _np_log_softmax(TARGET / 2), _np_log_softmax(LOGITS / 2)
    np.testing.assert_allclose(kl, (np.exp(lp) * (lp - lq)).sum(-1),
                               rtol=1e-5, atol=1e-7)

  @chex.variants(with_jit=True, without_jit=True)
  def test_margin_against_numpy(self):
    m = self.variant(losses.margin)(LOGITS, LABELS)
    other = LOGITS.copy()
    other[np.arange(6), LABELS] = -np.inf
    np.testing.assert_allclose(
        m, other.max(-1) - LOGITS[np.arange(6), LABELS], rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_pgd_same_point_with_and_without_jit(self):
    x = jnp.asarray(RNG.normal(size=(4, 3)), jnp.float32)
    w = jnp.asarray(RNG.normal(size=(3,)), jnp.float32)
    run = self.variant(lambda x: pgd(lambda xa: (xa @ w) ** 2, x,
                                     jax.random.PRNGKey(0), eps=0.1,
                                     step_size=0.05, steps=5,
                                     random_start=False))
    x_adv = run(x)
    # A quadratic of w.x: from x, sign-PGD moves every coordinate to the
    # ball's corner that increases |w.x|.
    want = x + 0.1 * np.sign(w)[None] * np.sign(np.asarray(x @ w))[:, None]
    np.testing.assert_allclose(x_adv, want, atol=1e-6)


class BadShapes(parameterized.TestCase):
  """Wrong shapes fail at the boundary with a message saying what was
  expected, under jit too (the checks are on static shapes)."""

  @parameterized.parameters(True, False)
  def test_losses(self, jit):
    f = (lambda fn: jax.jit(fn)) if jit else (lambda fn: fn)
    with pytest.raises(AssertionError, match="kl: target_logits and logits"):
      f(losses.kl)(TARGET[:, :4], LOGITS)
    with pytest.raises(AssertionError, match=r"labels must be \[B\]"):
      f(losses.cross_entropy)(LOGITS, LABELS[:5])
    with pytest.raises(AssertionError, match=r"logits must be \[B, C\]"):
      f(losses.cross_entropy)(LOGITS[0], LABELS[0])
    with pytest.raises(AssertionError, match="labels must be ints"):
      f(losses.margin)(LOGITS, LABELS.astype(np.float32))
    with pytest.raises(ValueError, match="dlr needs at least 3 classes"):
      f(losses.dlr)(LOGITS[:, :2], LABELS % 2)

  def test_attacks(self):
    x = jnp.zeros((4, 3))
    with pytest.raises(AssertionError, match=r"one loss per example, shape \[B\]"):
      pgd(lambda xa: jnp.sum(xa), x, jax.random.PRNGKey(0), eps=0.1,
          step_size=0.1, steps=2)
    with pytest.raises(ValueError, match="U has 5 rows; the inputs have d = 3"):
      pgd(lambda xa: xa[:, 0], x, jax.random.PRNGKey(0), eps=0.1,
          step_size=0.1, steps=2, U=jnp.eye(5)[:, :2], restrict="in")
    with pytest.raises(ValueError, match=r"eps must be a scalar or \[B\] = \[4\]"):
      pgd(lambda xa: xa[:, 0], x, jax.random.PRNGKey(0),
          eps=jnp.ones(3), step_size=0.1, steps=2)
    with pytest.raises(AssertionError, match="x must be floating"):
      pgd(lambda xa: xa[:, 0], x.astype(jnp.int32), jax.random.PRNGKey(0),
          eps=1, step_size=1, steps=1)
    with pytest.raises(ValueError, match="must be batched"):
      apgd(lambda xa: xa[None], jnp.zeros(3), jnp.zeros((), jnp.int32),
           jax.random.PRNGKey(0), eps=0.1)
