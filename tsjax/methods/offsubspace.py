"""Off-subspace augmentation: the remedy Yang et al. point to.

Teacher–student form (``make_ts_loss``, the synthetic study's regime): a
fraction of each batch is moved off the data subspace, ``x + scale * P_perp
xi`` with ``xi ~ N(0, I_d)``, and labelled by the teacher at the moved point.
The gradient then reaches the first-layer weight components orthogonal to
span(U), which standard training never moves (spec §1.4).

Image form (``make_loss``, registered as ``"offsubspace"``): the data
subspace is the top-k PCA subspace of the training images
(``tsjax.data.subspace``); the first ``round(fraction * B)`` examples of each
(shuffled) batch are moved to ``x + delta``, ``delta`` Gaussian noise
projected off the subspace and rescaled to the surface of the ``norm`` ball
of ``radius`` (``off_subspace_noise``), labels unchanged; the loss is the
cross-entropy over the whole batch. The basis ``U`` travels in ``ctx``
(``subspace_ctx``), computed once from the training split by the method's
``init_ctx`` hook before training (``experiments.train`` calls it).

``with_offsubspace(loss_fn, options)`` wraps *any* method's loss the same way
(move part of the batch, then run the method's loss on it): the
distillation methods then distil at the moved points too
(``experiments.train``: the optional ``offsubspace`` config section, the
``offsubspace_aug`` variant of ``configs/adv_train.py``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from tsjax import config_checks as cc
from tsjax.attacks.norms import NORMS
from tsjax.data import subspace
from tsjax.data.synthetic import project_out
from tsjax.methods import standard
from tsjax.methods.registry import Method
from tsjax.methods.teacher_student import Networks, regression_loss

SUBSPACE = "subspace"


def make_ts_loss(nets: Networks, scale: float, fraction: float = 0.5):
  def loss_fn(params, model_state, batch, key, ctx):
    x = batch["x"]
    xi = jax.random.normal(key, x.shape, x.dtype)
    move = (jax.random.uniform(jax.random.fold_in(key, 1), (x.shape[0], 1))
            < fraction).astype(x.dtype)
    x_aug = x + move * scale * project_out(xi, ctx["U"])
    loss = regression_loss(nets, params, ctx, x_aug)
    return loss, ({"loss": loss}, model_state)
  return loss_fn


# ------------------------------------------------------------------ images
@dataclasses.dataclass(frozen=True)
class Options:
  """Image off-subspace augmentation.

  * ``fraction``: share of each batch moved (the first ``round(fraction *
    B)`` examples; batches are shuffled). 0.5 = "half of each batch".
  * ``norm``, ``radius``: the moved points lie on the surface of this ball
    around the image; match them to the attack the model is evaluated with
    (the Fashion-MNIST recipe: L-inf 0.1 = ``eval.eps``).
  * ``variance``: explained-variance fraction that chooses k (the data
    subspace's dimension); ``k > 0`` fixes k instead.
  * ``clip``: clip moved images into [0, 1]. Off by default: clipping cuts
    the noise on saturated pixels (Fashion-MNIST's black background) and so
    moves the perturbation back towards the subspace; the models take any
    float input.
  * ``pca_examples``: compute the subspace from the first this many training
    images (0: all).
  """
  fraction: float = 0.5
  norm: str = "linf"
  radius: float = 0.1
  variance: float = 0.9
  k: int = 0
  clip: bool = False
  pca_examples: int = 0

  def __post_init__(self):
    cc.require(self, "fraction", cc.number_in(self.fraction, 0, 1), "in [0, 1]")
    cc.require(self, "norm", self.norm in NORMS, f"one of {list(NORMS)}")
    cc.require(self, "radius", cc.number_in(self.radius, 0), ">= 0")
    cc.require(self, "variance", cc.number_in(self.variance, 0, 1,
                                              low_open=True), "in (0, 1]")
    cc.require(self, "k", _nonneg_int(self.k), "an integer >= 0")
    cc.require(self, "clip", isinstance(self.clip, bool), "a bool")
    cc.require(self, "pca_examples", _nonneg_int(self.pca_examples),
               "an integer >= 0")


def _nonneg_int(v) -> bool:
  return cc.number_in(v, 0) and int(v) == v


def subspace_ctx(U) -> dict:
  """The ``ctx`` entry the image off-subspace losses read: ``{"subspace":
  U [D, k]}`` (merge with a teacher's ``teacher_ctx``)."""
  return {SUBSPACE: U}


def subspace_basis(ctx) -> jax.Array:
  if not isinstance(ctx, dict) or SUBSPACE not in ctx:
    raise ValueError("an off-subspace loss needs ctx with the data subspace "
                     "basis: {**ctx, **subspace_ctx(U)} (the method's "
                     "init_ctx computes it from the training images)")
  return ctx[SUBSPACE]


def fit_subspace(train_images, options: Options) -> subspace.Subspace:
  """The PCA subspace of ``options`` from the training images."""
  return subspace.pca_subspace(
      train_images, variance=options.variance,
      k=int(options.k) if options.k else None,
      max_examples=int(options.pca_examples) or None)


def init_ctx(train_images, options: Options) -> dict:
  """``Method.init_ctx``: the basis of the training images' PCA subspace."""
  return subspace_ctx(fit_subspace(train_images, options).U)


def move_off_subspace(key, x, U, options: Options) -> jax.Array:
  """``x [B, ...]`` with its first ``round(fraction * B)`` examples moved
  by ``off_subspace_noise`` (``options.norm``, ``options.radius``; clipped
  into [0, 1] with ``options.clip``), the rest unchanged."""
  b = x.shape[0]
  n_move = int(round(options.fraction * b))
  if n_move == 0:
    return x
  moved = subspace.off_subspace_noise(
      key, x, U.astype(x.dtype), options.radius, options.norm,
      bounds=(0.0, 1.0) if options.clip else None)
  keep = (jnp.arange(b) >= n_move).reshape((b,) + (1,) * (x.ndim - 1))
  return jnp.where(keep, x, moved)


def with_offsubspace(loss_fn, options: Options):
  """``loss_fn`` (any method loss) at a batch whose images are partly moved
  off the data subspace (``move_off_subspace``; ``U`` from ``ctx``), labels
  unchanged. The method's own randomness gets an independent key."""
  def wrapped(params, model_state, batch, key, ctx):
    k_move, k_loss = jax.random.split(key)
    x = move_off_subspace(k_move, batch["image"], subspace_basis(ctx), options)
    return loss_fn(params, model_state, {**batch, "image": x}, k_loss, ctx)
  return wrapped


def make_loss(model, *, teacher=None, attack=None,
              options: Options = Options()):
  """Image classification: mean cross-entropy over a batch half of which
  (``options.fraction``) is moved off the data subspace.
  ``batch = {"image", "label"}``, ``ctx = subspace_ctx(U)``."""
  del teacher, attack
  return with_offsubspace(standard.make_loss(model), options)


METHOD = Method("offsubspace", make_loss, Options, uses_attack=False,
                init_ctx=init_ctx,
                reference="Yang et al. 2021 (the off-subspace augmentation "
                          "their analysis suggests), image form: PCA "
                          "subspace of the training images")
