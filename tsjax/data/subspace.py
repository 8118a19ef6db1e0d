"""The data subspace of an image data set: its top-k PCA directions.

The image analogue of the low-rank teacher–student setting (``x = U z``,
``tsjax.data.synthetic``): real images are not exactly low-rank, but most of
their variance lies in a few principal directions. ``pca_subspace`` computes
them in JAX from training images, flattened in NHWC order to ``D = H*W*C``
pixels in ``[0, 1]`` units:

* the mean and the *centred* covariance are streamed over batches with the
  pairwise (Chan et al.) update of ``tsjax.metrics.specialization``
  (``streamed_correlations`` of the pixels with themselves: its ``cross``
  statistic is the centred sum of squares), so float32 stays accurate and
  the images never need to be on the device as floats at once;
* ``eigh`` of the ``D x D`` covariance gives the principal directions in
  order of decreasing variance (cost ``O(D^3)``: about a second for
  Fashion-MNIST's 784 pixels, some seconds for CIFAR's 3072);
* ``k`` is fixed, or the smallest k whose directions explain at least a
  fraction ``variance`` of the total variance.

``U [D, k]`` has orthonormal columns and plugs into the subspace-restricted
attacks (``pgd(..., U=U, restrict="in" | "orth")``, which flatten the same
way), ``project_in`` / ``project_out`` and ``off_subspace_noise``. The data
lie near the *affine* subspace ``mean + span(U)``; perturbations are
directions, so only ``span(U)`` matters for them.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tsjax.attacks.norms import NORMS, per_example_norm
from tsjax.metrics.specialization import streamed_correlations

Array = jax.Array


class Subspace(NamedTuple):
  """A PCA subspace of flattened images.

  Attributes:
    U: ``[D, k]`` orthonormal principal directions, variance decreasing
      (sign fixed: each column's largest-magnitude entry is positive).
    mean: ``[D]`` mean image (flattened).
    variances: ``[D]`` variance along every principal direction
      (covariance eigenvalues, decreasing, clipped at 0).
    explained: fraction of the total variance inside ``span(U)``.
    count: number of images used.
  """
  U: Array
  mean: Array
  variances: Array
  explained: float
  count: int

  @property
  def k(self) -> int:
    return int(self.U.shape[1])


def flatten(x: Array) -> Array:
  """``[B, ...] -> [B, D]`` (NHWC order, as the restricted attacks flatten)."""
  return x.reshape(x.shape[0], -1)


def _as_float(x, dtype):
  if x.dtype == jnp.uint8:
    return x.astype(dtype) / 255.0
  return x.astype(dtype)


@functools.partial(jax.jit, static_argnames=("batch_size", "dtype"))
def _covariance(images, batch_size: int, dtype):
  def acts(xb):   # the pixels against themselves: cross = centred X^T X
    f = flatten(_as_float(xb, dtype))
    return (f,), (f,)

  (st,) = streamed_correlations(acts, images, batch_size, dtype=dtype)
  cov = st.cross / jnp.maximum(st.count - 1.0, 1.0)
  evals, evecs = jnp.linalg.eigh(0.5 * (cov + cov.T))
  evals, evecs = evals[::-1], evecs[:, ::-1]          # decreasing
  big = jnp.argmax(jnp.abs(evecs), axis=0)
  sign = jnp.sign(evecs[big, jnp.arange(evecs.shape[1])])
  return st.mean_t, jnp.maximum(evals, 0.0), evecs * jnp.where(sign == 0, 1, sign)


def choose_k(variances, fraction: float) -> int:
  """The smallest k whose top-k ``variances`` (decreasing) hold at least
  ``fraction`` of their total (at least 1)."""
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"explained-variance fraction must be in (0, 1], got "
                     f"{fraction!r}")
  v = np.asarray(variances, np.float64)
  total = v.sum()
  if not total > 0:
    raise ValueError("the data have zero variance: no principal directions")
  ratio = np.cumsum(v) / total
  # A small tolerance so fraction=1.0 is met despite rounding in the sum.
  return int(min(np.searchsorted(ratio, fraction - 1e-12) + 1, len(v)))


def pca_subspace(images, *, variance: float | None = 0.9, k: int | None = None,
                 batch_size: int = 1000, max_examples: int | None = None,
                 dtype=jnp.float32) -> Subspace:
  """Top-k PCA subspace of ``images`` (``[N, H, W, C]`` uint8 0..255 or
  floats in [0, 1]; any ``[N, ...]`` works).

  Args:
    images: training images (host or device array).
    variance: explained-variance fraction in (0, 1] that chooses k
      (``choose_k``); ignored when ``k`` is given.
    k: fixed number of directions (1..D); overrides ``variance``.
    batch_size: images per streamed batch (memory: ``batch_size x D``
      floats besides the ``D x D`` statistics).
    max_examples: use only the first this many images (None: all).
    dtype: accumulation / eigendecomposition dtype.

  Returns:
    a ``Subspace`` (``U [D, k]``, mean, every direction's variance, the
    explained fraction, the number of images).
  """
  if max_examples is not None:
    images = images[:int(max_examples)]
  n = int(images.shape[0])
  if n < 2:
    raise ValueError(f"pca_subspace needs at least 2 images, got {n}")
  d = int(np.prod(images.shape[1:]))
  if k is not None:
    if not (isinstance(k, (int, np.integer)) and 1 <= k <= d):
      raise ValueError(f"k must be an int in [1, {d}] (the flattened image "
                       f"size), got {k!r}")
  elif variance is None:
    raise ValueError("give the explained-variance fraction or k")
  mean, evals, evecs = _covariance(jnp.asarray(images),
                                   int(min(batch_size, n)), jnp.dtype(dtype))
  kk = int(k) if k is not None else choose_k(evals, float(variance))
  total = float(jnp.sum(evals))
  explained = float(jnp.sum(evals[:kk])) / total if total > 0 else 0.0
  return Subspace(U=evecs[:, :kk], mean=mean, variances=evals,
                  explained=explained, count=n)


def project_in(x: Array, U: Array) -> Array:
  """The component of every example of ``x [B, ...]`` inside span(U)
  (``U [D, k]``, D the flattened example size); same shape as ``x``."""
  f = flatten(x)
  return ((f @ U) @ U.T).reshape(x.shape)


def project_out(x: Array, U: Array) -> Array:
  """The component of every example of ``x`` in the orthogonal complement
  of span(U) (``P_perp x = x - U U^T x``); same shape as ``x``."""
  return x - project_in(x, U)


def off_subspace_noise(key: Array, x: Array, U: Array, radius, norm: str = "l2",
                       bounds: tuple[float, float] | None = None) -> Array:
  """``x + delta`` with ``delta = radius * P_perp xi / ||P_perp xi||``,
  ``xi ~ N(0, I)`` drawn per example: Gaussian noise projected off the data
  subspace and rescaled along its ray to the *surface* of the ``norm`` ball
  of ``radius`` (per example ``||delta||_norm = radius`` exactly, ``U^T delta
  = 0`` up to rounding).

  Radius matching: with an attack's ``(norm, eps)`` as ``(norm, radius)``
  the moved point lies on the boundary of the same ball the attack searches,
  so "moved off the subspace" and "attacked" compare at equal budget. The
  direction is uniform on the unit sphere of the complement; for "linf" the
  largest coordinate of ``|delta|`` equals ``radius`` (its l2 norm is then
  several times larger than ``radius``, as for an L-inf attack).

  ``bounds=(low, high)`` clips ``x + delta`` into the box (valid images).
  Clipping changes the clipped coordinates, so the clipped perturbation is
  no longer exactly orthogonal to the subspace and its norm can only
  shrink; on images with saturated pixels (Fashion-MNIST's black background)
  about half the noise on those pixels is cut. Leave ``bounds=None`` (the
  models take any float input) when the exact off-subspace direction
  matters.

  ``radius``: a scalar or per-example ``[B]``.
  """
  if norm not in NORMS:
    raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")
  xi = project_out(jax.random.normal(key, x.shape, x.dtype), U)
  n = per_example_norm(xi, norm)
  r = jnp.broadcast_to(jnp.asarray(radius, x.dtype), (x.shape[0],))
  scale = r / jnp.maximum(n, jnp.finfo(x.dtype).tiny)
  out = x + xi * scale.reshape((-1,) + (1,) * (x.ndim - 1))
  if bounds is not None:
    out = jnp.clip(out, bounds[0], bounds[1])
  return out
