"""Image-classification method losses against hand computations, and which
terms carry gradient (spec §4.1–4.3)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tsjax import config_checks as cc
from tsjax import losses, models
from tsjax.attacks import AttackSpec
from tsjax.methods import ccat, pgd_at, standard, trades
from tsjax.methods.common import ce_attack, forward, logits_fn
from tsjax.train import classifier as clf

F32 = jnp.float32


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _setup(num_classes=4, batch=6):
  model = models.get_model("small_cnn", num_classes=num_classes,
                           features=(4, 8), hidden=16)
  params, ms = clf.init_model(model, jax.random.key(0), (8, 8, 1))
  kx, ky = jax.random.split(jax.random.key(1))
  x = jax.random.uniform(kx, (batch, 8, 8, 1), F32)
  y = jax.random.randint(ky, (batch,), 0, num_classes)
  return model, params, ms, x, y


def _logits(model, params, x):
  return np.asarray(model.apply({"params": params}, x), np.float64)


def test_standard_loss_value_and_label_smoothing():
  model, params, ms, x, y = _setup()
  z = _logits(model, params, x)
  ref = -np.mean(_log_softmax(z)[np.arange(len(y)), np.asarray(y)])
  loss, _ = standard.make_loss(model)(params, ms, {"image": x, "label": y},
                                      jax.random.key(0), None)
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  loss, _ = standard.make_loss(model, options=standard.Options())(
      params, ms, {"image": x, "label": y}, jax.random.key(0), None)
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  eps, c = 0.1, z.shape[1]
  target = np.full(z.shape, eps / c)
  target[np.arange(len(y)), np.asarray(y)] += 1 - eps
  ref_ls = -np.mean((target * _log_softmax(z)).sum(-1))
  loss_ls, _ = standard.make_loss(
      model, options=standard.Options(label_smoothing=eps))(
      params, ms, {"image": x, "label": y}, jax.random.key(0), None)
  np.testing.assert_allclose(loss_ls, ref_ls, rtol=1e-5)


ATT = AttackSpec(eps=0.1, step_size=0.05, steps=3)   # uniform start, last iterate


def test_pgd_at_value_and_no_gradient_through_attack():
  model, params, ms, x, y = _setup()
  key = jax.random.key(3)
  fn = pgd_at.make_loss(model, attack=ATT)
  loss, _ = fn(params, ms, {"image": x, "label": y}, key, None)
  # Recreate the attack point exactly as the method does (same key).
  x_adv, ms_after = ce_attack(model, params, ms, x, y, key, ATT)
  assert ms_after is ms     # eval-mode attack: the state is returned as is
  assert float(jnp.max(jnp.abs(x_adv - x))) <= ATT.eps + 1e-6
  assert float(jnp.max(jnp.abs(x_adv - x))) > 0
  z = _logits(model, params, x_adv)
  ref = -np.mean(_log_softmax(z)[np.arange(len(y)), np.asarray(y)])
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  g = jax.grad(lambda p: fn(p, ms, {"image": x, "label": y}, key, None)[0])(params)
  g_ref = jax.grad(lambda p: jnp.mean(losses.cross_entropy(
      model.apply({"params": p}, x_adv), y)))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-7), g, g_ref)


def test_trades_value_and_gradient_flows_through_both_terms():
  model, params, ms, x, y = _setup()
  key, beta = jax.random.key(4), 6.0
  att = AttackSpec(eps=0.1, step_size=0.05, steps=3, start="normal",
                   start_std=0.001)
  fn = trades.make_loss(model, attack=att, options=trades.Options(beta=beta))
  loss, (m, _) = fn(params, ms, {"image": x, "label": y}, key, None)
  # The attack point: re-run the inner maximisation with the same key.
  f = logits_fn(model, params, ms)
  pc = f(x)
  x_adv = att.run(lambda xa: losses.kl(pc, f(xa), reduction="none"), x, key)
  z, za = _logits(model, params, x), _logits(model, params, x_adv)
  lp, lq = _log_softmax(z), _log_softmax(za)
  kl = np.mean((np.exp(lp) * (lp - lq)).sum(-1))
  ce = -np.mean(lp[np.arange(len(y)), np.asarray(y)])
  np.testing.assert_allclose(loss, ce + beta * kl, rtol=1e-5)
  g = jax.grad(lambda p: fn(p, ms, {"image": x, "label": y}, key, None)[0])(params)

  def manual(p, detach_clean):
    zc = model.apply({"params": p}, x)
    za_ = model.apply({"params": p}, x_adv)
    tgt = jax.lax.stop_gradient(zc) if detach_clean else zc
    return jnp.mean(losses.cross_entropy(zc, y)) + beta * losses.kl(tgt, za_)
  g_both = jax.grad(lambda p: manual(p, False))(params)
  g_det = jax.grad(lambda p: manual(p, True))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-7), g, g_both)
  diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in
             zip(jax.tree.leaves(g), jax.tree.leaves(g_det)))
  assert diff > 1e-6   # the clean KL argument does carry gradient


CCAT_ATTACKS = [
    AttackSpec(eps=0.1, step_size=0.05, steps=3),              # plain PGD
    # The recipe's F7P: momentum, backtracking, mixed start, best iterate.
    AttackSpec(eps=0.1, step_size=0.05, steps=3, optimizer="backtrack",
               start="mixed", keep_best=True),
]


@pytest.mark.parametrize("att", CCAT_ATTACKS, ids=("pgd", "backtrack"))
def test_ccat_targets_and_loss(att):
  model, params, ms, x, y = _setup(batch=8)
  key, rho = jax.random.key(5), 10.0
  fn = ccat.make_loss(model, attack=att,
                      options=ccat.Options(rho=rho, clean_fraction=0.5))
  loss, (m, _) = fn(params, ms, {"image": x, "label": y}, key, None)
  f = logits_fn(model, params, ms)
  x_adv = att.run(lambda xa: ccat.max_other_prob(f(xa), y[4:]), x[4:], key)
  norm = np.abs(np.asarray(x_adv - x[4:])).reshape(4, -1).max(1)
  lam = 1 - (1 - np.minimum(1, norm / att.eps)) ** rho
  c = 4
  tgt = np.eye(c)[np.asarray(y[4:])] * (1 - lam[:, None]) + lam[:, None] / c
  lc = _log_softmax(_logits(model, params, x[:4]))
  la = _log_softmax(_logits(model, params, x_adv))
  ref = 0.5 * -np.mean(lc[np.arange(4), np.asarray(y[:4])]) + \
      0.5 * -np.mean((tgt * la).sum(-1))
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  np.testing.assert_allclose(m["lambda"], lam.mean(), rtol=1e-5)


def test_ccat_lambda_spec_values():
  r = jnp.asarray([0.0, 0.1, 0.5, 1.0, 2.0])
  np.testing.assert_allclose(ccat.ccat_lambda(r, 1.0, 10.0),
                             [0.0, 0.6513215599, 0.9990234375, 1.0, 1.0],
                             rtol=1e-6)


def test_ccat_threshold_selection():
  rng = np.random.default_rng(0)
  conf = rng.uniform(0.2, 1.0, 1000)
  correct = rng.uniform(size=1000) < 0.8
  tau = ccat.confidence_threshold(conf, correct, 0.99)
  kept = np.mean(conf[correct] >= tau)
  assert 0.99 <= kept <= 0.99 + 1.0 / correct.sum() + 1e-12
  # The reference's rule, sorted[floor(n * round(1 - tpr, 2))]: 200
  # correct confidences 0.005..1.0 -> index 2.
  conf = np.arange(1, 201) / 200.0
  assert ccat.confidence_threshold(conf, np.ones(200, bool), 0.99) == 0.015
  clean_correct = np.array([True, True, True, False, True])
  clean_conf = np.array([0.9, 0.8, 0.3, 0.7, 0.2])
  adv_conf = np.array([0.9, 0.1, 0.2, 0.2, 0.6])
  adv_correct = np.array([False, False, True, True, True])
  r = ccat.thresholded_errors(0.5, clean_correct, clean_conf, adv_conf,
                              adv_correct)
  # adversarial_evaluation.py:428-443: errors among the accepted examples
  # (clean or adversarial confidence >= tau: ex0, ex1, ex3, ex4): ex0
  # (confident wrong adversarial) and ex3 (confident clean error); ex1's
  # wrong adversarial example is rejected; ex2 is accepted nowhere.
  assert r["robust_error"] == pytest.approx(2 / 4)
  assert r["robust_error_unthresholded"] == pytest.approx(3 / 5)
  assert r["adv_rejected"] == pytest.approx(3 / 5)


def test_attack_bn_mode_train_uses_batch_statistics():
  model = models.get_model("preact_resnet18", num_classes=10)
  x = jax.random.uniform(jax.random.key(0), (4, 32, 32, 3), F32)
  params, ms = clf.init_model(model, jax.random.key(1), (32, 32, 3))
  ev = logits_fn(model, params, ms, "eval")(x)
  tr = logits_fn(model, params, ms, "train")(x)
  ref_tr, _ = forward(model, params, ms, x, train=True)
  np.testing.assert_allclose(tr, ref_tr, rtol=1e-5, atol=1e-5)
  assert float(jnp.max(jnp.abs(ev - tr))) > 1e-3
  with pytest.raises(ValueError, match="bn_mode"):
    AttackSpec(bn_mode="batch")
  with pytest.raises(cc.ConfigError, match="'method.attack.bn_mode'"):
    cc.build(AttackSpec, {"bn_mode": "batch"}, "method.attack")
