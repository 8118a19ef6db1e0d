"""On-device image augmentation in pure JAX (jittable, vmapped per example).

Every function takes a PRNG ``key`` and float images ``x`` of shape
``[B, H, W, C]`` with values in [0, 1] (``C`` = 1 or 3), and returns images of
the same shape, dtype and range. Per-example randomness comes from
``jax.random.split(key, B)`` and ``jax.vmap``; op selection uses
``lax.switch`` (under ``vmap`` every branch is computed and one is selected,
which is cheap at CIFAR / TinyImageNet sizes).

**Consistent teaching.** Every function is a deterministic function of its
key: calling it twice with the same key gives bit-identical images, so a
teacher and a student (FunMatch / AdvFunMatch, PeerAiD's peer) can be fed
the *same* augmented view either by computing it once and passing it to both,
or by recomputing it from the same key. :func:`augment` composes a small spec::

    spec = ("crop_flip", ("randaugment", {"num_ops": 2, "magnitude": 9}),
            ("cutout", {"size": 16}))
    view = augment(key, x, spec)                  # or jax.jit(make_augment(spec))
    logits_t, logits_s = teacher(view), student(view)

Op conventions follow torchvision (``transforms.AutoAugment`` /
``RandAugment``, the references the PyTorch baselines use): magnitudes are
bins (10 for AutoAugment, 31 for RandAugment), signed ops get a random sign,
affine ops use nearest sampling by default with a constant ``fill`` (0 = black,
torchvision's default) outside the image; ShearX/Y shear about the top-left
corner (like the original AutoAugment code), Rotate about the centre (counter-
clockwise for positive angles), TranslateX/Y by whole pixels up to
``150/331 * size``. Histogram ops (Posterize, Equalize) work on the 256-level
quantisation ``round(255 x)``. Cutout (DeVries & Taylor) is a separate op
(AutoAugment's CIFAR recipe applies it after the policy).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping, Sequence

import numpy as np

import jax
import jax.numpy as jnp
from jax import lax

from tsjax.config_checks import ConfigError

Array = jax.Array

# --------------------------------------------------------------------------
# Single-image ops: img [H, W, C] float in [0, 1], magnitude m (traced scalar)
# --------------------------------------------------------------------------


def _grey(img: Array) -> Array:
  """Luma [H, W, 1] (ITU-R 601-2, as PIL / torchvision)."""
  if img.shape[-1] == 1:
    return img
  w = jnp.asarray([0.2989, 0.587, 0.114], img.dtype)
  return jnp.sum(img[..., :3] * w, axis=-1, keepdims=True)


def _blend(img: Array, degenerate: Array, factor) -> Array:
  return jnp.clip(factor * img + (1 - factor) * degenerate, 0, 1).astype(img.dtype)


def _sample(img: Array, inv: Array, fill: float, interpolation: str) -> Array:
  """Inverse-maps output pixel (x, y) (column, row; pixel centres at integer
  indices) to input ``inv @ [x, y, 1]``; outside pixels read ``fill``."""
  h, w, _ = img.shape
  dtype = img.dtype
  ys, xs = jnp.meshgrid(jnp.arange(h, dtype=dtype), jnp.arange(w, dtype=dtype),
                        indexing="ij")
  inv = inv.astype(dtype)
  sx = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
  sy = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
  fill_v = jnp.asarray(fill, dtype)

  def read(yi, xi):
    valid = (yi >= 0) & (yi < h) & (xi >= 0) & (xi < w)
    v = img[jnp.clip(yi, 0, h - 1), jnp.clip(xi, 0, w - 1)]
    return jnp.where(valid[..., None], v, fill_v)

  if interpolation == "nearest":
    # floor(s + 1/2) (PIL's rule): ties go the same way everywhere.
    return read(jnp.floor(sy + 0.5).astype(jnp.int32),
                jnp.floor(sx + 0.5).astype(jnp.int32))
  if interpolation != "bilinear":
    raise ValueError(f"interpolation must be 'nearest' or 'bilinear', got "
                     f"{interpolation!r}")
  x0, y0 = jnp.floor(sx), jnp.floor(sy)
  wx, wy = (sx - x0)[..., None], (sy - y0)[..., None]
  x0i, y0i = x0.astype(jnp.int32), y0.astype(jnp.int32)
  out = (read(y0i, x0i) * (1 - wx) * (1 - wy) + read(y0i, x0i + 1) * wx * (1 - wy)
         + read(y0i + 1, x0i) * (1 - wx) * wy + read(y0i + 1, x0i + 1) * wx * wy)
  return jnp.clip(out, 0, 1).astype(dtype)


def _mat(a, b, c, d, e, f):
  return jnp.stack([jnp.stack([a, b, c]), jnp.stack([d, e, f])])


def affine_matrix(op: str, m, height: int, width: int, dtype=jnp.float32) -> Array:
  """Inverse map ``[2, 3]`` (output (x, y, 1) -> input (x, y)) of a geometric
  op: ``ShearX`` (x_in = x + m (y + 1/2), i.e. about the top-left image
  corner), ``ShearY``, ``TranslateX`` / ``TranslateY`` (content moves right /
  down by ``trunc(m)`` pixels), ``Rotate`` (``m`` degrees counter-clockwise
  about the image centre)."""
  m = jnp.asarray(m, dtype)
  one, zero = jnp.ones((), dtype), jnp.zeros((), dtype)
  if op == "ShearX":
    return _mat(one, m, 0.5 * m, zero, one, zero)
  if op == "ShearY":
    return _mat(one, zero, zero, m, one, 0.5 * m)
  if op == "TranslateX":
    return _mat(one, zero, -jnp.trunc(m), zero, one, zero)
  if op == "TranslateY":
    return _mat(one, zero, zero, zero, one, -jnp.trunc(m))
  if op == "Rotate":
    th = jnp.deg2rad(m)
    c, s = jnp.cos(th), jnp.sin(th)
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    return _mat(c, -s, cx - c * cx + s * cy, s, c, cy - s * cx - c * cy)
  raise ValueError(f"not a geometric op: {op!r}")


def _geometric(op):
  def fn(img, m, fill=0.0, interpolation="nearest"):
    h, w, _ = img.shape
    return _sample(img, affine_matrix(op, m, h, w, img.dtype), fill, interpolation)
  fn.__name__ = op.lower()
  return fn


shear_x = _geometric("ShearX")
shear_y = _geometric("ShearY")
translate_x = _geometric("TranslateX")
translate_y = _geometric("TranslateY")
rotate = _geometric("Rotate")


def brightness(img, m):
  """Factor ``1 + m`` towards black (PIL ImageEnhance.Brightness)."""
  return _blend(img, jnp.zeros_like(img), 1 + m)


def color(img, m):
  """Saturation factor ``1 + m`` (blend with the grey image; no-op if C=1)."""
  if img.shape[-1] == 1:
    return img
  return _blend(img, _grey(img), 1 + m)


def contrast(img, m):
  """Contrast factor ``1 + m`` (blend with the mean grey level)."""
  return _blend(img, jnp.mean(_grey(img)), 1 + m)


def sharpness(img, m):
  """Factor ``1 + m`` relative to the 3x3 smoothed image (kernel 1s with a 5
  in the centre, /13); the border pixels are left as they are."""
  h, w, _ = img.shape
  if h < 3 or w < 3:
    return img
  acc = 4 * img[1:-1, 1:-1]
  for dy in range(3):
    for dx in range(3):
      acc = acc + img[dy:h - 2 + dy, dx:w - 2 + dx]
  degenerate = img.at[1:-1, 1:-1].set(acc / 13)
  return _blend(img, degenerate, 1 + m)


def _quantize(img):
  return jnp.clip(jnp.round(img * 255), 0, 255).astype(jnp.int32)


def posterize(img, bits):
  """Keeps the ``bits`` most significant bits of each 8-bit value."""
  shift = 8 - jnp.asarray(bits).astype(jnp.int32)
  q = (_quantize(img) >> shift) << shift
  return (q / 255).astype(img.dtype)


def solarize(img, threshold):
  """Inverts values >= ``threshold`` (threshold in [0, 1])."""
  return jnp.where(img >= threshold, 1 - img, img).astype(img.dtype)


def autocontrast(img, m=None):
  """Per channel, maps [min, max] to [0, 1] (unchanged if constant)."""
  lo = jnp.min(img, axis=(0, 1), keepdims=True)
  hi = jnp.max(img, axis=(0, 1), keepdims=True)
  ok = hi > lo
  out = (img - lo) / jnp.where(ok, hi - lo, 1)
  return jnp.where(ok, jnp.clip(out, 0, 1), img).astype(img.dtype)


def equalize(img, m=None):
  """Per-channel histogram equalisation (PIL ``ImageOps.equalize``'s LUT on
  the 8-bit quantisation)."""
  h, w, _ = img.shape

  def chan(c_img):
    q = _quantize(c_img).reshape(-1)
    hist = jnp.zeros(256, jnp.int32).at[q].add(1)
    last = jnp.max(jnp.where(hist > 0, jnp.arange(256), -1))
    step = (h * w - hist[last]) // 255
    cum = jnp.cumsum(hist) - hist  # exclusive
    lut = jnp.clip((cum + step // 2) // jnp.maximum(step, 1), 0, 255)
    out = (lut[q] / 255).astype(c_img.dtype).reshape(c_img.shape)
    return jnp.where(step > 0, out, c_img)

  return jnp.moveaxis(jax.vmap(chan, in_axes=-1)(img), 0, -1)


def invert(img, m=None):
  return (1 - img).astype(img.dtype)


def identity(img, m=None):
  return img


OP_NAMES = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY",
            "Rotate", "Brightness", "Color", "Contrast", "Sharpness",
            "Posterize", "Solarize", "AutoContrast", "Equalize", "Invert")
RANDAUGMENT_OPS = OP_NAMES[:14]  # torchvision RandAugment: all but Invert
_SIGNED = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate",
           "Brightness", "Color", "Contrast", "Sharpness")


def magnitude_table(num_bins: int, height: int, width: int) -> np.ndarray:
  """``[len(OP_NAMES), num_bins]`` magnitudes per bin (torchvision's
  ``_augmentation_space``; Solarize thresholds divided by 255, translations
  truncated to whole pixels)."""
  nb = int(num_bins)
  lin = lambda hi: np.linspace(0.0, hi, nb)
  table = {
      "ShearX": lin(0.3), "ShearY": lin(0.3),
      "TranslateX": np.trunc(lin(150.0 / 331.0 * width)),
      "TranslateY": np.trunc(lin(150.0 / 331.0 * height)),
      "Rotate": lin(30.0),
      "Brightness": lin(0.9), "Color": lin(0.9), "Contrast": lin(0.9),
      "Sharpness": lin(0.9),
      "Posterize": 8 - np.round(np.arange(nb) / ((nb - 1) / 4)),
      "Solarize": np.linspace(255.0, 0.0, nb) / 255.0,
  }
  return np.stack([table.get(n, np.zeros(nb)) for n in OP_NAMES])


_GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
_POINTWISE = {
    "Identity": identity, "Brightness": brightness, "Color": color,
    "Contrast": contrast, "Sharpness": sharpness, "Posterize": posterize,
    "Solarize": solarize, "AutoContrast": autocontrast, "Equalize": equalize,
    "Invert": invert,
}


def _switch(img: Array, op_index, m, fill: float, interpolation: str,
            ops: Sequence[str] = OP_NAMES) -> Array:
  """``lax.switch`` over ``ops``. The geometric ops share one resampling of
  the image (their inverse matrix is selected first), so a vmapped switch,
  which evaluates every branch, resamples once instead of five times."""
  h, w, _ = img.shape
  dtype = img.dtype
  m = jnp.asarray(m, dtype)
  geo = [n for n in ops if n in _GEOMETRIC]
  warped = None
  if geo:
    mats = jnp.stack([affine_matrix(n, m, h, w, dtype) for n in geo])
    which = jnp.zeros((), jnp.int32)
    for j, n in enumerate(geo):
      which = jnp.where(op_index == ops.index(n), j, which)
    warped = _sample(img, mats[which], fill, interpolation)

  def branch(name):
    if name in _GEOMETRIC:
      return lambda i, wp, mm: wp
    f = _POINTWISE[name]
    # lax.switch needs identical output types: pin every branch to the input's.
    return lambda i, wp, mm: f(i, mm).astype(dtype)

  return lax.switch(op_index, [branch(n) for n in ops], img,
                    img if warped is None else warped, m)


def apply_op(img: Array, op_index, magnitude, *, fill: float = 0.0,
             interpolation: str = "nearest") -> Array:
  """Applies op ``OP_NAMES[op_index]`` with the (signed) ``magnitude`` value to
  one image ``[H, W, C]`` via ``lax.switch``."""
  return _switch(img, op_index, magnitude, fill, interpolation)


# --------------------------------------------------------------------------
# Batched augmentations
# --------------------------------------------------------------------------

def _check_images(x) -> None:
  if x.ndim != 4:
    raise ValueError(f"images must be [B, H, W, C], got shape {x.shape}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"images must be float in [0, 1] (use "
                     f"tsjax.data.images.to_float), got {x.dtype}")


def _per_example(fn, key, x):
  return jax.vmap(fn)(jax.random.split(key, x.shape[0]), x)


PAD_MODES = ("constant", "reflect")


def random_crop_flip(key: Array, x: Array, pad: int = 4, *, flip: bool = True,
                     fill: float = 0.0, pad_mode: str = "constant") -> Array:
  """torchvision ``RandomCrop(size, padding=pad)`` + ``RandomHorizontalFlip()``.

  Pads every image with ``pad`` pixels of ``fill`` (``pad_mode="constant"``,
  zero padding by default) or by mirroring without repeating the edge
  (``"reflect"``, NumPy's ``mode='reflect'``: Rice et al.'s
  locuslab/robust_overfitting utils.py:26-27), crops an ``H x W`` window at
  a uniform offset in ``[0, 2 pad]^2`` and mirrors it left-right with
  probability 1/2. Outputs are exact pixel copies.
  """
  _check_images(x)
  pad = int(pad)
  if pad < 0:
    raise ValueError(f"pad must be >= 0, got {pad}")
  if pad_mode not in PAD_MODES:
    raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
  _, h, w, c = x.shape
  widths = ((pad, pad), (pad, pad), (0, 0))

  def one(k, img):
    ky, kx, kf = jax.random.split(k, 3)
    padded = (jnp.pad(img, widths, mode="reflect") if pad_mode == "reflect"
              else jnp.pad(img, widths,
                           constant_values=jnp.asarray(fill, img.dtype)))
    oy = jax.random.randint(ky, (), 0, 2 * pad + 1, dtype=jnp.int32)
    ox = jax.random.randint(kx, (), 0, 2 * pad + 1, dtype=jnp.int32)
    out = lax.dynamic_slice(padded, (oy, ox, jnp.int32(0)), (h, w, c))
    if flip:
      out = jnp.where(jax.random.bernoulli(kf), out[:, ::-1], out)
    return out

  return _per_example(one, key, x)


def crop_flip_reflect(key: Array, x: Array, pad: int = 4) -> Array:
  """``random_crop_flip`` with reflect padding (Rice et al.'s PGD-AT data:
  robust_overfitting utils.py:26-27 ``np.pad(..., mode='reflect')``, then
  train_cifar.py:182 ``Crop(32, 32), FlipLR()``)."""
  return random_crop_flip(key, x, pad, pad_mode="reflect")


def crop_and_resize(img: Array, fractions: Array) -> Array:
  """Crops ``fractions = (top, right, bottom, left)`` of the height / width
  off one image ``[H, W, C]`` and resizes the rest back to ``H x W``
  (bilinear, pixel centres aligned; imgaug's ``CropAndPad(keep_size=True)``
  resizes with OpenCV's interpolation, so values differ slightly)."""
  h, w, _ = img.shape
  top = jnp.round(fractions[0] * h)
  right = jnp.round(fractions[1] * w)
  bottom = jnp.round(fractions[2] * h)
  left = jnp.round(fractions[3] * w)
  sy = (h - top - bottom) / h
  sx = (w - left - right) / w
  zero = jnp.zeros((), img.dtype)
  inv = _mat(sx, zero, left + 0.5 * sx - 0.5, zero, sy, top + 0.5 * sy - 0.5)
  return _sample(img, inv, 0.0, "bilinear")


def ccat_augment(key: Array, x: Array, max_crop: float = 0.2,
                 contrast_range: tuple = (0.7, 1.3)) -> Array:
  """CCAT's CIFAR augmentation: per image *one* of {crop, flip, contrast},
  uniformly chosen, then a clip to [0, 1] (davidstutz/confidence-calibrated-
  adversarial-training experiments/config/common.py:22-80, 97-98 builds
  ``iaa.SomeOf(max(1, len(augmenters) // 2), augmenters)``, one of three
  with crop, flip and contrast on, experiments/config/cifar10.py:24-26):
  crop = ``CropAndPad(percent=(0, 0.2))``, each side cropped by an
  independent uniform fraction in ``[0, max_crop]`` and resized back
  (:func:`crop_and_resize`); flip = left-right; contrast =
  ``ContrastNormalization((0.7, 1.3))``, ``0.5 + a (x - 0.5)`` with ``a``
  uniform in ``contrast_range``."""
  _check_images(x)
  lo, hi = (float(v) for v in contrast_range)

  def one(k, img):
    k_op, k_crop, k_a = jax.random.split(k, 3)
    fr = jax.random.uniform(k_crop, (4,), img.dtype, 0.0, max_crop)
    a = jax.random.uniform(k_a, (), img.dtype, lo, hi)
    return lax.switch(jax.random.randint(k_op, (), 0, 3), [
        lambda im: crop_and_resize(im, fr),
        lambda im: im[:, ::-1],
        lambda im: jnp.clip(0.5 + a * (im - 0.5), 0, 1).astype(im.dtype)],
        img)

  return _per_example(one, key, x)


def random_flip(key: Array, x: Array) -> Array:
  """Horizontal flip with probability 1/2 per example."""
  _check_images(x)
  return _per_example(
      lambda k, img: jnp.where(jax.random.bernoulli(k), img[:, ::-1], img), key, x)


def cutout(key: Array, x: Array, size: int = 16, *, fill: float = 0.5) -> Array:
  """Cutout (DeVries & Taylor 2017): a ``size x size`` square centred at a
  uniform pixel (clipped at the borders) set to ``fill`` (0.5: mid grey, the
  analogue of zeroing mean-normalised inputs)."""
  _check_images(x)
  _, h, w, _ = x.shape
  half = int(size) // 2

  def one(k, img):
    ky, kx = jax.random.split(k)
    cy = jax.random.randint(ky, (), 0, h, dtype=jnp.int32)
    cx = jax.random.randint(kx, (), 0, w, dtype=jnp.int32)
    ys = jnp.arange(h, dtype=jnp.int32)[:, None]
    xs = jnp.arange(w, dtype=jnp.int32)[None, :]
    box = ((ys >= cy - half) & (ys < cy + half) & (xs >= cx - half) & (xs < cx + half))
    return jnp.where(box[..., None], jnp.asarray(fill, img.dtype), img)

  return _per_example(one, key, x)


def randaugment(key: Array, x: Array, num_ops: int = 2, magnitude: int = 9, *,
                num_bins: int = 31, fill: float = 0.0,
                interpolation: str = "nearest") -> Array:
  """RandAugment (Cubuk et al. 2020), torchvision's variant.

  Per example, ``num_ops`` times: an op drawn uniformly from
  :data:`RANDAUGMENT_OPS` (14 ops incl. Identity), applied with the magnitude
  of bin ``magnitude`` of ``num_bins`` (:func:`magnitude_table`) and, for
  signed ops, a random sign.
  """
  _check_images(x)
  num_ops, magnitude, num_bins = int(num_ops), int(magnitude), int(num_bins)
  if num_ops < 0:
    raise ValueError(f"num_ops must be >= 0, got {num_ops}")
  if not 0 <= magnitude < num_bins:
    raise ValueError(f"magnitude must be a bin in [0, {num_bins}), got {magnitude}")
  _, h, w, _ = x.shape
  mags = jnp.asarray(magnitude_table(num_bins, h, w)[:len(RANDAUGMENT_OPS), magnitude],
                     x.dtype)
  signed = jnp.asarray([n in _SIGNED for n in RANDAUGMENT_OPS])

  def one(k, img):
    for i in range(num_ops):
      k_op, k_sign = jax.random.split(jax.random.fold_in(k, i))
      op = jax.random.randint(k_op, (), 0, len(RANDAUGMENT_OPS), dtype=jnp.int32)
      neg = signed[op] & jax.random.bernoulli(k_sign)
      m = jnp.where(neg, -mags[op], mags[op])
      img = _switch(img, op, m, fill, interpolation, RANDAUGMENT_OPS)
    return img

  return _per_example(one, key, x)


# torchvision AutoAugmentPolicy.CIFAR10 (the reduced-CIFAR-10 policy of
# Cubuk et al. 2019): 25 sub-policies of two (op, probability, magnitude bin).
CIFAR10_POLICY = (
    (("Invert", 0.1, None), ("Contrast", 0.2, 6)),
    (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
    (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)),
    (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.5, None), ("Equalize", 0.9, None)),
    (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
    (("Color", 0.4, 3), ("Brightness", 0.6, 7)),
    (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
    (("Equalize", 0.6, None), ("Equalize", 0.5, None)),
    (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
    (("Color", 0.7, 7), ("TranslateX", 0.5, 8)),
    (("Equalize", 0.3, None), ("AutoContrast", 0.4, None)),
    (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)),
    (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
    (("Solarize", 0.5, 2), ("Invert", 0.0, None)),
    (("Equalize", 0.2, None), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.2, None), ("Equalize", 0.6, None)),
    (("Color", 0.9, 9), ("Equalize", 0.6, None)),
    (("AutoContrast", 0.8, None), ("Solarize", 0.2, 8)),
    (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
    (("Solarize", 0.4, 5), ("AutoContrast", 0.9, None)),
    (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.9, None), ("Solarize", 0.8, 3)),
    (("Equalize", 0.8, None), ("Invert", 0.1, None)),
    (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None)),
)


def autoaugment(key: Array, x: Array, policy=CIFAR10_POLICY, *,
                fill: float = 0.0, interpolation: str = "nearest") -> Array:
  """AutoAugment with a policy of two-op sub-policies (magnitude bins of 10).

  Per example: a sub-policy drawn uniformly; each of its ops applied with its
  probability (``u < p``), with its bin's magnitude and a random sign for
  signed ops.
  """
  _check_images(x)
  _, h, w, _ = x.shape
  table = magnitude_table(10, h, w)
  ops = np.asarray([[OP_NAMES.index(o) for o, _, _ in sub] for sub in policy], np.int32)
  probs = jnp.asarray([[p for _, p, _ in sub] for sub in policy], x.dtype)
  mags = jnp.asarray([[table[OP_NAMES.index(o), b or 0] for o, _, b in sub]
                      for sub in policy], x.dtype)
  signed = jnp.asarray([[o in _SIGNED for o, _, _ in sub] for sub in policy])
  n_sub, n_stage = ops.shape
  ops = jnp.asarray(ops)

  def one(k, img):
    k_pol, k_p, k_s = jax.random.split(k, 3)
    pid = jax.random.randint(k_pol, (), 0, n_sub, dtype=jnp.int32)
    u = jax.random.uniform(k_p, (n_stage,), x.dtype)
    neg = jax.random.bernoulli(k_s, 0.5, (n_stage,))
    for i in range(n_stage):
      m = jnp.where(signed[pid, i] & neg[i], -mags[pid, i], mags[pid, i])
      new = _switch(img, ops[pid, i], m, fill, interpolation)
      img = jnp.where(u[i] < probs[pid, i], new, img)
    return img

  return _per_example(one, key, x)


def autoaugment_cifar10(key: Array, x: Array, *, fill: float = 0.0,
                        interpolation: str = "nearest") -> Array:
  """AutoAugment with the CIFAR-10 policy (:data:`CIFAR10_POLICY`)."""
  return autoaugment(key, x, CIFAR10_POLICY, fill=fill, interpolation=interpolation)


# --------------------------------------------------------------------------
# Label-mixing augmentations
# --------------------------------------------------------------------------

def _beta_symmetric(key: Array, alpha: float, shape=(), dtype=jnp.float32) -> Array:
  """``Beta(alpha, alpha)`` samples as ``G1 / (G1 + G2)`` with ``G ~ Gamma(alpha)``
  drawn in log space by one ``loggamma`` call (stable for small alpha, and
  half the compiled code of ``jax.random.beta``)."""
  lg = jax.random.loggamma(key, jnp.full(tuple(shape) + (2,), alpha, dtype), dtype=dtype)
  lam = jnp.exp(lg[..., 0] - jnp.logaddexp(lg[..., 0], lg[..., 1]))
  return jnp.clip(lam, 0, 1).astype(dtype)


def _check_mix(x, y, alpha):
  _check_images(x)
  if y.ndim != 2 or y.shape[0] != x.shape[0] or not jnp.issubdtype(y.dtype, jnp.floating):
    raise ValueError(f"labels must be float one-hot (or soft) [B, K] "
                     f"(jax.nn.one_hot(labels, K)), got {y.dtype} {y.shape}")
  if not (isinstance(alpha, (int, float)) and alpha > 0):
    raise ValueError(f"alpha must be a number > 0, got {alpha!r}")


def mixup(key: Array, x: Array, y_onehot: Array, alpha: float = 1.0, *,
          per_example: bool = False) -> tuple[Array, Array, Array]:
  """mixup (Zhang et al. 2018) with a random partner permutation.

  ``lam ~ Beta(alpha, alpha)`` (one per batch, or one per example with
  ``per_example``); ``x' = lam x + (1 - lam) x[perm]``, same for the labels.

  Returns:
    ``(x_mixed [B,H,W,C], y_mixed [B,K], lam [B])`` with ``lam`` the weight
    of each example's own image and label (rows of ``y_mixed`` sum to 1 when
    those of ``y_onehot`` do).
  """
  _check_mix(x, y_onehot, alpha)
  b = x.shape[0]
  k_lam, k_perm = jax.random.split(key)
  lam = _beta_symmetric(k_lam, alpha, (b,) if per_example else (), x.dtype)
  lam = jnp.broadcast_to(lam, (b,))
  perm = jax.random.permutation(k_perm, b)
  lx = lam[:, None, None, None]
  x_mix = lx * x + (1 - lx) * x[perm]
  ly = lam.astype(y_onehot.dtype)[:, None]
  y_mix = ly * y_onehot + (1 - ly) * y_onehot[perm]
  return x_mix.astype(x.dtype), y_mix, lam


def cutmix_box(key: Array, height: int, width: int, alpha: float, dtype=jnp.float32):
  """CutMix's box (Yun et al. 2019 reference code): ``lam ~ Beta(alpha, alpha)``,
  side ``floor(size * sqrt(1 - lam))``, centre uniform, clipped to the image.

  Returns ``(mask [H, W] bool, lam_adj)`` with ``lam_adj = 1 - area / (H W)``
  the exact weight of the original image after clipping.
  """
  k_lam, ky, kx = jax.random.split(key, 3)
  lam = _beta_symmetric(k_lam, alpha, (), dtype)
  rat = jnp.sqrt(jnp.clip(1 - lam, 0, 1))
  cut_h = jnp.floor(height * rat).astype(jnp.int32)
  cut_w = jnp.floor(width * rat).astype(jnp.int32)
  cy = jax.random.randint(ky, (), 0, height, dtype=jnp.int32)
  cx = jax.random.randint(kx, (), 0, width, dtype=jnp.int32)
  y1, y2 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  x1, x2 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  ys = jnp.arange(height, dtype=jnp.int32)[:, None]
  xs = jnp.arange(width, dtype=jnp.int32)[None, :]
  mask = (ys >= y1) & (ys < y2) & (xs >= x1) & (xs < x2)
  area = (y2 - y1) * (x2 - x1)
  lam_adj = (1 - area.astype(dtype) / jnp.asarray(height * width, dtype)).astype(dtype)
  return mask, lam_adj


def cutmix(key: Array, x: Array, y_onehot: Array, alpha: float = 1.0, *,
           per_example: bool = False) -> tuple[Array, Array, Array]:
  """CutMix: paste a box from a permuted partner; labels weighted by area.

  One box for the whole batch (reference code) or one per example
  (``per_example``). The label weight of the original is the exact fraction
  of its pixels that survive, ``1 - (clipped box area) / (H W)``.

  Returns:
    ``(x_mixed, y_mixed, lam [B])``, ``lam`` = weight of the original.
  """
  _check_mix(x, y_onehot, alpha)
  b, h, w, _ = x.shape
  k_box, k_perm = jax.random.split(key)
  if per_example:
    mask, lam = jax.vmap(lambda k: cutmix_box(k, h, w, alpha, x.dtype))(
        jax.random.split(k_box, b))
  else:
    mask, lam = cutmix_box(k_box, h, w, alpha, x.dtype)
    mask, lam = jnp.broadcast_to(mask, (b, h, w)), jnp.broadcast_to(lam, (b,))
  perm = jax.random.permutation(k_perm, b)
  x_mix = jnp.where(mask[..., None], x[perm], x)
  ly = lam.astype(y_onehot.dtype)[:, None]
  y_mix = ly * y_onehot + (1 - ly) * y_onehot[perm]
  return x_mix, y_mix, lam


# --------------------------------------------------------------------------
# Composition from a small spec
# --------------------------------------------------------------------------

AUGMENTATIONS: dict[str, Callable] = {
    "crop_flip": random_crop_flip,
    "crop_flip_reflect": crop_flip_reflect,
    "ccat": ccat_augment,
    "flip": random_flip,
    "cutout": cutout,
    "randaugment": randaugment,
    "autoaugment_cifar10": autoaugment_cifar10,
    "mixup": mixup,
    "cutmix": cutmix,
}
MIXING = ("mixup", "cutmix")   # ops that also mix the labels

Spec = tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]


def parse_augment_spec(spec: Any, field: str = "augment") -> Spec:
  """Normalises and validates an augmentation spec (before any tracing).

  Accepted: ``None`` / ``""`` / ``()`` (no augmentation); a comma-separated
  string of names (``"crop_flip,autoaugment_cifar10"``); a sequence whose
  items are a name, ``(name, {kwarg: value})`` or ``{"name": name, **kwargs}``.
  Names: :data:`AUGMENTATIONS`. Raises ``ValueError`` naming ``field`` for an
  unknown op or keyword. Returns a hashable tuple (usable as a static arg).
  """
  if spec is None:
    return ()
  if isinstance(spec, str):
    spec = [s.strip() for s in spec.split(",") if s.strip()]
  out = []
  for i, item in enumerate(spec):
    if isinstance(item, str):
      name, kwargs = item, {}
    elif isinstance(item, Mapping) or hasattr(item, "to_dict"):
      d = dict(item.to_dict() if hasattr(item, "to_dict") else item)
      name, kwargs = d.pop("name", None), d
    elif isinstance(item, (tuple, list)) and len(item) == 2:
      name, kwargs = item[0], dict(item[1] or {})
    else:
      raise ConfigError(f"config field '{field}[{i}]' must be an op name, "
                       f"(name, kwargs) or a dict with 'name', got {item!r}")
    if name not in AUGMENTATIONS:
      raise ConfigError(f"config field '{field}[{i}]': unknown augmentation "
                       f"{name!r}; expected one of {sorted(AUGMENTATIONS)}")
    params = inspect.signature(AUGMENTATIONS[name]).parameters
    allowed = [p for p in params if p not in ("key", "x", "y_onehot")]
    for k in kwargs:
      if k not in allowed:
        raise ConfigError(f"config field '{field}[{i}]' ({name}): unknown "
                         f"argument {k!r}; expected some of {allowed}")
    out.append((name, tuple(sorted(kwargs.items()))))
  return tuple(out)


def make_augment(spec: Any, field: str = "augment") -> Callable:
  """Returns ``fn(key, x, labels=None)`` applying the spec's ops in order.

  Op ``i`` uses ``jax.random.fold_in(key, i)``, so the result is a function
  of ``(key, x)`` only (consistent teaching: same key, same view). ``fn``
  returns ``x_aug``, or ``(x_aug, labels_aug)`` when ``labels`` (float one-hot
  ``[B, K]``) is given; mixup / cutmix need labels. Wrap in ``jax.jit``.
  """
  parsed = parse_augment_spec(spec, field)

  def fn(key, x, labels=None):
    for i, (name, kwargs) in enumerate(parsed):
      k = jax.random.fold_in(key, i)
      if name in MIXING:
        if labels is None:
          raise ValueError(f"augmentation {name!r} mixes labels: pass "
                           f"labels=one-hot [B, K]")
        x, labels, _ = AUGMENTATIONS[name](k, x, labels, **dict(kwargs))
      else:
        x = AUGMENTATIONS[name](k, x, **dict(kwargs))
    return x if labels is None else (x, labels)

  return fn


def augment(key: Array, x: Array, spec: Any, labels: Array | None = None):
  """``make_augment(spec)(key, x, labels)``; see :func:`make_augment`."""
  return make_augment(spec)(key, x, labels)
