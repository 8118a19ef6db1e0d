"""Losses against NumPy; CCAT's transition; PGD-AT and off-subspace losses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tsjax import losses
from tsjax.data import synthetic
from tsjax.methods import ccat, offsubspace, pgd_at
from tsjax.methods.teacher_student import (Networks, regression_loss,
                                           ts_attack, worst_case_inputs)
from tsjax.models import MLP


def _np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.fixture
def logits():
  rng = np.random.default_rng(0)
  return rng.normal(size=(5, 4)) * 2, rng.normal(size=(5, 4)) * 2


def test_squared_error_and_mse():
  rng = np.random.default_rng(1)
  p, t = rng.normal(size=(6, 3, 2)), rng.normal(size=(6, 3, 2))
  ref = 0.5 * ((p - t) ** 2).reshape(6, -1).sum(1)
  np.testing.assert_allclose(losses.squared_error(p, t), ref, rtol=1e-12)
  np.testing.assert_allclose(losses.mean_squared_error(p, t),
                             ((p - t) ** 2).reshape(6, -1).mean(1), rtol=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kl_reductions(logits, temperature):
  a, b = logits
  lp = _np_log_softmax(a / temperature)
  lq = _np_log_softmax(b / temperature)
  elem = np.exp(lp) * (lp - lq)
  B, C = a.shape
  kw = dict(temperature=temperature)
  np.testing.assert_allclose(losses.kl(a, b, reduction="none", **kw),
                             elem.sum(1), rtol=1e-12)
  np.testing.assert_allclose(losses.kl(a, b, reduction="sum", **kw),
                             elem.sum(), rtol=1e-12)
  np.testing.assert_allclose(losses.kl(a, b, reduction="batchmean", **kw),
                             elem.sum() / B, rtol=1e-12)
  np.testing.assert_allclose(losses.kl(a, b, **kw), elem.sum() / B, rtol=1e-12)
  # PyTorch nn.KLDivLoss() default: element-wise mean, i.e. / (B * C).
  np.testing.assert_allclose(losses.kl(a, b, reduction="mean", **kw),
                             elem.sum() / (B * C), rtol=1e-12)
  assert np.all(np.asarray(losses.kl(a, b, reduction="none", **kw)) >= 0)
  np.testing.assert_allclose(losses.kl(a, a, reduction="none"), 0.0, atol=1e-14)
  with pytest.raises(ValueError, match="reduction"):
    losses.kl(a, b, reduction="avg")


def test_cross_entropy_int_and_soft_labels(logits):
  z, _ = logits
  labels = np.array([0, 3, 1, 1, 2])
  lp = _np_log_softmax(z)
  np.testing.assert_allclose(losses.cross_entropy(z, jnp.asarray(labels)),
                             -lp[np.arange(5), labels], rtol=1e-12)
  rng = np.random.default_rng(2)
  probs = rng.dirichlet(np.ones(4), size=5)
  np.testing.assert_allclose(losses.cross_entropy(z, probs),
                             -(probs * lp).sum(1), rtol=1e-12)
  # one-hot probabilities equal integer labels
  np.testing.assert_allclose(losses.cross_entropy(z, np.eye(4)[labels]),
                             losses.cross_entropy(z, jnp.asarray(labels)),
                             rtol=1e-12)


def test_margin(logits):
  z, _ = logits
  labels = np.array([0, 3, 1, 1, 2])
  ref = []
  for row, y in zip(z, labels):
    ref.append(np.delete(row, y).max() - row[y])
  np.testing.assert_allclose(losses.margin(z, jnp.asarray(labels)), ref,
                             rtol=1e-12)
  mis = np.asarray(losses.margin(z, jnp.asarray(labels))) > 0
  np.testing.assert_array_equal(mis, z.argmax(1) != labels)


def test_ccat_lambda_power_transition():
  eps = 2.0
  r = np.array([0.0, 0.1, 0.5, 1.0, 2.0])
  lam = np.asarray(ccat.ccat_lambda(jnp.asarray(r * eps), eps, 10.0))
  np.testing.assert_allclose(lam, [0.0, 0.6513, 0.99902, 1.0, 1.0], atol=1e-4)
  np.testing.assert_allclose(lam, 1 - (1 - np.minimum(r, 1)) ** 10, rtol=1e-12)
  # Per-example eps.
  np.testing.assert_allclose(
      ccat.ccat_lambda(jnp.asarray([0.5, 0.5]), jnp.asarray([1.0, 5.0]), 2.0),
      [0.75, 0.19], rtol=1e-12)


def test_ccat_lambda_zero_radius_is_finite():
  """eps = 0 is a valid config (``adv.eps_frac >= 0``): no perturbation, so
  the weight of the uninformative target must be 0, not 0/0 = NaN (a NaN
  here makes every CCAT step non-finite, so every step is skipped)."""
  lam = np.asarray(ccat.ccat_lambda(jnp.zeros(3), 0.0, 10.0))
  assert np.all(np.isfinite(lam)), lam
  np.testing.assert_array_equal(lam, 0.0)


# --------------------------------------------------------------- TS methods
D, K, M, C = 6, 2, 3, 2


NETS = Networks(teacher=MLP((M,), C, param_dtype=jnp.float64),
                student=MLP((2 * M,), C, init_std=0.3, param_dtype=jnp.float64))


@jax.jit
def _build_tiny_problem(key):
  dt = jnp.float64
  ku, kx, kt, ks = jax.random.split(key, 4)
  U = synthetic.make_subspace(ku, D, K, dt)
  x = synthetic.sample_lowrank(kx, U, 8, 1.0)
  teacher = synthetic.make_teacher(kt, D, (M,), C, bias=0.05, dtype=dt)
  params = NETS.student.init(ks, jnp.zeros((1, D), dt))["params"]
  ctx = {"teacher": teacher, "U": U,
         "y_mean": jnp.mean(NETS.teacher.apply(teacher, x), axis=0)}
  return params, ctx, x


@pytest.fixture(scope="module")
def tiny_problem():
  params, ctx, x = _build_tiny_problem(jax.random.key(0))
  return NETS, params, ctx, x


def test_pgd_at_gradient_ignores_the_attack(tiny_problem):
  nets, params, ctx, x = tiny_problem
  att = ts_attack("l2", eps=0.8, step_size=0.4, steps=3)
  key = jax.random.key(7)
  loss_fn = pgd_at.make_ts_loss(nets, att)

  grads = jax.jit(jax.grad(
      lambda p: loss_fn(p, {}, {"x": x}, key, ctx)[0]))(params)
  x_adv = jax.jit(lambda p: worst_case_inputs(nets, p, ctx, x, key, att))(
      params)
  assert float(jnp.linalg.norm(x_adv - x)) > 0.1  # the attack moved
  ref = jax.jit(jax.grad(lambda p: regression_loss(nets, p, ctx, x_adv)))(
      params)
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref)):
    np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-14)

  # The check can fail: differentiating *through* the attack (no
  # stop_gradient on the student parameters inside it) gives another gradient.
  from tsjax.attacks import pgd
  from tsjax.methods.teacher_student import disagreement

  def through(p):
    xa = pgd(disagreement(nets, p, ctx), x, key, eps=att.eps,
             step_size=att.step_size, steps=att.steps, norm=att.norm,
             U=ctx["U"])
    return regression_loss(nets, p, ctx, xa)

  # ts_attack is the study's PGD: uniform start, no box, best iterate kept
  # (pgd's defaults), the student held fixed.
  assert (att.start, att.bounds, att.keep_best) == ("uniform", None, True)
  np.testing.assert_array_equal(
      x_adv, jax.jit(lambda: pgd(disagreement(nets, params, ctx), x, key,
                                 eps=att.eps, step_size=att.step_size,
                                 steps=att.steps, norm=att.norm,
                                 U=ctx["U"]))())
  g_through = jax.jit(jax.grad(through))(params)
  diff = max(float(jnp.abs(a - b).max()) for a, b in
             zip(jax.tree.leaves(g_through), jax.tree.leaves(ref)))
  assert diff > 1e-6


class _RecordingNets:
  """Networks stand-in that records the inputs the loss evaluates."""

  def __init__(self, nets):
    self.nets, self.seen = nets, []

  def teacher_out(self, ctx, x):
    self.seen.append(np.asarray(x))
    return self.nets.teacher_out(ctx, x)

  def student_out(self, params, x):
    self.seen.append(np.asarray(x))
    return self.nets.student_out(params, x)

  def outputs(self, params, ctx, x):
    self.seen.append(np.asarray(x))
    return self.nets.outputs(params, ctx, x)


def test_offsubspace_moves_inputs_only_off_span(tiny_problem):
  nets, params, ctx, _ = tiny_problem
  U = np.asarray(ctx["U"])
  x = synthetic.sample_lowrank(jax.random.key(4), ctx["U"], 400, 1.0)
  rec = _RecordingNets(nets)
  scale = 0.7
  loss_fn = offsubspace.make_ts_loss(rec, scale=scale, fraction=0.5)
  loss, (metrics, _) = loss_fn(params, {}, {"x": x}, jax.random.key(9), ctx)
  assert rec.seen, "loss evaluated no inputs"
  x_aug = rec.seen[0]
  for s in rec.seen:  # teacher and student see the same augmented inputs
    np.testing.assert_array_equal(s, x_aug)
  delta = x_aug - np.asarray(x)
  # Only the orthogonal complement changes ...
  np.testing.assert_allclose(delta @ U, 0.0, atol=1e-12)
  moved = np.linalg.norm(delta, axis=1) > 0
  # ... for about `fraction` of the rows, by scale * N(0, P_perp).
  assert 0.4 < moved.mean() < 0.6
  np.testing.assert_allclose((delta[moved] ** 2).sum(1).mean(),
                             scale ** 2 * (D - K), rtol=0.15)
  np.testing.assert_array_equal(delta[~moved], 0.0)
  # The loss is the regression loss at the augmented inputs.
  np.testing.assert_allclose(
      loss, regression_loss(nets, params, ctx, jnp.asarray(x_aug)), rtol=1e-12)
  np.testing.assert_allclose(metrics["loss"], loss)


def test_ccat_loss_targets(tiny_problem):
  nets, params, ctx, x = tiny_problem
  att = ts_attack("l2", eps=0.8, step_size=0.4, steps=3)
  key = jax.random.key(5)
  rho = 10.0
  loss, (metrics, _) = ccat.make_ts_loss(nets, att, rho=rho)(
      params, {}, {"x": x}, key, ctx)
  x_clean, x_rest = x[:4], x[4:]
  x_adv = worst_case_inputs(nets, params, ctx, x_rest, key, att)
  r = np.linalg.norm(np.asarray(x_adv - x_rest), axis=1) / att.eps
  lam = 1 - (1 - np.minimum(r, 1)) ** rho
  t_adv = np.asarray(nets.teacher_out(ctx, x_adv))
  target = (1 - lam)[:, None] * t_adv + lam[:, None] * np.asarray(ctx["y_mean"])
  s_adv = np.asarray(nets.student_out(params, x_adv))
  s_clean = np.asarray(nets.student_out(params, x_clean))
  t_clean = np.asarray(nets.teacher_out(ctx, x_clean))
  ref = (0.5 * np.mean(0.5 * ((s_clean - t_clean) ** 2).sum(1))
         + 0.5 * np.mean(0.5 * ((s_adv - target) ** 2).sum(1)))
  np.testing.assert_allclose(loss, ref, rtol=1e-10)
  np.testing.assert_allclose(metrics["lambda"], lam.mean(), rtol=1e-10)


def test_ccat_loss_finite_at_zero_radius(tiny_problem):
  """With eps = 0 CCAT is plain regression on the clean batch (lambda = 0)."""
  nets, params, ctx, x = tiny_problem
  att = ts_attack("l2", eps=0.0, step_size=0.0, steps=2)
  loss, _ = ccat.make_ts_loss(nets, att, rho=10.0)(params, {}, {"x": x},
                                                   jax.random.key(5), ctx)
  assert np.isfinite(float(loss)), float(loss)
  np.testing.assert_allclose(loss, regression_loss(nets, params, ctx, x),
                             rtol=1e-10)


def _np_mlp(params, x):
  h = x
  layers = sorted(k for k in params if k.startswith("hidden_"))
  for name in layers:
    h = np.maximum(h @ np.asarray(params[name]["kernel"])
                   + np.asarray(params[name]["bias"]), 0.0)
  return h @ np.asarray(params["out"]["kernel"]) + np.asarray(
      params["out"]["bias"])


@pytest.mark.parametrize("widths", [(M,), (M, 3)])
def test_networks_outputs_match_separate_networks(widths):
  """``Networks.outputs`` (first layers as one product, custom gradient)
  against NumPy for the values and against plain autodiff of the two
  separate networks (teacher under stop_gradient) for every gradient."""
  nets = Networks(teacher=MLP(widths, C, param_dtype=jnp.float64),
                  student=MLP(tuple(2 * w for w in widths), C, init_std=0.3,
                              param_dtype=jnp.float64))
  kx, kt, ks, kg = jax.random.split(jax.random.key(11), 4)
  x = jax.random.normal(kx, (2, 5, D), jnp.float64)  # two batch axes
  teacher = nets.teacher.init(kt, x[0])
  teacher = jax.tree.map(lambda a: a + 0.1, teacher)  # nonzero biases
  params = jax.tree.map(lambda a: a + 0.05,
                        nets.student.init(ks, x[0])["params"])
  ctx = {"teacher": teacher}
  s, t = nets.outputs(params, ctx, x)
  np.testing.assert_allclose(s, _np_mlp(params, np.asarray(x)), rtol=1e-12)
  np.testing.assert_allclose(t, _np_mlp(teacher["params"], np.asarray(x)),
                             rtol=1e-12)

  w = jax.random.normal(kg, s.shape, jnp.float64)

  def joint(p, tv, xx):
    a, b = nets.outputs(p, {"teacher": tv}, xx)
    return jnp.sum(w * a * b) + jnp.sum(a ** 2)

  def separate(p, tv, xx):
    a = nets.student.apply({"params": p}, xx)
    b = jax.lax.stop_gradient(nets.teacher.apply(tv, xx))
    return jnp.sum(w * a * b) + jnp.sum(a ** 2)

  got = jax.grad(joint, argnums=(0, 1, 2))(params, teacher, x)
  ref = jax.grad(separate, argnums=(0, 1, 2))(params, teacher, x)
  for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
    np.testing.assert_allclose(g, r, rtol=1e-11, atol=1e-13)
  # The teacher's gradient is exactly zero; the student's and the input's
  # are not (the comparison above has something to compare).
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(got[1]))
  assert float(jnp.abs(got[2]).max()) > 1e-3
  assert min(float(jnp.abs(g).max()) for g in jax.tree.leaves(got[0])) > 1e-3
