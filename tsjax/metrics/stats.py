"""Small statistics helpers (host-side NumPy): average ranks, Spearman rank
correlation, paired (optionally stratified) percentile bootstrap intervals,
permutation p-values."""

from __future__ import annotations

import itertools
import math

import numpy as np


def rankdata(a) -> np.ndarray:
  """Ranks 1..n with ties given their average rank (like scipy's default),
  vectorised as in ``scipy.stats.rankdata``."""
  a = np.asarray(a, np.float64).ravel()
  n = len(a)
  sorter = np.argsort(a, kind="mergesort")
  inv = np.empty(n, np.intp)
  inv[sorter] = np.arange(n)
  sorted_a = a[sorter]
  first = np.r_[True, sorted_a[1:] != sorted_a[:-1]]   # starts of tie runs
  dense = np.cumsum(first)[inv]                        # 1-based run index
  bounds = np.r_[np.flatnonzero(first), n]             # run starts, then n
  return 0.5 * (bounds[dense] + bounds[dense - 1] + 1)


def spearman(x, y) -> float:
  """Spearman rank correlation (Pearson correlation of average ranks).

  Returns NaN for fewer than 3 pairs, a constant input or any NaN.
  """
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  if x.shape != y.shape or x.ndim != 1:
    raise ValueError(f"spearman needs two 1-D arrays of equal length, got "
                     f"{x.shape} and {y.shape}")
  if len(x) < 3 or np.isnan(x).any() or np.isnan(y).any():
    return float("nan")
  rx, ry = rankdata(x), rankdata(y)
  rx -= rx.mean()
  ry -= ry.mean()
  den = np.sqrt((rx ** 2).sum() * (ry ** 2).sum())
  return float((rx * ry).sum() / den) if den > 0 else float("nan")


def spearman_rows(x, y) -> np.ndarray:
  """``spearman`` of every row pair of two ``[B, n]`` arrays at once: ``[B]``
  (NaN where ``spearman`` gives NaN). For bootstrap resamples
  (``bootstrap_ci(..., batched=True)``); O(B n^2) memory-light ranking, meant
  for the tens of runs of a study."""
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  if x.shape != y.shape or x.ndim != 2:
    raise ValueError(f"spearman_rows needs two 2-D arrays of equal shape, got "
                     f"{x.shape} and {y.shape}")
  if x.shape[1] < 3:
    return np.full(x.shape[0], np.nan)

  def ranks(a):   # average ranks: #smaller + (#equal + 1) / 2, exact
    less = (a[:, None, :] < a[:, :, None]).sum(-1)
    equal = (a[:, None, :] == a[:, :, None]).sum(-1)
    return less + 0.5 * (equal + 1)

  rx, ry = ranks(x), ranks(y)
  rx -= rx.mean(axis=1, keepdims=True)
  ry -= ry.mean(axis=1, keepdims=True)
  den = np.sqrt((rx ** 2).sum(1) * (ry ** 2).sum(1))
  bad = (den <= 0) | np.isnan(x).any(1) | np.isnan(y).any(1)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(bad, np.nan, (rx * ry).sum(1) / np.where(bad, 1.0, den))


def bootstrap_ci(stat_fn, *arrays, n_boot: int = 2000, alpha: float = 0.05,
                 seed: int = 0, strata=None,
                 batched: bool = False) -> tuple[float, float]:
  """Percentile bootstrap interval ``(low, high)`` of ``stat_fn(*arrays)``.

  The arrays are paired: each resample draws the same row indices (with
  replacement) from all of them, so ``bootstrap_ci(spearman, x, y)`` keeps
  the (x_i, y_i) pairs together. ``strata`` (optional labels, one per row)
  resamples within each stratum separately, keeping the design's group
  sizes (e.g. seeds within each training regime when the statistic pools
  several regimes). The interval is the ``alpha / 2`` and ``1 - alpha / 2``
  percentiles of the resampled statistics; resamples whose statistic is NaN
  (e.g. a Spearman correlation of a resample with a constant input) are
  left out, and the interval is NaN when more than half of them are.
  Deterministic for a given ``seed`` (NumPy ``default_rng``). ``batched``:
  ``stat_fn`` takes the resampled arrays stacked, ``[n_boot, n]``, and
  returns the ``[n_boot]`` statistics in one call (``spearman_rows``); the
  same resamples either way.
  """
  if not arrays:
    raise ValueError("bootstrap_ci needs at least one array")
  arrays = [np.asarray(a) for a in arrays]
  n = len(arrays[0])
  if any(len(a) != n for a in arrays):
    raise ValueError(f"bootstrap_ci needs arrays of equal length, got "
                     f"{[len(a) for a in arrays]}")
  if not (isinstance(n_boot, int) and n_boot >= 1):
    raise ValueError(f"n_boot must be an int >= 1, got {n_boot!r}")
  if not 0.0 < alpha < 1.0:
    raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
  if n == 0:
    return float("nan"), float("nan")
  rng = np.random.default_rng(seed)
  if strata is None:
    groups = [np.arange(n)]
  else:
    strata = np.asarray(strata)
    if strata.shape != (n,):
      raise ValueError(f"strata must have one label per row ({n}), got "
                       f"shape {strata.shape}")
    groups = [np.flatnonzero(strata == s) for s in np.unique(strata)]
  sizes = {len(g) for g in groups}
  if len(sizes) == 1:   # one call draws what the loop below would, in order
    m = sizes.pop()
    draws = rng.integers(0, m, (n_boot, len(groups), m))
    idx = np.stack(groups)[np.arange(len(groups))[:, None], draws].reshape(
        n_boot, -1)
  else:
    idx = np.stack([np.concatenate([g[rng.integers(0, len(g), len(g))]
                                    for g in groups]) for _ in range(n_boot)])
  if batched:
    stats = np.asarray(stat_fn(*(a[idx] for a in arrays)), np.float64)
  else:
    stats = np.array([float(stat_fn(*(a[i] for a in arrays))) for i in idx],
                     np.float64)
  ok = stats[np.isfinite(stats)]
  if len(ok) * 2 < n_boot:
    return float("nan"), float("nan")
  low, high = np.percentile(ok, [100 * alpha / 2, 100 * (1 - alpha / 2)])
  return float(low), float(high)


def permutation_pvalue(x, y, *, n_perm: int = 10000, seed: int = 0) -> float:
  """Two-sided permutation p-value of ``spearman(x, y)``: the fraction of
  pairings (``y`` permuted against ``x``) whose correlation is at least as
  far from 0 as the observed one, ``|rho_perm| >= |rho|``.

  Exact (every one of the ``n!`` pairings, the identity included) when
  ``n! <= n_perm``; otherwise ``n_perm`` random permutations (NumPy
  ``default_rng(seed)``) and ``(count + 1) / (n_perm + 1)``, which never
  gives 0 for a finite sample. NaN where ``spearman`` is NaN.
  """
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  if not (isinstance(n_perm, int) and n_perm >= 1):
    raise ValueError(f"n_perm must be an int >= 1, got {n_perm!r}")
  rho = spearman(x, y)
  if np.isnan(rho):
    return float("nan")
  n = len(x)
  tol = 1e-12                        # ties in |rho| count as extreme
  if math.factorial(n) <= n_perm:
    perms = np.asarray(list(itertools.permutations(range(n))))
    r = spearman_rows(np.broadcast_to(x, perms.shape), y[perms])
    return float(np.mean(np.abs(r) >= abs(rho) - tol))
  rng = np.random.default_rng(seed)
  perms = np.argsort(rng.random((n_perm, n)), axis=1)
  r = spearman_rows(np.broadcast_to(x, perms.shape), y[perms])
  return float((np.sum(np.abs(r) >= abs(rho) - tol) + 1) / (n_perm + 1))
