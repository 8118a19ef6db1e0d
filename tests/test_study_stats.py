"""Spearman, bootstrap intervals and the teacher–student study's summary
statistics and claims (no training: the metrics are made up here)."""

import itertools

import numpy as np
import pytest
import scipy.stats

from experiments import teacher_student as exp_ts
from tsjax.metrics import stats


# ---------------------------------------------------------- permutation test
def _brute_force_p(x, y):
  """Every pairing, scipy's Spearman: the fraction with |rho| >= observed."""
  rho = scipy.stats.spearmanr(x, y)[0]
  r = [scipy.stats.spearmanr(x, np.asarray(y)[list(p)])[0]
       for p in itertools.permutations(range(len(x)))]
  return np.mean(np.abs(r) >= abs(rho) - 1e-12)


@pytest.mark.parametrize("n,ties", [(4, False), (6, False), (6, True)])
def test_permutation_pvalue_exact_against_brute_force(n, ties):
  rng = np.random.default_rng(n)
  x = rng.integers(0, 3, n) if ties else rng.normal(size=n)
  y = x + rng.normal(size=n)
  assert stats.permutation_pvalue(x, y, n_perm=10 ** 4) == pytest.approx(
      _brute_force_p(x, y))


def test_permutation_pvalue_monte_carlo_close_to_exact():
  rng = np.random.default_rng(1)
  x = rng.normal(size=7)
  y = x + 1.5 * rng.normal(size=7)
  exact = _brute_force_p(x, y)                   # 7! = 5040 pairings
  mc = stats.permutation_pvalue(x, y, n_perm=4000, seed=3)
  assert abs(mc - exact) < 4 * np.sqrt(exact * (1 - exact) / 4000) + 1e-3
  assert stats.permutation_pvalue(x, y, n_perm=4000, seed=3) == mc
  # Perfect order with many runs: the smallest Monte-Carlo value, never 0.
  assert stats.permutation_pvalue(np.arange(12.), np.arange(12.),
                                  n_perm=999) == pytest.approx(1 / 1000)
  assert np.isnan(stats.permutation_pvalue([1, 1, 1], [1, 2, 3]))


# ------------------------------------------------------------------ Spearman
@pytest.mark.parametrize("n,ties", [(3, False), (10, False), (40, True),
                                    (200, True)])
def test_spearman_matches_scipy(n, ties):
  rng = np.random.default_rng(n)
  x = rng.normal(size=n)
  y = 0.5 * x + rng.normal(size=n)
  if ties:   # many ties on both sides, average ranks needed
    x, y = np.round(x), np.round(2 * y) / 2
  want = scipy.stats.spearmanr(x, y).statistic
  assert stats.spearman(x, y) == pytest.approx(want, abs=1e-12)
  np.testing.assert_array_equal(stats.rankdata(x), scipy.stats.rankdata(x))


def test_spearman_edge_cases():
  assert stats.spearman([1, 2, 3, 4], [2, 4, 6, 8]) == pytest.approx(1.0)
  assert stats.spearman([1, 2, 3, 4], [8, 6, 4, 2]) == pytest.approx(-1.0)
  # Monotone but non-linear: rank correlation 1, Pearson < 1.
  x = np.linspace(0.1, 3, 20)
  assert stats.spearman(x, np.exp(5 * x)) == pytest.approx(1.0)
  assert np.isnan(stats.spearman([1, 2], [1, 2]))          # < 3 pairs
  assert np.isnan(stats.spearman([1, 1, 1], [1, 2, 3]))    # constant
  assert np.isnan(stats.spearman([1, np.nan, 3], [1, 2, 3]))
  with pytest.raises(ValueError, match="equal length"):
    stats.spearman([1, 2, 3], [1, 2])


def test_spearman_rows_equals_spearman_per_row():
  """The batched version gives, row by row, what ``spearman`` gives (scipy
  checked above), including ties, constant rows (NaN) and NaN inputs."""
  rng = np.random.default_rng(3)
  x = np.round(rng.normal(size=(60, 9)))          # many ties
  y = rng.normal(size=(60, 9))
  x[5] = 2.0                                      # constant row
  y[7, 3] = np.nan
  got = stats.spearman_rows(x, y)
  want = np.array([stats.spearman(a, b) for a, b in zip(x, y)])
  np.testing.assert_allclose(got, want, atol=1e-14)
  assert np.isnan(got[5]) and np.isnan(got[7])
  assert np.isnan(stats.spearman_rows(x[:, :2], y[:, :2])).all()   # < 3
  with pytest.raises(ValueError, match="2-D"):
    stats.spearman_rows(x[0], y[0])


@pytest.mark.parametrize("strata", [None, np.repeat([0, 1, 2], 4),
                                    np.array([0] * 5 + [1] * 4 + [2] * 3)])
def test_bootstrap_ci_batched_draws_the_same_resamples(strata):
  """``batched=True`` (one call on all resamples, the draws vectorised when
  the strata are equal) gives bitwise the loop's interval."""
  rng = np.random.default_rng(4)
  x = rng.normal(size=12)
  y = x + rng.normal(size=12)
  loop = stats.bootstrap_ci(stats.spearman, x, y, n_boot=500, seed=3,
                            strata=strata)
  batched = stats.bootstrap_ci(stats.spearman_rows, x, y, n_boot=500, seed=3,
                               strata=strata, batched=True)
  assert loop == batched


# ----------------------------------------------------------------- bootstrap
def test_bootstrap_ci_equals_direct_computation():
  """The same resamples drawn by hand give the same interval."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=25)
  y = x + rng.normal(size=25)
  lo, hi = stats.bootstrap_ci(stats.spearman, x, y, n_boot=300, alpha=0.1,
                              seed=7)
  g = np.random.default_rng(7)
  direct = []
  for _ in range(300):
    idx = g.integers(0, 25, 25)
    direct.append(scipy.stats.spearmanr(x[idx], y[idx]).statistic)
  direct = np.asarray(direct)
  direct = direct[np.isfinite(direct)]
  np.testing.assert_allclose([lo, hi], np.percentile(direct, [5, 95]),
                             atol=1e-12)
  assert lo < stats.spearman(x, y) < hi
  # Deterministic per seed; another seed gives another interval.
  assert (lo, hi) == stats.bootstrap_ci(stats.spearman, x, y, n_boot=300,
                                        alpha=0.1, seed=7)
  assert (lo, hi) != stats.bootstrap_ci(stats.spearman, x, y, n_boot=300,
                                        alpha=0.1, seed=8)


def test_bootstrap_ci_mean_covers_and_strata_keep_group_sizes():
  rng = np.random.default_rng(1)
  x = rng.normal(loc=2.0, size=400)
  lo, hi = stats.bootstrap_ci(np.mean, x, n_boot=500, seed=0)
  se = x.std() / np.sqrt(len(x))
  assert lo < x.mean() < hi
  # Percentile interval of the mean ~ mean +- 1.96 se.
  assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.15)
  # Stratified: each resample keeps the strata sizes, so the count of rows
  # from stratum 1 is always 3 (unstratified it would vary).
  strata = np.array([0] * 7 + [1] * 3)
  marker = (strata == 1).astype(float)
  lo, hi = stats.bootstrap_ci(np.sum, marker, n_boot=200, strata=strata)
  assert lo == hi == 3.0
  lo, hi = stats.bootstrap_ci(np.sum, marker, n_boot=200)
  assert lo < 3.0 < hi
  # Mostly-NaN resamples give a NaN interval, not a made-up one.
  assert np.isnan(stats.bootstrap_ci(stats.spearman, np.ones(5),
                                     np.arange(5.0), n_boot=50)[0])
  with pytest.raises(ValueError, match="equal length"):
    stats.bootstrap_ci(stats.spearman, np.ones(5), np.ones(4))
  with pytest.raises(ValueError, match="strata"):
    stats.bootstrap_ci(np.mean, np.ones(5), strata=np.ones(4))


# ------------------------------------------------- the study's summary/claims
def fake_metrics(rng, seeds=6, over=None):
  """Per-regime metrics shaped like the study's, with the paper's pattern:
  standard specialises in the subspace only and is not robust; PGD-AT and
  off-subspace augmentation specialise everywhere and are robust."""
  def regime(spec_in, spec_full, drift, robust):
    r = {"spec_in/mean_best": spec_in + 0.01 * rng.normal(size=seeds),
         "spec_full/mean_best": spec_full + 0.02 * rng.normal(size=seeds),
         "drift_perp": drift * (1 + 0.1 * rng.random(seeds))}
    noise = 1 + 0.2 * rng.random(seeds)
    for att in ("full", "in", "orth"):
      r[f"robust_{att}/mse"] = robust * noise
    return r
  m = {"standard": regime(0.98, 0.36, 1e-13, 0.3),
       "pgd_at": regime(0.98, 0.95, 13.0, 0.003),
       "offsubspace": regime(0.98, 0.97, 13.0, 0.004)}
  for (r, k), v in (over or {}).items():
    m[r][k] = np.asarray(v, np.float64)
  return m


def failed(checks):
  return sorted(c["name"] for c in checks if not c["ok"])


def test_spearman_stats_across_and_within(small_config):
  small_config.eval.attacks = ("full", "in", "orth")
  m = fake_metrics(np.random.default_rng(0))
  st = exp_ts.spearman_stats(small_config, m, n_boot=200)
  key = "spec_full vs robust_full/mse"
  x = np.concatenate([m[r]["spec_full/mean_best"] for r in m])
  y = np.concatenate([m[r]["robust_full/mse"] for r in m])
  assert st["spearman"][key] == pytest.approx(
      scipy.stats.spearmanr(x, y).statistic, abs=1e-12)
  lo, hi = st["spearman_ci"][key]
  assert lo <= st["spearman"][key] <= hi < 0
  assert set(st["spearman_within"]) == set(m)
  w = st["spearman_within"]["pgd_at"][key]
  assert w["rho"] == pytest.approx(scipy.stats.spearmanr(
      m["pgd_at"]["spec_full/mean_best"],
      m["pgd_at"]["robust_full/mse"]).statistic, abs=1e-12)
  assert len(w["ci"]) == 2
  text = "\n".join(exp_ts.spearman_markdown(st, 6, 18))
  assert "Within each regime" in text
  assert "| pair | standard | pgd_at | offsubspace |" in text
  assert f"| {key} |" in text


def test_claims_pass_on_the_papers_pattern(small_config):
  small_config.eval.attacks = ("full", "in", "orth")
  small_config.train.weight_decay = 0.0
  m = fake_metrics(np.random.default_rng(1))
  st = exp_ts.spearman_stats(small_config, m, n_boot=200)
  checks = exp_ts.claims(small_config, m, st["spearman"], st["spearman_ci"])
  assert len(checks) == 9
  assert failed(checks) == []


@pytest.mark.parametrize("case,expect", [
    # C1: standard training does not specialise inside the subspace.
    ({("standard", "spec_in/mean_best"): [0.7] * 6}, ["C1 standard"]),
    # C2: standard training moved the weights off the subspace.
    ({("standard", "drift_perp"): [1e-3] * 6}, ["C2 standard"]),
    # C2: PGD-AT left them where they were.
    ({("pgd_at", "drift_perp"): [1e-6] * 6}, ["C2 pgd_at"]),
    # C3: off-subspace augmentation specialises no better than standard.
    ({("offsubspace", "spec_full/mean_best"): [0.3] * 6},
     ["C3 offsubspace"]),
    # C3: full-rank specialization above the in-subspace one.
    ({("standard", "spec_full/mean_best"): [0.99] * 6},
     ["C3 offsubspace", "C3 pgd_at", "C3 standard"]),
])
def test_claims_fail_on_inputs_that_must_fail(small_config, case, expect):
  small_config.train.weight_decay = 0.0
  m = fake_metrics(np.random.default_rng(2), over=case)
  corr = {"spec_full vs robust_full/mse": -0.9}
  got = failed(exp_ts.claims(small_config, m, corr))
  assert [g.split(",")[0].split(" full")[0] for g in got] == expect, got


def test_claims_fail_on_a_positive_or_uncertain_correlation(small_config):
  m = fake_metrics(np.random.default_rng(3))
  key = "spec_full vs robust_full/mse"
  name = "C3 Spearman(full-rank spec, robust error) < 0 (paper: strongly negative)"
  ci_name = ("C3 Spearman(full-rank spec, robust error): bootstrap interval "
             "below 0")
  # Positive correlation: both Spearman checks fail.
  got = failed(exp_ts.claims(small_config, m, {key: 0.4}, {key: [0.1, 0.6]}))
  assert got == sorted([name, ci_name])
  # Negative point estimate, interval reaching over 0: only the CI check.
  got = failed(exp_ts.claims(small_config, m, {key: -0.3}, {key: [-0.7, 0.2]}))
  assert got == [ci_name]
  # NaN (e.g. a constant metric) never passes.
  got = failed(exp_ts.claims(small_config, m, {key: float("nan")},
                             {key: [float("nan")] * 2}))
  assert got == sorted([name, ci_name])
  # Swapped sign in the data itself: robust error rises with specialization.
  small_config.eval.attacks = ("full",)
  flipped = fake_metrics(np.random.default_rng(3))
  flipped["standard"]["robust_full/mse"] = np.full(6, 1e-4)
  flipped["pgd_at"]["robust_full/mse"] = np.full(6, 0.5) + np.arange(6)
  flipped["offsubspace"]["robust_full/mse"] = np.full(6, 0.7) + np.arange(6)
  st = exp_ts.spearman_stats(small_config, flipped, n_boot=200)
  assert st["spearman"][key] > 0
  got = failed(exp_ts.claims(small_config, flipped, st["spearman"],
                             st["spearman_ci"]))
  assert got == sorted([name, ci_name])


def test_report_writes_within_regime_spearman_and_intervals(small_config,
                                                             tmp_path):
  """The study's report on made-up metrics: summary.md / summary.json carry
  the across-run Spearman with its interval, the within-regime table and
  the interval check."""
  import json
  small_config.eval.attacks = ("full", "in", "orth")
  small_config.train.weight_decay = 0.0
  rng = np.random.default_rng(4)
  m = fake_metrics(rng)
  n_thr = len(small_config.eval.thresholds)
  for r in m.values():
    r["robust_full/rel_mse"] = r["robust_full/mse"]
    for where in ("in", "full"):
      r[f"spec_{where}/layer0/success"] = rng.random((6, n_thr, 4)) > 0.5
  out = exp_ts.report(small_config, str(tmp_path), list(range(6)), m)
  text = (tmp_path / "summary.md").read_text()
  assert "Within each regime (across its 6 seeds" in text
  assert "bootstrap interval below 0" in text
  js = json.loads((tmp_path / "summary.json").read_text())
  key = "spec_full vs robust_full/mse"
  assert js["spearman"][key] == pytest.approx(out["spearman"][key])
  assert js["spearman_ci"][key] == pytest.approx(out["spearman_ci"][key])
  assert set(js["spearman_within"]) == set(m)
  assert js["bootstrap"]["samples"] == exp_ts.BOOTSTRAP_SAMPLES
  assert failed(out["checks"]) == []
  assert (tmp_path / "specialization_vs_robust_error.png").exists()
