"""Small statistics helpers (host-side NumPy)."""

from __future__ import annotations

import numpy as np


def rankdata(a) -> np.ndarray:
  """Ranks 1..n with ties given their average rank (like scipy's default)."""
  a = np.asarray(a, np.float64)
  order = np.argsort(a, kind="mergesort")
  ranks = np.empty(len(a), np.float64)
  sorted_a = a[order]
  i = 0
  while i < len(a):
    j = i
    while j + 1 < len(a) and sorted_a[j + 1] == sorted_a[i]:
      j += 1
    ranks[order[i:j + 1]] = 0.5 * (i + j) + 1.0
    i = j + 1
  return ranks


def spearman(x, y) -> float:
  """Spearman rank correlation (Pearson correlation of average ranks).

  Returns NaN for fewer than 3 pairs or a constant input.
  """
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  if x.shape != y.shape or x.ndim != 1:
    raise ValueError(f"spearman needs two 1-D arrays of equal length, got "
                     f"{x.shape} and {y.shape}")
  if len(x) < 3:
    return float("nan")
  rx, ry = rankdata(x), rankdata(y)
  rx -= rx.mean()
  ry -= ry.mean()
  den = np.sqrt((rx ** 2).sum() * (ry ** 2).sum())
  return float((rx * ry).sum() / den) if den > 0 else float("nan")
