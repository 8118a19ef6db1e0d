"""Losses shared by methods and attacks. Per-example unless a reduction is named.

``kl`` is the single KL implementation in tsjax; its reduction is explicit:
``"batchmean"`` (sum over classes, mean over the batch; the default),
``"mean"`` (element-wise mean over batch x classes, PyTorch ``nn.KLDivLoss()``),
``"sum"`` and ``"none"`` (per-example [B]).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

KL_REDUCTIONS = ("batchmean", "mean", "sum", "none")


def _check_logits_labels(fn: str, logits, labels, *, min_classes: int = 1):
  """Shapes at the boundary (static, so free under jit): logits [B, C],
  integer labels [B] or probabilities [B, C]."""
  chex.assert_rank(logits, 2, custom_message=f"{fn}: logits must be [B, C]")
  if labels.ndim == 2:
    chex.assert_equal_shape([logits, labels], custom_message=(
        f"{fn}: probability labels must have the logits' shape [B, C]"))
  else:
    chex.assert_shape(labels, (logits.shape[0],), custom_message=(
        f"{fn}: labels must be [B] integers (B = logits.shape[0])"))
    chex.assert_type(labels, int, custom_message=f"{fn}: labels must be ints")
  if logits.shape[-1] < min_classes:
    raise ValueError(f"{fn} needs at least {min_classes} classes; logits "
                     f"have {logits.shape[-1]}")


def squared_error(pred: jax.Array, target: jax.Array) -> jax.Array:
  """Per-example ``0.5 * ||pred - target||^2`` ([B]); Tian's training loss."""
  chex.assert_equal_shape([pred, target], custom_message="squared_error")
  diff = (pred - target).reshape(pred.shape[0], -1)
  return 0.5 * jnp.sum(diff * diff, axis=1)


def mean_squared_error(pred: jax.Array, target: jax.Array) -> jax.Array:
  """Per-example mean over outputs of ``(pred - target)^2`` ([B])."""
  chex.assert_equal_shape([pred, target], custom_message="mean_squared_error")
  diff = (pred - target).reshape(pred.shape[0], -1)
  return jnp.mean(diff * diff, axis=1)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example cross-entropy; ``labels`` are ints [B] or probabilities [B, C]."""
  _check_logits_labels("cross_entropy", logits, labels)
  logp = jax.nn.log_softmax(logits, axis=-1)
  if labels.ndim == logits.ndim:
    return -jnp.sum(labels * logp, axis=-1)
  return -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]


def kl(target_logits: jax.Array, logits: jax.Array, *, temperature: float = 1.0,
       reduction: str = "batchmean", target_eps: float = 0.0) -> jax.Array:
  """KL(softmax(target/T) || softmax(logits/T)), reduced as named.

  Gradient flows into both arguments (as PyTorch's ``kl_div`` differentiates
  its target); wrap ``target_logits`` in ``jax.lax.stop_gradient`` where a
  method detaches it. ``target_eps > 0`` uses ``p * (log(p + target_eps) -
  log q)`` element-wise, RSLAD's hand-written KL (changes the value, not the
  gradient with respect to ``logits``).

  Reductions: ``"batchmean"`` sum over classes / B; ``"mean"`` sum / (B * C)
  (``nn.KLDivLoss()`` default, ARD / PeerAiD / RSLAD); ``"sum"``; ``"none"``
  per-example [B].
  """
  if reduction not in KL_REDUCTIONS:
    raise ValueError(f"unknown KL reduction {reduction!r}; expected one of "
                     f"{KL_REDUCTIONS}")
  chex.assert_equal_shape([target_logits, logits], custom_message=(
      "kl: target_logits and logits must have one shape [..., C]"))
  logp = jax.nn.log_softmax(target_logits / temperature, axis=-1)
  logq = jax.nn.log_softmax(logits / temperature, axis=-1)
  p = jnp.exp(logp)
  if target_eps:
    logp = jnp.log(p + target_eps)
  elem = p * (logp - logq)
  if reduction == "mean":
    return jnp.mean(elem)
  per_example = jnp.sum(elem, axis=-1)
  if reduction == "none":
    return per_example
  if reduction == "sum":
    return jnp.sum(per_example)
  return jnp.mean(per_example)


def margin(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example ``max_{j != y} z_j - z_y`` (> 0 iff misclassified); CW loss."""
  _check_logits_labels("margin", logits, labels, min_classes=2)
  z_y = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
  other = jnp.where(jax.nn.one_hot(labels, logits.shape[-1], dtype=bool),
                    -jnp.inf, logits)
  return jnp.max(other, axis=-1) - z_y


def max_other_prob(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example ``max_{k != y} softmax_k`` (CCAT's F7P attack objective,
  and its per-example worst-case criterion)."""
  p = jax.nn.softmax(logits, axis=-1)
  mask = jax.nn.one_hot(labels, logits.shape[-1], dtype=bool)
  return jnp.max(jnp.where(mask, -1.0, p), axis=-1)


def dlr(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example Difference of Logits Ratio (Croce & Hein 2020), to maximise.

  ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12)`` with ``z_pi1 >= z_pi2
  >= ...`` the sorted logits: > 0 iff misclassified; shift- and
  scale-invariant in the logits. Needs at least 3 classes.
  """
  _check_logits_labels("dlr", logits, labels, min_classes=3)
  z_sorted = jnp.sort(logits, axis=-1)
  z_y = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
  other = jnp.where(jax.nn.one_hot(labels, logits.shape[-1], dtype=bool),
                    -jnp.inf, logits)
  return -(z_y - jnp.max(other, axis=-1)) / (
      z_sorted[:, -1] - z_sorted[:, -3] + 1e-12)


def dlr_targeted(logits: jax.Array, labels: jax.Array,
                 targets: jax.Array) -> jax.Array:
  """Per-example targeted DLR (APGD-T), to maximise:
  ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)``. Needs >= 4
  classes."""
  _check_logits_labels("dlr_targeted", logits, labels, min_classes=4)
  chex.assert_equal_shape([labels, targets], custom_message="dlr_targeted")
  z_sorted = jnp.sort(logits, axis=-1)
  z_y = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
  z_t = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
  return -(z_y - z_t) / (
      z_sorted[:, -1] - 0.5 * z_sorted[:, -3] - 0.5 * z_sorted[:, -4] + 1e-12)
