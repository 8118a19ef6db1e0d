"""Streamed teacher-student correlations, their summaries and drift metrics."""

import jax
import jax.numpy as jnp
import numpy as np

from tsjax.metrics import specialization as spec

# Jitted once per batch shape: far cheaper than op-by-op dispatch of every
# distinct uneven batch size (the function itself is the same).
corr_update = jax.jit(spec.corr_update)


def relu_acts(rng, n, m, k, shift=0.3):
  """ReLU-like activations with shared structure: teacher [n, m], student [n, k]."""
  z = rng.normal(size=(n, 6))
  t = np.maximum(z @ rng.normal(size=(6, m)) + shift, 0.0)
  s = np.maximum(z @ rng.normal(size=(6, k)) + shift
                 + 0.3 * rng.normal(size=(n, k)), 0.0)
  return t, s


def numpy_corr(t, s):
  """Pearson correlations [m, k] computed directly with np.corrcoef in float64."""
  t = np.asarray(t, np.float64)
  s = np.asarray(s, np.float64)
  m = t.shape[1]
  return np.corrcoef(t.T, s.T)[:m, m:]


def stream(t, s, sizes, dtype=jnp.float64):
  st = spec.corr_init(t.shape[1], s.shape[1], dtype)
  i = 0
  for b in sizes:
    st = corr_update(st, jnp.asarray(t[i:i + b]), jnp.asarray(s[i:i + b]))
    i += b
  assert i == t.shape[0]
  return st


def test_streamed_uneven_batches_match_numpy():
  rng = np.random.default_rng(0)
  t, s = relu_acts(rng, 300, 5, 7)
  sizes = [1, 37, 100, 2, 97, 63]
  st = stream(t, s, sizes)
  np.testing.assert_allclose(float(st.count), 300)
  np.testing.assert_allclose(st.mean_t, t.mean(0), rtol=1e-12)
  np.testing.assert_allclose(st.mean_s, s.mean(0), rtol=1e-12)
  np.testing.assert_allclose(st.m2_t, ((t - t.mean(0)) ** 2).sum(0), rtol=1e-11)
  np.testing.assert_allclose(st.m2_s, ((s - s.mean(0)) ** 2).sum(0), rtol=1e-11)
  C = spec.corr_finalize(st)
  np.testing.assert_allclose(C, numpy_corr(t, s), atol=1e-10)
  # One batch and many batches agree.
  np.testing.assert_allclose(C, spec.corr_finalize(stream(t, s, [300])),
                             atol=1e-12)


def test_masked_update_ignores_masked_rows():
  rng = np.random.default_rng(1)
  t, s = relu_acts(rng, 120, 3, 4)
  mask = rng.uniform(size=120) < 0.6
  garbage_t = t.copy()
  garbage_s = s.copy()
  garbage_t[~mask] = 1e6   # must not leak into the statistics
  garbage_s[~mask] = -7.0
  st = spec.corr_init(3, 4, jnp.float64)
  for lo, hi in [(0, 50), (50, 51), (51, 120)]:
    st = corr_update(st, jnp.asarray(garbage_t[lo:hi]),
                          jnp.asarray(garbage_s[lo:hi]),
                          jnp.asarray(mask[lo:hi]))
  # A fully masked batch is a no-op.
  st2 = corr_update(st, jnp.asarray(garbage_t[:10]),
                         jnp.asarray(garbage_s[:10]), jnp.zeros(10, bool))
  for a, b in zip(st, st2):
    np.testing.assert_allclose(a, b, rtol=0, atol=0)
  assert float(st.count) == mask.sum()
  np.testing.assert_allclose(spec.corr_finalize(st),
                             numpy_corr(t[mask], s[mask]), atol=1e-10)


def test_streamed_correlations_remainder_matches_numpy():
  """Two hidden layers per network; N = 203 is not a multiple of the batch."""
  rng = np.random.default_rng(2)
  d = 6
  xs = rng.normal(size=(203, d))
  wt1, wt2 = rng.normal(size=(d, 4)), np.abs(rng.normal(size=(4, 3)))
  ws1, ws2 = rng.normal(size=(d, 5)), rng.normal(size=(5, 6))

  def np_acts(x):
    t1 = np.maximum(x @ wt1, 0)
    s1 = np.maximum(x @ ws1 + 0.1 * x[:, :1], 0)
    return (t1, np.maximum(t1 @ wt2 - 0.2, 0)), (s1, np.maximum(s1 @ ws2, 0))

  def acts(x):
    t1 = jax.nn.relu(x @ wt1)
    s1 = jax.nn.relu(x @ ws1 + 0.1 * x[:, :1])
    return (t1, jax.nn.relu(t1 @ wt2 - 0.2)), (s1, jax.nn.relu(s1 @ ws2))

  stats = spec.streamed_correlations(acts, jnp.asarray(xs), batch_size=32)
  assert len(stats) == 2
  (t1, t2), (s1, s2) = np_acts(xs)
  for st, t, s in zip(stats, (t1, t2), (s1, s2)):
    assert float(st.count) == 203  # every example counted exactly once
    np.testing.assert_allclose(st.mean_t, t.mean(0), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(spec.corr_finalize(st), numpy_corr(t, s),
                               atol=1e-10)


def test_float32_large_offset_streamed_is_accurate_naive_is_not():
  """Why the statistics are centred: activations ~1e3 + O(0.5) in float32.

  The one-pass ``E[x^2] - E[x]^2`` loses every significant digit of the
  variance (float32 resolution at 1e6 is ~0.06 > var); the streamed centred
  (Chan et al.) update keeps ~1e-4 accuracy.
  """
  rng = np.random.default_rng(3)
  n, m, k = 1000, 3, 4
  z = rng.normal(size=(n, m + k)) @ rng.normal(size=(m + k, m + k))
  acts = (1e3 + 0.5 * z / np.sqrt(m + k)).astype(np.float32)
  t, s = acts[:, :m], acts[:, m:]
  ref = numpy_corr(t, s)  # float64 on the very float32 values used below
  assert np.abs(ref).max() > 0.2  # non-trivial correlations

  st = stream(t, s, [100, 37, 263, 600], dtype=jnp.float32)
  C = spec.corr_finalize(st)
  assert C.dtype == jnp.float32
  np.testing.assert_allclose(C, ref, atol=1e-3)

  tj, sj = jnp.asarray(t), jnp.asarray(s)
  mt, ms = tj.mean(0), sj.mean(0)
  var_t = (tj * tj).mean(0) - mt ** 2
  var_s = (sj * sj).mean(0) - ms ** 2
  cov = (tj.T @ sj) / n - jnp.outer(mt, ms)
  naive = np.asarray(cov / jnp.sqrt(jnp.outer(var_t, var_s)))
  assert naive.dtype == np.float32
  err = np.abs(naive - ref)
  # NaN (negative variance) or far off: the naive formula is unusable here.
  assert not np.all(err <= 1e-2), err


def test_specialization_summary_matches_numpy():
  rng = np.random.default_rng(4)
  t, s = relu_acts(rng, 400, 6, 9)
  t[:, 2] = 0.0      # a dead teacher node
  t[:, 4] = 0.37     # a constant (bias-only) teacher node
  st = stream(t, s, [150, 250])
  active = spec.active_nodes(st)
  np.testing.assert_array_equal(active, [True, True, False, True, False, True])

  thresholds = (0.3, 0.5, 0.7, 0.9)
  C = spec.corr_finalize(st)
  out = spec.specialization_summary(C, thresholds, active)

  # Independent reference: corrcoef on the active teacher nodes only.
  act_idx = np.array([0, 1, 3, 5])
  ref = numpy_corr(t[:, act_idx], s)
  best = ref.max(1)
  np.testing.assert_allclose(np.asarray(out["best_corr"])[act_idx], best,
                             atol=1e-10)
  np.testing.assert_array_equal(np.asarray(out["best_index"])[act_idx],
                                ref.argmax(1))
  np.testing.assert_allclose(out["mean_best"], best.mean(), atol=1e-10)
  assert float(out["num_active"]) == 4
  np.testing.assert_array_equal(out["count_above"],
                                [(best > th).sum() for th in thresholds])
  succ = np.asarray(out["success"])
  assert succ.shape == (4, 6)
  assert not succ[:, [2, 4]].any()  # inactive nodes never count
  np.testing.assert_array_equal(succ[:, act_idx],
                                best[None, :] > np.array(thresholds)[:, None])
  # Inactive nodes are excluded from the mean: it differs from the plain
  # mean over all teacher nodes.
  all_mean = float(jnp.mean(out["best_corr"]))
  assert abs(all_mean - best.mean()) > 1e-3

  # Without a mask every node counts.
  out_all = spec.specialization_summary(C, thresholds)
  np.testing.assert_allclose(out_all["mean_best"], all_mean, atol=1e-12)
  assert float(out_all["num_active"]) == 6


def test_perp_drift_matches_numpy_projection():
  rng = np.random.default_rng(5)
  d, k, n = 12, 4, 7
  U, _ = np.linalg.qr(rng.normal(size=(d, k)))
  w0 = rng.normal(size=(d, n))
  w1 = w0 + rng.normal(size=(d, n))
  P = np.eye(d) - U @ U.T
  ref = np.linalg.norm(P @ (w1 - w0)) / np.linalg.norm(w0)
  np.testing.assert_allclose(spec.perp_drift(jnp.asarray(w1), jnp.asarray(w0),
                                             jnp.asarray(U)), ref, rtol=1e-12)
  # A change inside span(U) has no off-span drift.
  w_in = w0 + U @ rng.normal(size=(k, n))
  assert float(spec.perp_drift(jnp.asarray(w_in), jnp.asarray(w0),
                               jnp.asarray(U))) < 1e-14


def test_vmap_over_seeds_equals_per_seed():
  rng = np.random.default_rng(6)
  S, B, m, k = 3, 50, 4, 5
  ts, ss = zip(*[relu_acts(rng, 2 * B, m, k) for _ in range(S)])
  ts, ss = np.stack(ts), np.stack(ss)

  def run(t, s):
    st = spec.corr_init(m, k, jnp.float64)
    st = corr_update(st, t[:B], s[:B])
    st = corr_update(st, t[B:], s[B:])
    return spec.corr_finalize(st)

  batched = jax.jit(jax.vmap(run))(jnp.asarray(ts), jnp.asarray(ss))
  for i in range(S):
    np.testing.assert_allclose(batched[i], run(jnp.asarray(ts[i]),
                                               jnp.asarray(ss[i])),
                               rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(batched[i], numpy_corr(ts[i], ss[i]), atol=1e-10)
