"""Specialization between image models, the PCA data subspace of an image
data set, off-subspace noise and the image off-subspace method (issue 12).

References: ``np.corrcoef`` on activations computed directly with
``model.apply``, ``np.linalg.svd`` of the centred data, and losses written
out by hand.
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tsjax import config_checks as cc
from tsjax import methods, models
from tsjax.data import images as image_data
from tsjax.data import subspace
from tsjax.methods import kd, offsubspace
from tsjax.methods.distill import teacher_ctx
from tsjax.metrics import image_specialization as isp
from tsjax.metrics import specialization as spec

HAVE_FMNIST = os.path.isdir(image_data.DEFAULT_FASHION_MNIST_DIR)
needs_fmnist = pytest.mark.skipif(
    not HAVE_FMNIST, reason=f"needs `{image_data.FASHION_MNIST_APT}`")


# ----------------------------------------------------------------- helpers
@functools.lru_cache(maxsize=None)
def small_pair():
  """A small CNN teacher and three 2x wider students (3 hidden layers each:
  conv [4x4], conv [2x2], dense on 8x8 images); seeds with few dead units."""
  norm = dict(mean=(0.5,), std=(0.25,))   # centred inputs
  teacher = models.get_model("small_cnn", num_classes=3, features=(3, 4),
                             hidden=5, **norm)
  student = models.get_model("small_cnn", num_classes=3, features=(6, 8),
                             hidden=10, **norm)
  tv = init(teacher, 1, (8, 8, 1))
  # The students in one vmapped init (one compilation), then unstacked.
  stacked = jax.jit(jax.vmap(lambda k: student.init(
      k, jnp.zeros((1, 8, 8, 1), jnp.float32))))(
          jnp.stack([jax.random.key(i) for i in (2, 3, 4)]))
  svs = tuple(jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(3))
  return teacher, tv, student, svs


def init(model, seed, shape):
  """Jitted init: one compilation instead of many op-by-op dispatches."""
  return jax.jit(lambda k: model.init(k, jnp.zeros((1, *shape), jnp.float32),
                                      train=False))(jax.random.key(seed))


@functools.lru_cache(maxsize=None)
def jitted_hiddens(model):
  return jax.jit(lambda v, x: model.apply(v, x, train=False,
                                          return_hidden=True)[1])


def images(n, hw=8, c=1, seed=0):
  """Varied images in [0, 1]: brightness, a gradient and pixel noise."""
  rng = np.random.default_rng(seed)
  bright = rng.random((n, 1, 1, c))
  ramp = (rng.normal(size=(n, 1, 1, c))
          * np.linspace(-1, 1, hw)[None, :, None, None])
  return np.clip(bright + 0.5 * ramp + 0.3 * rng.normal(size=(n, hw, hw, c)),
                 0, 1).astype(np.float32)


def direct_samples(model, variables, x, mode):
  """Every hidden layer as [samples, units], from one direct apply."""
  hs = jitted_hiddens(model)(variables, jnp.asarray(x))
  out = []
  for h in hs:
    h = np.asarray(h, np.float64)
    if h.ndim == 4:
      h = h.reshape(-1, h.shape[-1]) if mode == "positions" else h.mean((1, 2))
    out.append(h)
  return out


def corrcoef(t, s):
  m = t.shape[1]
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.corrcoef(t.T, s.T)[:m, m:]


def host(stats):
  """Stacked CorrStats -> (NumPy stats, the [S, m, n] correlations)."""
  return (jax.tree.map(np.asarray, stats),
          np.asarray(jax.vmap(spec.corr_finalize)(stats)))


def assert_corr_close(C, t, s, atol=1e-6, min_var=1e-6):
  """``C`` equals ``np.corrcoef`` of the activations ``t [N, m]``, ``s [N,
  n]`` for units that vary (float32 activations of a nearly constant unit
  have no meaningful correlation); units that never vary get 0."""
  C, ref = np.asarray(C), corrcoef(t, s)
  vt, vs = t.var(0), s.var(0)
  alive_t, alive_s = vt > min_var, vs > min_var
  assert alive_t.sum() >= 2 and alive_s.sum() >= 2   # not vacuous
  np.testing.assert_allclose(C[np.ix_(alive_t, alive_s)],
                             ref[np.ix_(alive_t, alive_s)], atol=atol)
  np.testing.assert_allclose(C[vt == 0], 0.0, atol=1e-6)
  np.testing.assert_allclose(C[:, vs == 0], 0.0, atol=1e-6)


# --------------------------------------------------- correlation vs NumPy
@pytest.mark.parametrize("mode", ["positions", "pooled"])
def test_image_correlations_match_corrcoef(mode):
  """Conv layers per channel (both sample modes) and the dense layer, for
  three vmapped students, streamed in uneven batches (23 = 4 x 5 + 3)."""
  teacher, tv, student, svs = small_pair()
  x = images(23)
  stats = isp.image_correlations(teacher, tv, student,
                                 isp.stack_variables(svs), x, batch_size=5,
                                 conv_samples=mode, dtype=jnp.float64)
  assert len(stats) == 3
  stats = [host(st) for st in stats]
  t_acts = direct_samples(teacher, tv, x, mode)
  for s, sv in enumerate(svs):
    s_acts = direct_samples(student, sv, x, mode)
    for layer, ((st, C), ta, sa) in enumerate(zip(stats, t_acts, s_acts)):
      assert int(st.count[s]) == ta.shape[0]
      if mode == "positions" and layer < 2:
        assert ta.shape[0] == 23 * (8 // 2 ** (layer + 1)) ** 2
      else:
        assert ta.shape[0] == 23
      np.testing.assert_allclose(st.mean_t[s], ta.mean(0), atol=1e-6)
      assert_corr_close(C[s], ta, sa)


def test_vmapped_students_equal_one_at_a_time_and_uint8_equals_float():
  teacher, tv, student, svs = small_pair()
  x8 = (images(17, seed=1) * 255).round().astype(np.uint8)
  together = isp.image_correlations(teacher, tv, student,
                                    isp.stack_variables(svs), x8, batch_size=6)
  together = [host(st)[1] for st in together]
  for s, sv in enumerate(svs):
    alone = isp.image_correlations(teacher, tv, student,
                                   isp.stack_variables([sv]),
                                   x8.astype(np.float32) / 255.0, batch_size=4)
    for a, b in zip(together, alone):
      np.testing.assert_allclose(a[s], host(b)[1][0], atol=2e-5)


def test_per_student_images_equal_looping():
  """Each student on its own images (e.g. its own adversarial examples)."""
  teacher, tv, student, svs = small_pair()
  xs = np.stack([images(9, seed=s) for s in range(3)])
  got = isp.image_correlations(teacher, tv, student, isp.stack_variables(svs),
                               xs, batch_size=4, per_student_images=True,
                               dtype=jnp.float64)
  got = [host(st)[1] for st in got]
  for s, sv in enumerate(svs):
    t_acts = direct_samples(teacher, tv, xs[s], "positions")
    s_acts = direct_samples(student, sv, xs[s], "positions")
    for C, ta, sa in zip(got, t_acts, s_acts):
      assert_corr_close(C[s], ta, sa)
  with pytest.raises(ValueError, match="per_student_images"):
    isp.image_correlations(teacher, tv, student, isp.stack_variables(svs),
                           xs[:2], per_student_images=True)


def test_image_specialization_summaries():
  """Summaries per layer, vmapped over students; a copy of the teacher is
  perfectly specialised (best match 1, at its own unit)."""
  teacher, tv, student, svs = small_pair()
  x = images(20, seed=2)
  out = isp.image_specialization(teacher, tv, student,
                                 isp.stack_variables(svs), x, batch_size=8,
                                 thresholds=(0.5, 0.9), return_corr=True,
                                 dtype=jnp.float64)
  assert [o["kind"] for o in out] == ["conv", "conv", "dense"]
  assert [(o["teacher_units"], o["student_units"]) for o in out] == [
      (3, 6), (4, 8), (5, 10)]
  assert [o["samples"] for o in out] == [20 * 16, 20 * 4, 20]
  t_acts = direct_samples(teacher, tv, x, "positions")
  for layer, o in enumerate(out):
    assert o["mean_best"].shape == (3,)
    assert o["success"].shape == (3, 2, o["teacher_units"])
    active = t_acts[layer].var(0) > 1e-12
    for s, sv in enumerate(svs):
      ref = np.nan_to_num(corrcoef(t_acts[layer], direct_samples(
          student, sv, x, "positions")[layer]))
      best = ref.max(1)
      np.testing.assert_allclose(o["best_corr"][s], best, atol=1e-6)
      np.testing.assert_allclose(o["mean_best"][s], best[active].mean(),
                                 atol=1e-6)
      assert int(o["num_active"][s]) == active.sum()
  # The teacher against itself (S = 2 copies).
  same = isp.image_specialization(teacher, tv, teacher,
                                  isp.stack_variables([tv, tv]), x,
                                  batch_size=8)
  for o in same:
    act = np.asarray(o["num_active"][0], int)
    assert act >= 1
    np.testing.assert_allclose(o["mean_best"], 1.0, atol=1e-4)
    idx = np.asarray(o["best_index"][0])
    alive = np.asarray(o["best_corr"][0]) > 0.99
    np.testing.assert_array_equal(idx[alive], np.arange(len(idx))[alive])


@pytest.mark.slow   # ~15 s of CPU, most of it compiling the WRN
def test_batch_norm_model_in_eval_mode():
  """A model with batch statistics (WRN-10-1): eval mode, conv and dense
  layers against NumPy."""
  t = models.get_model("wide_resnet", depth=10, widen_factor=1, num_classes=3)
  s = models.get_model("wide_resnet", depth=10, widen_factor=2, num_classes=3)
  x = images(12, hw=8, c=3, seed=3)
  tv = init(t, 0, (8, 8, 3))
  sv = dict(init(s, 1, (8, 8, 3)))
  # Non-trivial running statistics (means shifted), so eval mode differs
  # from train mode.
  sv["batch_stats"] = jax.tree_util.tree_map_with_path(
      lambda p, a: a - 0.1 if p[-1].key == "mean" else a, sv["batch_stats"])
  got = isp.image_correlations(t, tv, s, isp.stack_variables([sv]), x,
                               batch_size=5, layers=[0, (3, 3)],
                               dtype=jnp.float64)
  ta = direct_samples(t, tv, x, "positions")
  sa = direct_samples(s, sv, x, "positions")
  for st, (i, j) in zip(got, [(0, 0), (3, 3)]):
    assert_corr_close(host(st)[1][0], ta[i], sa[j], atol=1e-5)


def test_layer_pairing_errors_and_pooled_across_resolutions():
  teacher, tv, student, svs = small_pair()
  x = images(6)
  stacked = isp.stack_variables(svs[:1])
  # Conv layer 0 (4x4) against conv layer 1 (2x2): positions need equal
  # sizes, pooled does not.
  with pytest.raises(ValueError, match="spatial sizes"):
    isp.image_correlations(teacher, tv, student, stacked, x, layers=[(0, 1)])
  st = isp.image_correlations(teacher, tv, student, stacked, x,
                              layers=[(0, 1)], conv_samples="pooled")
  assert st[0].cross.shape == (1, 3, 8)
  # A model with list fields (unhashable, as a command-line override can
  # build it) is jitted per call instead of cached: same numbers.
  listed = models.get_model("small_cnn", num_classes=3, features=[3, 4],
                            hidden=5, mean=(0.5,), std=(0.25,))
  st2 = isp.image_correlations(listed, tv, student, stacked, x,
                               layers=[(0, 1)], conv_samples="pooled")
  np.testing.assert_allclose(st2[0].cross, st[0].cross, rtol=1e-6)
  with pytest.raises(ValueError, match="not of one kind"):
    isp.image_correlations(teacher, tv, student, stacked, x, layers=[(0, 2)])
  with pytest.raises(ValueError, match="out of range"):
    isp.image_correlations(teacher, tv, student, stacked, x, layers=[5])
  with pytest.raises(ValueError, match="conv_samples"):
    isp.image_correlations(teacher, tv, student, stacked, x,
                           conv_samples="mean")
  mlp_like = models.get_model("small_cnn", num_classes=3, features=(4,),
                              hidden=5, mean=(0.5,), std=(0.25,))
  mv = init(mlp_like, 5, (8, 8, 1))
  with pytest.raises(ValueError, match="hidden layers"):
    isp.image_correlations(teacher, tv, mlp_like, isp.stack_variables([mv]), x)
  with pytest.raises(ValueError, match="stacked"):
    bad = {"params": {"a": jnp.zeros((2, 3)), "b": jnp.zeros((3, 3))}}
    isp.image_correlations(teacher, tv, student, bad, x)


# ------------------------------------------------------------ PCA subspace
def lowrank_images(n=300, hw=6, k=4, seed=0):
  rng = np.random.default_rng(seed)
  d = hw * hw
  basis = np.linalg.qr(rng.normal(size=(d, k)))[0]
  z = rng.normal(size=(n, k)) * np.array([3.0, 2.0, 1.5, 1.0])[:k]
  x = 0.5 + 0.05 * (z @ basis.T + 0.05 * rng.normal(size=(n, d)))
  return x.reshape(n, hw, hw, 1)


@pytest.mark.parametrize("dtype,tol", [(jnp.float64, 1e-10),
                                       (jnp.float32, 2e-4)])
def test_pca_subspace_matches_numpy_svd(dtype, tol):
  x = lowrank_images()
  n = len(x)
  flat = x.reshape(n, -1).astype(np.float64)
  centred = flat - flat.mean(0)
  _, sv, vt = np.linalg.svd(centred, full_matrices=False)
  var = sv ** 2 / (n - 1)
  sub = subspace.pca_subspace(x, k=4, batch_size=64, dtype=dtype)
  assert sub.U.shape == (36, 4) and sub.count == n and sub.k == 4
  np.testing.assert_allclose(sub.mean, flat.mean(0), atol=tol)
  np.testing.assert_allclose(sub.variances[:len(var)], var,
                             atol=tol * var[0])
  U = np.asarray(sub.U, np.float64)
  np.testing.assert_allclose(U.T @ U, np.eye(4), atol=tol * 10)
  # Same subspace (projectors) and, column by column, the same directions
  # up to sign.
  np.testing.assert_allclose(U @ U.T, vt[:4].T @ vt[:4], atol=tol * 100)
  np.testing.assert_allclose(np.abs(np.sum(U * vt[:4].T, 0)), 1.0,
                             atol=tol * 100)
  assert sub.explained == pytest.approx(var[:4].sum() / var.sum(), rel=tol * 10)
  # k by explained variance: the smallest k reaching the fraction.
  ratio = np.cumsum(var) / var.sum()
  for frac in (0.5, 0.9, 0.999, 1.0):
    want = int(np.argmax(ratio >= frac - 1e-12)) + 1
    got = subspace.pca_subspace(x, variance=frac, batch_size=64, dtype=dtype)
    if dtype == jnp.float64 or abs(ratio[want - 1] - frac) > 1e-4:
      assert got.k == want, (frac, got.k, want)


def test_pca_subspace_uint8_and_errors():
  rng = np.random.default_rng(1)
  x8 = rng.integers(0, 256, (50, 4, 4, 2), dtype=np.uint8)
  a = subspace.pca_subspace(x8, k=3, batch_size=7, dtype=jnp.float64)
  b = subspace.pca_subspace(x8.astype(np.float64) / 255.0, k=3, batch_size=50,
                            dtype=jnp.float64)
  np.testing.assert_allclose(a.U @ a.U.T, b.U @ b.U.T, atol=1e-10)
  np.testing.assert_allclose(a.variances, b.variances, atol=1e-12)
  assert subspace.pca_subspace(x8, k=3, max_examples=20).count == 20
  with pytest.raises(ValueError, match="k must be"):
    subspace.pca_subspace(x8, k=33)
  with pytest.raises(ValueError, match=r"\(0, 1\]"):
    subspace.pca_subspace(x8, variance=1.5)
  with pytest.raises(ValueError, match="at least 2"):
    subspace.pca_subspace(x8[:1], k=1)


@needs_fmnist
def test_pca_subspace_of_fashion_mnist_matches_numpy():
  x = image_data.load_fashion_mnist("train").images[:1000]
  sub = subspace.pca_subspace(x, variance=0.9, dtype=jnp.float64)
  flat = x.reshape(len(x), -1).astype(np.float64) / 255.0
  _, sv, vt = np.linalg.svd(flat - flat.mean(0), full_matrices=False)
  var = sv ** 2 / (len(x) - 1)
  want = int(np.argmax(np.cumsum(var) / var.sum() >= 0.9)) + 1
  assert sub.k == want and 30 < want < 200
  U = np.asarray(sub.U)
  np.testing.assert_allclose(U @ U.T, vt[:want].T @ vt[:want], atol=1e-8)


# --------------------------------------------------------- off-subspace noise
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_off_subspace_noise_is_orthogonal_with_the_radius(norm):
  x = jnp.asarray(lowrank_images(n=64))
  sub = subspace.pca_subspace(x, k=4, dtype=jnp.float64)
  radius = jnp.linspace(0.05, 0.5, 64)          # per-example radii
  moved = subspace.off_subspace_noise(jax.random.key(0), x, sub.U, radius,
                                      norm)
  delta = np.asarray(moved - x).reshape(64, -1)
  # Orthogonal to the subspace: U^T delta = 0.
  np.testing.assert_allclose(delta @ np.asarray(sub.U), 0.0, atol=1e-12)
  got = (np.abs(delta).max(1) if norm == "linf"
         else np.linalg.norm(delta, axis=1))
  np.testing.assert_allclose(got, radius, rtol=1e-12)
  # Projections split any input.
  np.testing.assert_allclose(subspace.project_in(x, sub.U)
                             + subspace.project_out(x, sub.U), x, atol=1e-12)
  np.testing.assert_allclose(subspace.project_in(moved - x, sub.U), 0.0,
                             atol=1e-12)
  # A fresh key gives another direction; clipping keeps images in the box.
  other = subspace.off_subspace_noise(jax.random.key(1), x, sub.U, 0.3, norm)
  assert not np.allclose(other, moved)
  clipped = subspace.off_subspace_noise(jax.random.key(0), x, sub.U, 3.0, norm,
                                        bounds=(0.0, 1.0))
  assert float(clipped.min()) >= 0.0 and float(clipped.max()) <= 1.0
  with pytest.raises(ValueError, match="norm"):
    subspace.off_subspace_noise(jax.random.key(0), x, sub.U, 0.1, "l1")


# --------------------------------------------- the image off-subspace method
def method_setup(b=8):
  model = models.get_model("small_cnn", num_classes=3, features=(4, 8),
                           hidden=8)
  x = jnp.asarray(images(b, seed=4))
  y = jnp.arange(b) % 3
  params = init(model, 0, (8, 8, 1))["params"]
  U = subspace.pca_subspace(images(200, seed=5), k=6, dtype=jnp.float32).U
  return model, params, {"image": x, "label": y}, U


def direct_move(key, x, U, radius, norm, n_move):
  """The moved batch written out: the first n_move examples get
  radius * P_perp xi / ||P_perp xi||."""
  xi = np.asarray(jax.random.normal(key, x.shape, x.dtype), np.float64)
  f = xi.reshape(len(x), -1)
  U64 = np.asarray(U, np.float64)
  perp = f - f @ U64 @ U64.T
  n = (np.abs(perp).max(1) if norm == "linf" else np.linalg.norm(perp, axis=1))
  delta = (radius * perp / n[:, None]).reshape(x.shape)
  out = np.asarray(x, np.float64).copy()
  out[:n_move] += delta[:n_move]
  return out


@pytest.mark.parametrize("norm,fraction,n_move", [("linf", 0.5, 4),
                                                  ("l2", 0.25, 2)])
def test_offsubspace_loss_equals_direct_computation(norm, fraction, n_move):
  model, params, batch, U = method_setup()
  opts = offsubspace.Options(fraction=fraction, norm=norm, radius=0.2)
  loss_fn = jax.jit(methods.get("offsubspace").make_loss(
      model, teacher=None, attack=None, options=opts))
  key = jax.random.key(3)
  loss, (metrics, state) = loss_fn(params, {}, batch, key,
                                   offsubspace.subspace_ctx(U))
  k_move, _ = jax.random.split(key)
  x_ref = direct_move(k_move, batch["image"], U, 0.2, norm, n_move)
  # The unmoved half is untouched, the moved half is off the subspace.
  moved = offsubspace.move_off_subspace(k_move, batch["image"], U, opts)
  np.testing.assert_allclose(moved, x_ref, atol=1e-5)
  np.testing.assert_array_equal(moved[n_move:], batch["image"][n_move:])
  logits = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(
      x_ref, jnp.float32)), np.float64)
  logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  want = -np.mean(logp[np.arange(8), np.asarray(batch["label"])])
  assert float(loss) == pytest.approx(want, rel=1e-5)
  assert float(metrics["loss"]) == pytest.approx(float(loss))
  assert state == {}


def test_offsubspace_wraps_a_distillation_loss():
  """with_offsubspace before KD: KD's loss at the moved batch, the teacher
  and the basis side by side in ctx."""
  model, params, batch, U = method_setup()
  teacher = models.get_model("small_cnn", num_classes=3, features=(4, 8),
                             hidden=8)
  tparams = init(teacher, 9, (8, 8, 1))["params"]
  ctx = {**teacher_ctx(tparams), **offsubspace.subspace_ctx(U)}
  opts = offsubspace.Options(radius=0.1)
  kd_loss = kd.make_loss(model, teacher=teacher, options=kd.Options())
  wrapped = offsubspace.with_offsubspace(kd_loss, opts)
  key = jax.random.key(4)
  got, _ = jax.jit(wrapped)(params, {}, batch, key, ctx)
  k_move, k_loss = jax.random.split(key)
  x_ref = direct_move(k_move, batch["image"], U, 0.1, "linf", 4)
  kd_jit = jax.jit(kd_loss)
  want, _ = kd_jit(params, {}, {**batch, "image": jnp.asarray(
      x_ref, jnp.float32)}, k_loss, ctx)
  assert float(got) == pytest.approx(float(want), rel=1e-5)
  plain, _ = kd_jit(params, {}, batch, k_loss, ctx)
  assert float(plain) != pytest.approx(float(got), rel=1e-6)
  with pytest.raises(ValueError, match="subspace"):
    wrapped(params, {}, batch, key, teacher_ctx(tparams))


def test_offsubspace_options_and_registry():
  m = methods.get("offsubspace")
  assert m.init_ctx is offsubspace.init_ctx and not m.needs_teacher
  assert not m.uses_attack
  for field, bad in (("fraction", 1.5), ("norm", "l1"), ("radius", -0.1),
                     ("variance", 0.0), ("k", 2.5), ("clip", 1),
                     ("pca_examples", -1)):
    with pytest.raises(cc.ConfigError, match=rf"method\.options\.{field}"):
      m.build_options({field: bad})
  ctx = m.init_ctx((images(40) * 255).astype(np.uint8),
                   m.build_options({"k": 5}))
  assert ctx[offsubspace.SUBSPACE].shape == (64, 5)
  # fraction 0 leaves the batch alone.
  x = jnp.asarray(images(4))
  np.testing.assert_array_equal(offsubspace.move_off_subspace(
      jax.random.key(0), x, ctx["subspace"], offsubspace.Options(fraction=0.0)),
      x)


def test_configs_offsubspace_variants():
  from experiments import train as exp
  from tsjax.configs import adv_train
  c = adv_train.get_config("fashion_mnist,offsubspace")
  assert c.method.name == "offsubspace"
  assert c.method.options.radius == c.eval.eps == 0.1
  c.eval.eps = 0.2          # the radius follows the evaluation attack
  assert exp.methods.get("offsubspace").build_options(
      c.method.options).radius == 0.2
  exp.validate(c)
  assert "offsubspace" not in adv_train.get_config("fashion_mnist,pgd_at")
  c = adv_train.get_config("fashion_mnist,pgd_at,offsubspace_aug,smoke")
  assert exp.offsubspace_options(c).fraction == 0.5
  exp.validate(c)
  c.offsubspace.norm = "l3"
  with pytest.raises(cc.ConfigError, match=r"offsubspace\.norm"):
    exp.validate(c)
  with pytest.raises(ValueError, match="several methods"):
    adv_train.get_config("fashion_mnist,rslad,kd")
  with pytest.raises(ValueError, match="offsubspace_aug"):
    adv_train.get_config("fashion_mnist,offsubspace,offsubspace_aug")


@needs_fmnist
def test_offsubspace_ctx_and_loss_through_experiments_train():
  """experiments.train builds the basis from the training split (method
  hook, and the generic section for another method) and wraps the loss."""
  from experiments import train as exp
  from tsjax.configs import adv_train
  c = adv_train.get_config("fashion_mnist,offsubspace,smoke")
  c.data.train_subset, c.data.num_val = 300, 50
  train, _, _ = exp.load_data(c)
  ref = subspace.pca_subspace(train.images, variance=0.9)
  batch = {"image": jnp.asarray(train.images[:16], jnp.float32) / 255.0,
           "label": jnp.asarray(train.labels[:16])}
  got = {}
  for variant in ("fashion_mnist,offsubspace,smoke",
                  "fashion_mnist,standard,offsubspace_aug,smoke"):
    c = adv_train.get_config(variant)
    c.data.train_subset, c.data.num_val = 300, 50
    model = exp.make_model(c, train)
    built = exp.build(c, model, train, jax.random.key(0))
    U = built.ctx[offsubspace.SUBSPACE]
    assert U.shape == ref.U.shape and U.shape[0] == 784
    np.testing.assert_allclose(U @ U.T, ref.U @ ref.U.T, atol=1e-5)
    got[variant] = jax.jit(built.loss_fn)(built.params, built.model_state,
                                          batch, jax.random.key(1), built.ctx)[0]
  # The method and "standard + the offsubspace section" are one loss: CE at
  # the moved batch (same network initialisation, same key).
  a, b = got.values()
  assert np.isfinite(float(a)) and float(a) == pytest.approx(float(b),
                                                             rel=1e-6)


@pytest.mark.slow
@needs_fmnist
def test_offsubspace_method_trains_end_to_end(tmp_path):
  from experiments import train as exp
  from tsjax.configs import adv_train
  c = adv_train.get_config("fashion_mnist,offsubspace,smoke")
  c.data.train_subset, c.data.num_val, c.data.test_subset = 160, 32, 64
  c.train.epochs, c.train.boundaries, c.train.log_every = 1, (), 1
  c.eval.val_subset, c.eval.pgd_steps = 32, 1
  out = exp.run(c, str(tmp_path), progress=False)
  assert out["summary"]["method"] == "offsubspace"
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert any("train/loss" in r for r in rows)
  assert 0.0 <= out["summary"]["results"]["last"]["clean_acc"] <= 1.0
