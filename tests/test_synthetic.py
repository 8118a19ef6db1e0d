"""Low-rank data, Tian-style teachers and the MLP they plug into."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tsjax.data import synthetic
from tsjax.models import MLP

GRID = np.linspace(-1.0, 1.0, 9)  # {-1, -0.75, ..., 1}

# Compiled once per static configuration (much cheaper than op-by-op).
make_teacher = jax.jit(
    synthetic.make_teacher, static_argnums=(1, 2, 3),
    static_argnames=("centre_bias", "normalise_output", "dtype"))
distinct_patterns = jax.jit(synthetic.distinct_patterns,
                            static_argnums=(1, 2, 3, 4))


def _on_grid(a, atol=1e-9):
  a = np.asarray(a)
  return np.all(np.abs(a[..., None] - GRID).min(-1) <= atol)


def test_make_subspace_orthonormal_and_deterministic():
  d, k = 30, 7
  U = synthetic.make_subspace(jax.random.key(0), d, k, jnp.float64)
  assert U.shape == (d, k) and U.dtype == jnp.float64
  np.testing.assert_allclose(U.T @ U, np.eye(k), atol=1e-12)
  np.testing.assert_array_equal(
      U, synthetic.make_subspace(jax.random.key(0), d, k, jnp.float64))
  U2 = synthetic.make_subspace(jax.random.key(1), d, k, jnp.float64)
  assert np.abs(np.asarray(U) - np.asarray(U2)).max() > 0.1
  # Same result under jit (the sign fix makes it a function of the key).
  np.testing.assert_allclose(
      jax.jit(synthetic.make_subspace, static_argnums=(1, 2, 3))(
          jax.random.key(0), d, k, jnp.float64), U, atol=1e-12)
  with pytest.raises(ValueError):
    synthetic.make_subspace(jax.random.key(0), 3, 4)


def test_sample_lowrank_in_span_with_expected_variance():
  d, k, sigma, n = 40, 8, 1.5, 20000
  U = synthetic.make_subspace(jax.random.key(2), d, k, jnp.float64)
  x = np.asarray(synthetic.sample_lowrank(jax.random.key(3), U, n, sigma))
  Un = np.asarray(U)
  assert x.shape == (n, d)
  resid = x - x @ Un @ Un.T
  assert np.linalg.norm(resid) <= 1e-12 * np.linalg.norm(x)
  # Per-coordinate variance averages sigma^2 k / d (rel. sampling error ~1%).
  np.testing.assert_allclose(x.var(0).mean(), sigma ** 2 * k / d, rtol=0.03)
  # Coordinates of z = U^T x are iid N(0, sigma^2).
  z = x @ Un
  np.testing.assert_allclose(np.cov(z.T), sigma ** 2 * np.eye(k), atol=0.1)
  # Off-span noise leaves the subspace with the requested per-coord std.
  x_noisy = np.asarray(synthetic.sample_lowrank(
      jax.random.key(3), U, n, sigma, noise_out=0.2))
  resid = x_noisy - x_noisy @ Un @ Un.T
  np.testing.assert_allclose(x_noisy @ Un, z, atol=1e-10)  # same z, noise orth
  np.testing.assert_allclose((resid ** 2).sum(1).mean(), 0.04 * (d - k),
                             rtol=0.03)


def test_sample_fullrank_matches_lowrank_scale():
  d, k, sigma, n = 40, 8, 1.5, 20000
  x = np.asarray(synthetic.sample_fullrank(jax.random.key(4), n, d, k, sigma,
                                           jnp.float64))
  assert x.shape == (n, d) and x.dtype == np.float64
  np.testing.assert_allclose(x.var(0).mean(), sigma ** 2 * k / d, rtol=0.03)
  # Typical norm sigma * sqrt(k), like the low-rank data.
  np.testing.assert_allclose(np.sqrt((x ** 2).sum(1).mean()),
                             sigma * np.sqrt(k), rtol=0.02)
  # Full rank: the empirical covariance is isotropic.
  ev = np.linalg.eigvalsh(np.cov(x.T))
  assert ev.min() > 0.8 * sigma ** 2 * k / d


def test_distinct_patterns_tiny_case():
  # 8 patterns of length 2 from 80 possible non-zero ones: collisions are
  # likely in the first draw, so the redraw loop is exercised.
  for seed in range(5):
    p = np.asarray(distinct_patterns(jax.random.key(seed), 8, 2, jnp.float64))
    assert p.shape == (8, 2)
    assert _on_grid(p)
    assert not np.any(np.all(p == 0, axis=1))
    assert len({tuple(r) for r in p}) == 8
  # The extreme case: all 80 non-zero patterns of length 2.
  p = np.asarray(distinct_patterns(jax.random.key(0), 80, 2, jnp.float64,
                                   10_000))
  assert len({tuple(r) for r in p}) == 80 and not np.any(np.all(p == 0, 1))
  with pytest.raises(ValueError):
    synthetic.distinct_patterns(jax.random.key(0), 81, 2)


def test_make_teacher_first_layer_and_strength_decay():
  d, m, c, p = 20, 6, 4, 1.5
  t = make_teacher(jax.random.key(5), d, (m,), c,
                             strength_decay=p, bias=-0.1, dtype=jnp.float64)
  params = t["params"]
  assert set(params) == {"hidden_0", "out"}
  w = np.asarray(params["hidden_0"]["kernel"])
  assert w.shape == (d, m)
  np.testing.assert_allclose(np.linalg.norm(w, axis=0), 1.0, rtol=1e-12)
  # Column times the norm of its (unknown) grid pattern is back on the grid:
  # the pattern's largest |entry| is one of 0.25, 0.5, 0.75, 1.
  for j in range(m):
    col = w[:, j]
    ok = [_on_grid(col * mx / np.abs(col).max()) for mx in (0.25, 0.5, 0.75, 1)]
    assert any(ok), col
  patterns = {tuple(np.round(w[:, j] / np.abs(w[:, j]).max(), 9))
              for j in range(m)}
  assert len(patterns) == m  # distinct directions
  np.testing.assert_allclose(params["hidden_0"]["bias"], -0.1)
  np.testing.assert_allclose(params["out"]["bias"], -0.1)
  # Fan-out row i is a grid pattern divided by (i + 1) ** p.
  w_out = np.asarray(params["out"]["kernel"])
  assert w_out.shape == (m, c)
  undone = w_out * (np.arange(m) + 1.0)[:, None] ** p
  assert _on_grid(undone)
  assert np.all(np.any(undone != 0, axis=0))       # output patterns non-zero
  # Same key, no decay: the decayed kernel is exactly the undecayed one / (i+1)^p.
  t0 = make_teacher(jax.random.key(5), d, (m,), c,
                              strength_decay=0.0, dtype=jnp.float64)
  np.testing.assert_allclose(
      w_out, np.asarray(t0["params"]["out"]["kernel"])
      / ((np.arange(m) + 1.0) ** p)[:, None], rtol=1e-12)
  np.testing.assert_allclose(t0["params"]["hidden_0"]["kernel"], w, rtol=1e-12)


def _np_forward(params, x):
  h, hiddens = np.asarray(x), []
  i = 0
  while f"hidden_{i}" in params:
    layer = params[f"hidden_{i}"]
    h = np.maximum(h @ np.asarray(layer["kernel"]) + np.asarray(layer["bias"]),
                   0.0)
    hiddens.append(h)
    i += 1
  out = h @ np.asarray(params["out"]["kernel"]) + np.asarray(
      params["out"]["bias"])
  return out, hiddens


def test_multilayer_teacher_centre_bias_half_firing():
  d, k, widths, c = 16, 5, (8, 6, 4), 3
  U = synthetic.make_subspace(jax.random.key(6), d, k, jnp.float64)
  x_ref = synthetic.sample_lowrank(jax.random.key(7), U, 2000, 1.0)
  t = make_teacher(jax.random.key(8), d, widths, c,
                             strength_decay=1.0, centre_bias=True,
                             normalise_output=True, x_ref=x_ref,
                             dtype=jnp.float64)
  params = t["params"]
  out, hiddens = _np_forward(params, x_ref)
  assert len(hiddens) == 3
  for h, wd in zip(hiddens, widths):
    assert h.shape == (2000, wd)
    frac = (h > 0).mean(0)
    np.testing.assert_allclose(frac, 0.5, atol=0.02)
  # Fresh inputs from the same distribution: still about half.
  x_new = synthetic.sample_lowrank(jax.random.key(9), U, 2000, 1.0)
  _, h_new = _np_forward(params, x_new)
  for h in h_new:
    np.testing.assert_allclose((h > 0).mean(0), 0.5, atol=0.08)
  # Outputs normalised over x_ref.
  np.testing.assert_allclose(out.mean(0), 0.0, atol=1e-10)
  np.testing.assert_allclose(out.std(0), 1.0, rtol=1e-6)
  # Deeper layers: fan-out row i of the previous layer divided by (i + 1).
  for i in (1, 2):
    wk = np.asarray(params[f"hidden_{i}"]["kernel"])
    undone = wk * (np.arange(wk.shape[0]) + 1.0)[:, None]
    # each column is a unit-norm pattern before the row decay
    np.testing.assert_allclose(np.linalg.norm(undone, axis=0), 1.0, rtol=1e-12)
  with pytest.raises(ValueError):
    synthetic.make_teacher(jax.random.key(8), d, widths, c, centre_bias=True)


@pytest.mark.parametrize("widths", [(7,), (8, 5)])
def test_mlp_return_hidden_matches_numpy_forward(widths):
  d, c = 12, 3
  x = synthetic.sample_fullrank(jax.random.key(11), 50, d, 4, 1.0, jnp.float64)
  teacher = make_teacher(jax.random.key(12), d, widths, c,
                                   strength_decay=1.0, bias=0.05,
                                   dtype=jnp.float64)
  model = MLP(widths, c, param_dtype=jnp.float64)
  # Teacher parameters have exactly the MLP's structure, shapes and dtypes.
  ref_vars = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, d)))
  assert jax.tree.structure(ref_vars) == jax.tree.structure(teacher)
  for a, b in zip(jax.tree.leaves(ref_vars), jax.tree.leaves(teacher)):
    assert a.shape == b.shape and a.dtype == b.dtype
  apply = jax.jit(model.apply, static_argnames="return_hidden")
  out, hiddens = apply(teacher, x, return_hidden=True)
  ref_out, ref_h = _np_forward(teacher["params"], x)
  assert isinstance(hiddens, tuple) and len(hiddens) == len(widths)
  for h, rh in zip(hiddens, ref_h):
    np.testing.assert_allclose(h, rh, rtol=1e-12, atol=1e-14)
    assert np.all(np.asarray(h) >= 0) and np.any(np.asarray(h) == 0)
  np.testing.assert_allclose(out, ref_out, rtol=1e-12, atol=1e-14)
  np.testing.assert_allclose(apply(teacher, x), out, rtol=0, atol=0)
