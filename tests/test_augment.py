"""tsjax.data.augment: invariants, exactness of crop/flip and CutMix areas,
determinism in the key (consistent teaching), agreement with PIL's ops."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tsjax.data import augment as A

B, H, W, C = 8, 32, 32, 3


def images(seed=0, shape=(B, H, W, C)):
  """Smooth-ish random images in [0, 1], float32, on the 256-level grid."""
  rng = np.random.default_rng(seed)
  u8 = (np.cumsum(rng.integers(0, 20, shape), axis=2) % 256).astype(np.uint8)
  return jnp.asarray(u8, jnp.float32) / 255


IMAGE_OPS = {
    "crop_flip": A.random_crop_flip,
    "crop_flip_reflect": A.crop_flip_reflect,
    "ccat": A.ccat_augment,
    "flip": A.random_flip,
    "cutout": A.cutout,
    "randaugment": A.randaugment,
    "autoaugment_cifar10": A.autoaugment_cifar10,
}


@pytest.fixture(scope="module")
def jitted():
  return {name: jax.jit(fn) for name, fn in IMAGE_OPS.items()}


@pytest.mark.parametrize("name", sorted(IMAGE_OPS))
def test_shape_dtype_range_and_key_determinism(jitted, name):
  x = images()
  f = jitted[name]
  k1, k2 = jax.random.key(1), jax.random.key(2)
  y = f(k1, x)
  assert y.shape == x.shape and y.dtype == jnp.float32
  assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
  assert np.all(np.isfinite(np.asarray(y)))
  # Same key -> bit-identical view (two networks can see the same input).
  np.testing.assert_array_equal(np.asarray(y), np.asarray(f(k1, x)))
  assert not np.array_equal(np.asarray(y), np.asarray(f(k2, x)))
  # Per-example randomness: not every example gets the same transformation.
  if name != "flip":
    same = [np.array_equal(np.asarray(y[i]), np.asarray(x[i])) for i in range(B)]
    assert not all(same)


def test_grayscale_images(jitted):
  # RandAugment draws every op but Invert; Color is a no-op on one channel.
  x = images(shape=(4, 28, 28, 1))
  y = jitted["randaugment"](jax.random.key(0), x)
  assert y.shape == x.shape and y.dtype == x.dtype
  assert 0 <= float(y.min()) and float(y.max()) <= 1


@pytest.mark.parametrize("name,mode", [("crop_flip", "constant"),
                                       ("crop_flip_reflect", "reflect")])
def test_crop_flip_is_an_exact_shift_of_the_padded_image(jitted, name, mode):
  """Each output is a crop (maybe mirrored) of the image padded as NumPy
  pads it (Rice et al.: utils.py:26-27, np.pad(..., mode='reflect'))."""
  x = images(3)
  pad = 4
  y = np.asarray(jitted[name](jax.random.key(7), x))
  padded = np.pad(np.asarray(x), ((0, 0), (pad, pad), (pad, pad), (0, 0)),
                  mode=mode)
  found = []
  for i in range(B):
    matches = [(oy, ox, fl) for oy, ox, fl in itertools.product(
        range(2 * pad + 1), range(2 * pad + 1), (False, True))
        if np.array_equal(
            (lambda c: c[:, ::-1] if fl else c)(padded[i, oy:oy + H, ox:ox + W]), y[i])]
    assert matches, f"example {i} is not a crop of its padded image"
    found.append(matches[0])
  assert len(set(found)) > 1 and any(m[2] for m in found) and not all(m[2] for m in found)


def _crop_resize_reference(img, top, right, bottom, left):
  """Bilinear resize of img[top:H-bottom, left:W-right] back to H x W with
  aligned pixel centres, written out per pixel (independent of
  tsjax.data.augment._sample)."""
  h, w, _ = img.shape
  ch, cw = h - top - bottom, w - left - right
  out = np.zeros_like(img)
  for i in range(h):
    for j in range(w):
      sy = top + (i + 0.5) * ch / h - 0.5
      sx = left + (j + 0.5) * cw / w - 0.5
      y0, x0 = int(np.floor(sy)), int(np.floor(sx))
      acc = 0.0
      for yy, wy in ((y0, 1 - (sy - y0)), (y0 + 1, sy - y0)):
        for xx, wx in ((x0, 1 - (sx - x0)), (x0 + 1, sx - x0)):
          if 0 <= yy < h and 0 <= xx < w and wy * wx > 0:
            acc = acc + wy * wx * img[yy, xx]
      out[i, j] = acc
  return out


def test_crop_and_resize_against_a_per_pixel_reference():
  img = np.asarray(images(9, (1, 12, 10, 3)))[0]
  for fr in [(0.0, 0.0, 0.0, 0.0), (0.2, 0.1, 0.0, 0.15), (0.1, 0.2, 0.2, 0.0)]:
    got = np.asarray(A.crop_and_resize(jnp.asarray(img), jnp.asarray(fr)))
    px = [int(round(fr[0] * 12)), int(round(fr[1] * 10)),
          int(round(fr[2] * 12)), int(round(fr[3] * 10))]
    np.testing.assert_allclose(got, _crop_resize_reference(img, *px),
                               atol=1e-6)


def test_ccat_augment_applies_exactly_one_of_crop_flip_contrast(jitted):
  """config/common.py:22-80: SomeOf(1, [crop, flip, contrast]) per image:
  each output is the flipped image, a contrast change 0.5 + a (x - 0.5)
  with a in [0.7, 1.3], or a crop of 0..6 pixels (20% of 32) per side
  resized back; the three come out about equally often."""
  x = np.asarray(images(5, (48, H, W, C)))
  y = np.asarray(jitted["ccat"](jax.random.key(3), jnp.asarray(x)))
  side = np.arange(7) / 32
  fracs = jnp.asarray(np.stack(np.meshgrid(side, side, side, side,
                                           indexing="ij"), -1).reshape(-1, 4))
  crops = jax.jit(jax.vmap(A.crop_and_resize, in_axes=(None, 0)))
  kinds = []
  for xi, yi in zip(x, y):
    dx, dy = xi - 0.5, yi - 0.5
    inside = (yi > 1e-6) & (yi < 1 - 1e-6)       # not clipped
    a = float((dx * dy)[inside].sum() / (dx * dx)[inside].sum())
    if np.array_equal(yi, xi[:, ::-1]):
      kinds.append("flip")
    elif 0.7 <= a <= 1.3 and np.allclose(np.clip(0.5 + a * dx, 0, 1), yi,
                                         atol=1e-5):
      kinds.append("contrast")
    else:
      err = np.abs(np.asarray(crops(jnp.asarray(xi), fracs)) - yi).max(
          axis=(1, 2, 3))
      assert err.min() < 1e-5, "neither flip, contrast nor crop"
      kinds.append("crop")
  counts = {k: kinds.count(k) for k in ("crop", "flip", "contrast")}
  assert all(6 <= v <= 28 for v in counts.values()), counts


def test_crop_flip_pad_zero_and_flip_only(jitted):
  x = images(4)
  y = jax.jit(A.random_crop_flip, static_argnames=("pad", "flip"))(
      jax.random.key(0), x, pad=0, flip=False)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
  f = np.asarray(jitted["flip"](jax.random.key(0), x))
  for i in range(B):
    assert (np.array_equal(f[i], np.asarray(x[i]))
            or np.array_equal(f[i], np.asarray(x[i])[:, ::-1]))


def test_same_view_regardless_of_sharding(jitted):
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
  sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  x = images(5)
  f = jitted["crop_flip"]
  y_host = f(jax.random.key(3), x)
  y_sharded = f(jax.random.key(3), jax.device_put(x, sh))
  np.testing.assert_array_equal(np.asarray(y_host), np.asarray(y_sharded))


def test_cutout_box(jitted):
  x = jnp.ones((B, H, W, C), jnp.float32)
  y = np.asarray(jitted["cutout"](jax.random.key(0), x))  # size 16, fill 0.5
  for i in range(B):
    rows, cols = np.nonzero(y[i, :, :, 0] == 0.5)
    assert 0 < len(rows) <= 256 and np.all(y[i][y[i] != 0.5] == 1)
    assert len(rows) == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)


# ------------------------------------------------------------ single ops vs PIL

def _pil_pair(seed=0):
  from PIL import Image
  u8 = np.asarray(images(seed, (1, H, W, C))[0] * 255).round().astype(np.uint8)
  return Image.fromarray(u8), jnp.asarray(u8, jnp.float32) / 255


def _u8(x):
  return np.round(np.asarray(x) * 255).astype(int)


def test_histogram_and_pointwise_ops_match_pil():
  from PIL import ImageOps
  pil, x = _pil_pair()
  np.testing.assert_array_equal(_u8(A.equalize(x)), np.asarray(ImageOps.equalize(pil)))
  np.testing.assert_array_equal(_u8(A.autocontrast(x)),
                                np.asarray(ImageOps.autocontrast(pil)))
  np.testing.assert_array_equal(_u8(A.invert(x)), np.asarray(ImageOps.invert(pil)))
  for bits in (1, 4, 7):
    np.testing.assert_array_equal(_u8(A.posterize(x, bits)),
                                  np.asarray(ImageOps.posterize(pil, bits)))
  for t in (0, 77, 128, 255):
    np.testing.assert_array_equal(_u8(A.solarize(x, t / 255)),
                                  np.asarray(ImageOps.solarize(pil, t)))


def test_enhance_ops_match_pil_up_to_rounding():
  from PIL import ImageEnhance
  pil, x = _pil_pair(1)
  pairs = [(A.brightness, ImageEnhance.Brightness), (A.color, ImageEnhance.Color),
           (A.contrast, ImageEnhance.Contrast), (A.sharpness, ImageEnhance.Sharpness)]
  for ours, theirs in pairs:
    for m in (-0.6, 0.45):
      d = np.abs(_u8(ours(x, m)) - np.asarray(theirs(pil).enhance(1 + m)).astype(int))
      assert d.max() <= 1, ours.__name__  # PIL truncates to uint8


def test_geometric_ops_match_pil_nearest():
  from PIL import Image
  pil, x = _pil_pair(2)
  ref = lambda data: np.asarray(pil.transform(pil.size, Image.AFFINE, data, Image.NEAREST))
  cases = [(A.shear_x(x, 0.3), ref((1, 0.3, 0, 0, 1, 0))),
           (A.shear_x(x, -0.17), ref((1, -0.17, 0, 0, 1, 0))),
           (A.shear_y(x, 0.21), ref((1, 0, 0, 0.21, 1, 0))),
           (A.translate_x(x, 5.0), ref((1, 0, -5, 0, 1, 0))),
           (A.translate_y(x, -7.9), ref((1, 0, 0, 0, 1, 7))),  # whole pixels
           (A.rotate(x, 17.0), np.asarray(pil.rotate(17.0, Image.NEAREST))),
           (A.rotate(x, -23.0), np.asarray(pil.rotate(-23.0, Image.NEAREST)))]
  for ours, theirs in cases:
    # Equal except for rounding ties at a handful of pixels.
    assert np.mean(_u8(ours) != theirs) < 0.01


def test_rotate_90_is_exact_for_both_samplers():
  x = images(6, (1, H, W, C))[0]
  for interp in ("nearest", "bilinear"):
    np.testing.assert_allclose(np.asarray(A.rotate(x, 90.0, interpolation=interp)),
                               np.rot90(np.asarray(x)), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(A.rotate(x, 0.0)), np.asarray(x))


def test_apply_op_all_ops_keep_shape_dtype_range():
  x = images(7, (1, 16, 16, 3))[0]
  f = jax.jit(A.apply_op)
  for i, name in enumerate(A.OP_NAMES):
    for m in (0.0, 0.3, -0.3):
      y = f(x, i, m)
      assert y.shape == x.shape and y.dtype == x.dtype, name
      assert 0 <= float(y.min()) and float(y.max()) <= 1, name


def test_policy_and_magnitude_tables():
  assert len(A.CIFAR10_POLICY) == 25
  for sub in A.CIFAR10_POLICY:
    assert len(sub) == 2
    for op, p, mag in sub:
      assert op in A.OP_NAMES and 0 <= p <= 1 and (mag is None or 0 <= mag < 10)
  t = A.magnitude_table(10, 32, 32)
  row = lambda n: t[A.OP_NAMES.index(n)]
  np.testing.assert_allclose(row("Rotate")[[0, 9]], [0, 30])
  np.testing.assert_allclose(row("TranslateX")[9], 14.0)  # trunc(150/331*32)
  np.testing.assert_array_equal(row("Posterize")[[0, 9]], [8, 4])
  np.testing.assert_allclose(row("Solarize")[[0, 9]], [1, 0])
  assert A.magnitude_table(31, 32, 32)[A.OP_NAMES.index("Posterize"), 9] == 7


def test_randaugment_validation_and_identity():
  x = images(8)
  with pytest.raises(ValueError, match="magnitude"):
    A.randaugment(jax.random.key(0), x, magnitude=31)
  with pytest.raises(ValueError, match="float"):
    A.randaugment(jax.random.key(0), (x * 255).astype(jnp.uint8))
  np.testing.assert_array_equal(np.asarray(A.randaugment(jax.random.key(0), x, num_ops=0)),
                                np.asarray(x))


# ------------------------------------------------------------------ mixing

def _constant_batch(n=B, k=B):
  """Example i is the constant image (i+1)/(n+1) with label i: every pixel
  reveals which example it came from."""
  vals = (jnp.arange(n, dtype=jnp.float32) + 1) / (n + 1)
  x = jnp.broadcast_to(vals[:, None, None, None], (n, H, W, C))
  y = jax.nn.one_hot(jnp.arange(n), k, dtype=jnp.float32)
  return x, y, np.asarray(vals)


@pytest.mark.parametrize("per_example,alpha", [(False, 1.0), (True, 0.2)])
def test_mixup(per_example, alpha):
  x, y, vals = _constant_batch()
  xm, ym, lam = jax.jit(A.mixup, static_argnames=("alpha", "per_example"))(
      jax.random.key(11), x, y, alpha=alpha, per_example=per_example)
  lam, xm, ym = np.asarray(lam), np.asarray(xm), np.asarray(ym)
  assert lam.shape == (B,) and np.all((lam >= 0) & (lam <= 1))
  assert np.all((ym >= 0) & (ym <= 1 + 1e-6))
  np.testing.assert_allclose(ym.sum(1), 1.0, atol=1e-6)
  if not per_example:
    assert np.all(lam == lam[0])
  for i in range(B):
    j = int(np.argmax(np.where(np.arange(B) == i, -1, ym[i]))) if ym[i, i] < 1 - 1e-6 else i
    np.testing.assert_allclose(ym[i, i], lam[i] + (1 - lam[i]) * (j == i), atol=1e-6)
    np.testing.assert_allclose(xm[i], lam[i] * vals[i] + (1 - lam[i]) * vals[j], atol=1e-6)


@pytest.mark.parametrize("per_example", [False, True])
def test_cutmix_label_weight_is_exact_area(per_example):
  x, y, vals = _constant_batch()
  f = jax.jit(lambda k: A.cutmix(k, x, y, 0.5, per_example=per_example))
  outs = [f(jax.random.key(seed)) for seed in range(16)]
  xms, yms, lams = (np.stack([np.asarray(o[j]) for o in outs]) for j in range(3))
  assert np.all((lams >= 0) & (lams <= 1))
  np.testing.assert_allclose(yms.sum(-1), 1.0, atol=1e-6)
  if not per_example:
    assert np.all(lams == lams[:, :1])  # one box per batch
  checked = 0
  for xm, ym, lam in zip(xms, yms, lams):
    for i in range(B):
      pasted = xm[i, :, :, 0] != vals[i]
      if ym[i, i] == 1.0 and not pasted.any():
        continue  # paired with itself, or an empty box: nothing changes
      # The label weight is exactly the fraction of pixels kept (the clipped
      # box's integer area over H W), and the pasted region is one rectangle.
      assert lam[i] == np.float32(1) - np.float32(pasted.sum()) / np.float32(H * W)
      np.testing.assert_allclose(ym[i, i], lam[i], atol=1e-7)
      rows, cols = np.nonzero(pasted)
      assert len(rows) == (np.ptp(rows) + 1) * (np.ptp(cols) + 1)
      checked += 1
  assert checked > 40
  # Boxes clipped at the border occur: some pasted areas are not (2 r)^2 squares.
  assert len(set(np.round((1 - lams.ravel()) * H * W).astype(int))) > 5


def test_mixing_input_validation():
  x, y, _ = _constant_batch()
  with pytest.raises(ValueError, match="one-hot"):
    A.mixup(jax.random.key(0), x, jnp.arange(B), 1.0)
  with pytest.raises(ValueError, match="alpha"):
    A.cutmix(jax.random.key(0), x, y, 0.0)


# ------------------------------------------------------------- composition

def test_augment_spec_parsing_errors():
  assert A.parse_augment_spec(None) == ()
  assert A.parse_augment_spec("crop_flip, cutout") == (("crop_flip", ()), ("cutout", ()))
  spec = A.parse_augment_spec([("randaugment", {"magnitude": 5}),
                               {"name": "mixup", "alpha": 0.2}])
  assert spec == (("randaugment", (("magnitude", 5),)), ("mixup", (("alpha", 0.2),)))
  hash(spec)
  with pytest.raises(ValueError, match=r"'train.augment\[1\]'.*unknown augmentation"):
    A.parse_augment_spec(["crop_flip", "rotate"], field="train.augment")
  with pytest.raises(ValueError, match="unknown argument 'strength'"):
    A.parse_augment_spec([("randaugment", {"strength": 3})])


def test_augment_composition_consistent_teaching(jitted):
  x, y, _ = _constant_batch()
  x = images(9)
  spec = ("crop_flip", ("mixup", {"alpha": 1.0}))
  f = jax.jit(A.make_augment(spec))
  k = jax.random.key(42)
  xa, ya = f(k, x, y)
  xb, yb = f(k, x, y)
  np.testing.assert_array_equal(np.asarray(xa), np.asarray(xb))
  np.testing.assert_array_equal(np.asarray(ya), np.asarray(yb))
  assert xa.shape == x.shape and xa.dtype == jnp.float32
  assert 0 <= float(xa.min()) and float(xa.max()) <= 1
  np.testing.assert_allclose(np.asarray(ya).sum(1), 1.0, atol=1e-6)
  # The same view from the functional form, and op i draws from fold_in(key, i).
  x1 = jax.jit(lambda kk, xx: A.augment(kk, xx, ["flip"]))(k, x)
  np.testing.assert_array_equal(
      np.asarray(x1), np.asarray(jitted["flip"](jax.random.fold_in(k, 0), x)))
  with pytest.raises(ValueError, match="labels"):
    A.augment(k, x, ["mixup"])
