"""Low-rank synthetic data and Tian-style ReLU teachers (Yang et al. 2021).

Everything here is a pure function of a PRNG key and static numbers, so a
whole problem (subspace, teacher, data sets) can be built inside ``jit`` and
``vmap``-ed over seeds.

Data model (spec §1.4): ``x = U z`` with ``U`` a ``d x k`` matrix with
orthonormal columns and ``z ~ N(0, sigma^2 I_k)``; optional isotropic noise
inside span(U) or in its orthogonal complement. Full-rank evaluation inputs are
``N(0, (sigma^2 k / d) I_d)``: the same per-coordinate variance (and so the
same typical norm ``sigma * sqrt(k)``) as the low-rank data.

Teachers (spec §1.2, Tian's ``init_separate_w``): each hidden node's fan-in
vector is a distinct, non-zero pattern with entries from {-1, -0.75, ..., 1},
normalised to unit l2 norm; the fan-out row of hidden node i is divided by
``(i + 1) ** p`` (strength decay); all biases equal ``bias``. Multi-layer
teachers can re-centre each hidden bias on the median pre-activation of a
reference sample (each node fires on about half the inputs) and rescale the
output layer to zero-mean, unit-std outputs, as Tian's multi-layer code does.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array
Params = Any

PATTERN_LEVELS = 9  # {-1, -0.75, ..., 0.75, 1}


def make_subspace(key: Array, d: int, k: int, dtype=jnp.float32) -> Array:
  """Returns ``U`` of shape [d, k] with orthonormal columns (QR of a Gaussian)."""
  if not 0 < k <= d:
    raise ValueError(f"subspace rank k must satisfy 0 < k <= d, got k={k}, d={d}")
  g = jax.random.normal(key, (d, k), dtype)
  q, r = jnp.linalg.qr(g)
  # Fix the sign ambiguity of QR so U is a deterministic function of the key.
  return q * jnp.where(jnp.diagonal(r) < 0, -1.0, 1.0).astype(dtype)


def project_in(v: Array, U: Array) -> Array:
  """Orthogonal projection of the rows of ``v`` ([..., d]) onto span(U)."""
  return (v @ U) @ U.T


def project_out(v: Array, U: Array) -> Array:
  """Projection of the rows of ``v`` onto the orthogonal complement of span(U)."""
  return v - project_in(v, U)


def sample_lowrank(key: Array, U: Array, n: int, sigma: float, *,
                   noise_in: float = 0.0, noise_out: float = 0.0) -> Array:
  """``n`` inputs ``x = U z`` with ``z ~ N(0, sigma^2 I_k)``, shape [n, d].

  ``noise_in`` / ``noise_out`` add isotropic Gaussian noise with that
  per-coordinate std restricted to span(U) / its orthogonal complement.
  """
  d, k = U.shape
  kz, ki, ko = jax.random.split(key, 3)
  x = sigma * jax.random.normal(kz, (n, k), U.dtype) @ U.T
  if noise_in:
    x = x + noise_in * project_in(jax.random.normal(ki, (n, d), U.dtype), U)
  if noise_out:
    x = x + noise_out * project_out(jax.random.normal(ko, (n, d), U.dtype), U)
  return x


def sample_lowrank_latent(key: Array, U: Array, n: int, sigma: float, *,
                          noise_in: float = 0.0) -> Array:
  """Coordinates ``z`` [n, k] in the basis U of ``sample_lowrank``'s inputs.

  ``z @ U.T`` equals ``sample_lowrank(key, U, n, sigma, noise_in=noise_in)``
  (same key, no ``noise_out``) up to floating-point rounding: in-span noise
  ``noise_in * P_U g`` is ``U (noise_in * U^T g)``, so it stays in the
  latent coordinates. Off-span noise has no k-dimensional form.
  """
  d, k = U.shape
  kz, ki, _ = jax.random.split(key, 3)
  z = sigma * jax.random.normal(kz, (n, k), U.dtype)
  if noise_in:
    z = z + noise_in * (jax.random.normal(ki, (n, d), U.dtype) @ U)
  return z


@flax.struct.dataclass
class LowRankData:
  """A data set of rank-k inputs stored as coordinates: row i is ``U z[i]``.

  ``k / d`` of the memory of the dense ``[n, d]`` array, so sampling random
  rows (the training loop's gather) moves ``k / d`` of the bytes; rows are
  rebuilt with one ``[B, k] x [k, d]`` product per batch. A pytree (vmap it
  over seeds like an array). ``take`` / ``expand`` split ``rows`` so a
  training loop can gather many steps' rows at once and expand them per step.
  """
  z: Array  # [n, k] coordinates
  U: Array  # [d, k] orthonormal basis

  @property
  def num_rows(self) -> int:
    return self.z.shape[-2]

  @property
  def dtype(self):
    return self.z.dtype

  def take(self, idx: Array) -> Array:
    """Stored rows ``idx``: coordinates ``[..., k]``."""
    return self.z[idx]

  def expand(self, rows: Array) -> Array:
    """Inputs ``[..., d]`` of stored rows (``take``'s output)."""
    return rows @ self.U.T

  def rows(self, idx: Array) -> Array:
    """Rows ``idx`` as inputs, ``[..., d]``."""
    return self.expand(self.take(idx))

  def dense(self) -> Array:
    """The whole data set as an ``[n, d]`` array."""
    return self.z @ self.U.T


def fullrank_std(sigma: float, d: int, k: int) -> float:
  """Per-coordinate std of full-rank data matching the low-rank data's scale."""
  return float(sigma) * (k / d) ** 0.5


def sample_fullrank(key: Array, n: int, d: int, k: int, sigma: float,
                    dtype=jnp.float32) -> Array:
  """Full-rank inputs ``N(0, sigma^2 k/d I_d)``, shape [n, d]."""
  return fullrank_std(sigma, d, k) * jax.random.normal(key, (n, d), dtype)


def _bad_rows(p: Array) -> Array:
  """Rows that are all-zero or equal to an earlier row."""
  zero = jnp.all(p == 0, axis=1)
  same = jnp.all(p[:, None, :] == p[None, :, :], axis=-1)
  earlier = jnp.tril(same, k=-1)
  return zero | jnp.any(earlier, axis=1)


def distinct_patterns(key: Array, rows: int, cols: int, dtype=jnp.float32,
                      max_rounds: int = 100) -> Array:
  """``rows`` distinct, non-zero patterns of length ``cols`` (shape [rows, cols]).

  Entries are drawn uniformly from the 9 levels {-1, -0.75, ..., 1}; rows that
  are zero or repeat an earlier row are redrawn (a ``lax.while_loop``, so the
  function stays jittable and vmappable).
  """
  if rows > PATTERN_LEVELS ** cols - 1:
    raise ValueError(f"cannot draw {rows} distinct non-zero patterns of length "
                     f"{cols} from {PATTERN_LEVELS} levels")

  def draw(k):
    levels = jax.random.randint(k, (rows, cols), 0, PATTERN_LEVELS)
    return (levels.astype(dtype) - (PATTERN_LEVELS - 1) / 2) / (
        (PATTERN_LEVELS - 1) / 2)

  def cond(carry):
    p, _, i = carry
    return jnp.any(_bad_rows(p)) & (i < max_rounds)

  def body(carry):
    p, k, i = carry
    k, sub = jax.random.split(k)
    p = jnp.where(_bad_rows(p)[:, None], draw(sub), p)
    return p, k, i + 1

  k0, k1 = jax.random.split(key)
  p, _, _ = jax.lax.while_loop(cond, body, (draw(k0), k1, 0))
  return p


def make_teacher(key: Array, d: int, widths: Sequence[int], outputs: int, *,
                 strength_decay: float = 0.0, bias: float = -0.1,
                 centre_bias: bool = False, normalise_output: bool = False,
                 x_ref: Array | None = None, dtype=jnp.float32) -> Params:
  """Tian-style ReLU teacher parameters, structured like ``models.mlp.MLP``.

  Args:
    key: PRNG key.
    d: input dimension.
    widths: hidden widths (one entry: the two-layer teacher).
    outputs: number of (linear) outputs c.
    strength_decay: p; fan-out row of hidden node i is divided by (i+1)**p.
    bias: value of every bias (before optional re-centring).
    centre_bias: set each hidden bias to minus the median pre-activation over
      ``x_ref`` so each node fires on about half of the inputs.
    normalise_output: rescale the output layer so outputs over ``x_ref`` have
      zero mean and unit std (per output).
    x_ref: reference inputs [N, d]; required by the two options above.
  Returns:
    ``{"params": {"hidden_0": {"kernel", "bias"}, ..., "out": {...}}}``.
  """
  if (centre_bias or normalise_output) and x_ref is None:
    raise ValueError("centre_bias / normalise_output need reference inputs x_ref")
  dims = [d, *widths]
  keys = jax.random.split(key, len(widths) + 1)
  params = {}
  h = x_ref
  for i, (fan_in, width) in enumerate(zip(dims[:-1], dims[1:])):
    # Patterns are fan-in vectors of the nodes: draw [width, fan_in], transpose.
    w = distinct_patterns(keys[i], width, fan_in, dtype).T
    w = w / jnp.linalg.norm(w, axis=0, keepdims=True)
    if i > 0:
      w = w / _strength(dims[i], strength_decay, dtype)[:, None]
    b = jnp.full((width,), bias, dtype)
    if h is not None:
      pre = h @ w
      if centre_bias:
        b = -jnp.median(pre, axis=0)
      h = jax.nn.relu(pre + b)
    params[f"hidden_{i}"] = {"kernel": w, "bias": b}
  w_out = distinct_patterns(keys[-1], outputs, dims[-1], dtype).T
  w_out = w_out / _strength(dims[-1], strength_decay, dtype)[:, None]
  b_out = jnp.full((outputs,), bias, dtype)
  if normalise_output:
    y = h @ w_out
    mu, sd = jnp.mean(y, axis=0), jnp.std(y, axis=0) + 1e-12
    w_out, b_out = w_out / sd, -mu / sd
  params["out"] = {"kernel": w_out, "bias": b_out}
  return {"params": params}


def _strength(width: int, p: float, dtype) -> Array:
  return (jnp.arange(width, dtype=dtype) + 1.0) ** p


def teacher_labels(outputs: Array) -> Array:
  """Classification reading of a teacher: the argmax of its outputs."""
  return jnp.argmax(outputs, axis=-1)
