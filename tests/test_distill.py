"""Distillation methods (spec §2 PeerAiD, §3 AdvFunMatch, §4.5-4.9 ARD, RSLAD,
IAD, KD, FunMatch, §5 reductions and stop-gradients).

* Every loss against a NumPy restatement of its reference formula, written
  here from the spec (not from the tsjax code), on random float64 logits
  (B = 8, C = 10) to ~1e-10; the ``"mean"`` KL against PyTorch's
  ``nn.KLDivLoss()`` when torch is installed.
* Gradient paths with ``jax.grad`` on the ``*_objective`` functions (which
  logits are detached), checked against finite differences of the NumPy
  restatements where the reference differentiates a KL's target.
* One jitted train step of every method on tiny float64 SmallCNNs: the step's
  loss equals the NumPy formula at the method's own attack / mixup point
  (recomputed with the step's key), parameters move, the teacher does not.
* AdvFunMatch's inner maximisation (KL grows, stays in the ball and in
  [0, 1], gradient through both networks; the best vs the last iterate); a
  PeerAiD step on a batch-norm model updates both networks' parameters and
  running statistics (3 student and 1 peer train-mode passes); ARD and IAD
  steps on a batch-norm student attacked in train mode against an
  independent PGD loop and running-statistic recursion (one update per
  attack step, then ARD's S(x'), S(x); IAD's S(x'), S(x') discarded, S(x),
  and S(x) again from the begin epoch); SWA averaging and batch-norm
  re-estimation against a direct computation (and
  ``torch.optim.swa_utils.update_bn``).
* The teacher never enters the student's checkpoints (``fit`` on a tiny
  problem; end to end through ``experiments.distill`` under ``-m slow``),
  config errors before compiling, the registry records, and a teacher from a
  PyTorch state dict.
"""

import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from tsjax import config_checks as cc
from tsjax import losses, methods, models
from tsjax.attacks import AttackSpec
from tsjax.methods import advfunmatch, ard, funmatch, iad, kd, peeraid, rslad
from tsjax.methods.common import ce_attack, logits_fn
from tsjax.methods.distill import teacher_ctx, teacher_logits
from tsjax.train import CheckpointStore, TrainState
from tsjax.train import classifier as clf

from compile_events import compile_events

F64 = jnp.float64
B, C = 8, 10
HW = (8, 8, 1)


# ------------------------------------------------- NumPy restatements (spec)
def np_log_softmax(z, t=1.0):
  z = np.asarray(z, np.float64) / t
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_softmax(z, t=1.0):
  return np.exp(np_log_softmax(z, t))


def kl_elem(p_logits, q_logits, t=1.0):
  """Element-wise p * (log p - log q) of softmax(p/t), softmax(q/t): [B, C]."""
  lp, lq = np_log_softmax(p_logits, t), np_log_softmax(q_logits, t)
  return np.exp(lp) * (lp - lq)


def kl_mean(p, q, t=1.0):        # nn.KLDivLoss() default: sum / (B * C)
  return kl_elem(p, q, t).mean()


def kl_batchmean(p, q, t=1.0):   # sum over classes, mean over the batch
  return kl_elem(p, q, t).sum(-1).mean()


def np_ce(z, y):
  return -np_log_softmax(z)[np.arange(len(y)), np.asarray(y)].mean()


def ref_kd(s, t, y, alpha, tau):                                   # §4.8
  return alpha * tau ** 2 * kl_batchmean(t, s, tau) + (1 - alpha) * np_ce(s, y)


def ref_ard(s_adv, s_nat, t_nat, y, alpha, tau):                   # §4.5
  return (alpha * tau ** 2 * kl_mean(t_nat, s_adv, tau)
          + (1 - alpha) * np_ce(s_nat, y))


def ref_rslad(s_adv, s_nat, t_nat, w=5 / 6, scale=1.0):            # §4.6
  p = np_softmax(t_nat)
  kle = lambda s: np.mean(p * (np.log(p + 1e-5) - np_log_softmax(s)))
  return scale * (w * kle(s_adv) + (1 - w) * kle(s_nat))


def ref_iad_alpha(t_adv, y, beta):
  return np_softmax(t_adv)[np.arange(len(y)), np.asarray(y)] ** beta


def ref_iad(s_adv, s_nat, t_nat, t_adv, y, epoch, begin, tau, beta):  # §4.7
  first = tau ** 2 * kl_batchmean(t_nat, s_adv, tau)
  if epoch < begin:
    return first
  alpha = ref_iad_alpha(t_adv, y, beta)
  return first + np.mean((1 - alpha) * kl_elem(s_nat, s_adv).sum(-1))


def ref_peeraid(p, s1, s2, sn, y, w):                              # §2.2
  """``p``: the peer's one train-mode pass at x* (main.py:359), used by
  both losses; ``s1`` / ``s2``: the student's two passes at x* (L_peer's
  target, L_student's input); ``sn``: S(x)."""
  kl = kl_mean if w.reduction == "mean" else kl_batchmean
  l_peer = (w.gamma1 * np_ce(p, y)
            + w.gamma2 * w.tau_p ** 2 * kl(s1, p, w.tau_p))
  l_student = (w.lambda1 * np_ce(s2, y)
               + w.lambda2 * w.tau ** 2 * kl(p, s2, w.tau)
               + w.lambda3 * w.tau ** 2 * kl(sn, s2, w.tau))
  return l_peer + l_student, l_peer, l_student


def ref_funmatch(s, t, tau):                                       # §4.9, §3.2
  return tau ** 2 * kl_batchmean(t, s, tau)


def finite_diff(f, z, h=1e-5):
  """Central differences of the scalar NumPy function ``f`` at ``z``."""
  z = np.array(z, np.float64)
  g = np.zeros_like(z)
  for i in np.ndindex(z.shape):
    zp, zm = z.copy(), z.copy()
    zp[i] += h
    zm[i] -= h
    g[i] = (f(zp) - f(zm)) / (2 * h)
  return g


def _logits(seed, n=5, scale=3.0):
  rng = np.random.default_rng(seed)
  return [scale * rng.standard_normal((B, C)) for _ in range(n)]


def _labels(seed=0):
  return np.random.default_rng(seed).integers(0, C, B)


def _close(got, want, tol=1e-10):
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tol,
                             atol=tol)


# --------------------------------------------------------- 1. loss values
@pytest.mark.parametrize("reduction", losses.KL_REDUCTIONS)
@pytest.mark.parametrize("t", [1.0, 4.0])
def test_kl_reductions_match_numpy(reduction, t):
  p, q = _logits(0, 2)
  e = kl_elem(p, q, t)
  want = {"batchmean": e.sum(-1).mean(), "mean": e.sum() / (B * C),
          "sum": e.sum(), "none": e.sum(-1)}[reduction]
  _close(losses.kl(p, q, temperature=t, reduction=reduction), want)
  # RSLAD's hand-written KL: p * (log(p + 1e-5) - log q).
  ps, lq = np_softmax(p, t), np_log_softmax(q, t)
  e_eps = ps * (np.log(ps + 1e-5) - lq)
  want_eps = {"batchmean": e_eps.sum(-1).mean(), "mean": e_eps.mean(),
              "sum": e_eps.sum(), "none": e_eps.sum(-1)}[reduction]
  _close(losses.kl(p, q, temperature=t, reduction=reduction, target_eps=1e-5),
         want_eps)
  with pytest.raises(ValueError, match="reduction"):
    losses.kl(p, q, reduction="average")


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides")
def test_kl_matches_pytorch_kldivloss_and_its_target_gradient():
  torch = pytest.importorskip("torch")
  F = torch.nn.functional
  p, q = _logits(1, 2)
  for t in (1.0, 5.0):
    tp = torch.tensor(p / t, requires_grad=True)
    tq = torch.tensor(q / t, requires_grad=True)
    ref = torch.nn.KLDivLoss()(F.log_softmax(tq, 1), F.softmax(tp, 1))
    _close(losses.kl(p, q, temperature=t, reduction="mean"), ref.item())
    for red in ("batchmean", "sum"):
      r = torch.nn.KLDivLoss(reduction=red)(F.log_softmax(tq, 1),
                                            F.softmax(tp, 1))
      _close(losses.kl(p, q, temperature=t, reduction=red), r.item())
    # PyTorch differentiates kl_div's target: so does losses.kl.
    ref.backward()
    gp, gq = jax.grad(lambda a, b: losses.kl(a, b, temperature=t,
                                             reduction="mean"), (0, 1))(p, q)
    _close(gp, tp.grad.numpy() / t)
    _close(gq, tq.grad.numpy() / t)
    assert np.abs(tp.grad.numpy()).max() > 1e-4
  # RSLAD's reference code: mean(-log_softmax(s) * p + log(p + 1e-5) * p).
  s, tt = torch.tensor(q), torch.tensor(p)
  a, b = F.log_softmax(s, 1), F.softmax(tt, 1)
  ref = torch.mean(-a * b + torch.log(b + 1e-5) * b)
  _close(losses.kl(p, q, reduction="mean", target_eps=1e-5), ref.item())


@pytest.mark.parametrize("alpha,tau,reduction",
                         [(0.9, 4.0, "batchmean"), (0.3, 1.0, "batchmean"),
                          (0.5, 2.0, "mean")])
def test_kd_objective(alpha, tau, reduction):
  s, t = _logits(2, 2)
  y = _labels()
  loss, soft, hard = kd.kd_objective(s, t, y, alpha=alpha, temperature=tau,
                                     reduction=reduction)
  kl = kl_batchmean if reduction == "batchmean" else kl_mean
  _close(loss, alpha * tau ** 2 * kl(t, s, tau) + (1 - alpha) * np_ce(s, y))
  if reduction == "batchmean":
    _close(loss, ref_kd(s, t, y, alpha, tau))
  _close(soft, kl(t, s, tau))
  _close(hard, np_ce(s, y))


@pytest.mark.parametrize("alpha,tau", [(1.0, 30.0), (0.7, 4.0)])
def test_ard_objective(alpha, tau):
  s_adv, s_nat, t_nat = _logits(3, 3)
  y = _labels()
  loss, soft, hard = ard.ard_objective(s_adv, s_nat, t_nat, y, alpha=alpha,
                                       temperature=tau)
  _close(loss, ref_ard(s_adv, s_nat, t_nat, y, alpha, tau))
  _close(soft, kl_mean(t_nat, s_adv, tau))   # KL(T(x) || S(x')), / (B * C)
  _close(hard, np_ce(s_nat, y))              # CE on the *clean* student


@pytest.mark.parametrize("w,scale", [(5 / 6, 1.0), (5 / 6, 10.0), (0.5, 1.0)])
def test_rslad_objective(w, scale):
  s_adv, s_nat, t_nat = _logits(4, 3)
  loss, adv, nat = rslad.rslad_objective(s_adv, s_nat, t_nat, adv_weight=w,
                                         kl_scale=scale)
  _close(loss, ref_rslad(s_adv, s_nat, t_nat, w, scale))
  _close(adv, ref_rslad(s_adv, s_nat, t_nat, 1.0))
  _close(nat, ref_rslad(s_adv, s_nat, t_nat, 0.0))


@pytest.mark.parametrize("epoch", [0, 59, 60, 61])
@pytest.mark.parametrize("tau,beta", [(1.0, 0.1), (3.0, 0.5)])
def test_iad_objective_trust_only_after_begin_epoch(epoch, tau, beta):
  s_adv, s_nat, t_nat, t_adv = _logits(5, 4)
  y = _labels()
  begin = 60
  loss, first, intro, alpha = iad.iad_objective(
      s_adv, s_nat, t_nat, t_adv, y, jnp.asarray(epoch) >= begin,
      temperature=tau, beta=beta)
  _close(loss, ref_iad(s_adv, s_nat, t_nat, t_adv, y, epoch, begin, tau, beta))
  _close(alpha, ref_iad_alpha(t_adv, y, beta))
  a = ref_iad_alpha(t_adv, y, beta)
  _close(intro, np.mean((1 - a) * kl_elem(s_nat, s_adv).sum(-1)))
  _close(first, tau ** 2 * kl_batchmean(t_nat, s_adv, tau))
  assert (float(loss) > float(first)) == (epoch >= begin)


PEERAID_WEIGHTS = [
    peeraid.Options(),                                  # CIFAR-10
    peeraid.Options.for_dataset("tiny_imagenet"),       # lambda1 > 0
    peeraid.Options(tau=4.0, tau_p=2.0, gamma1=0.5, gamma2=3.0,
                    lambda1=0.2, lambda2=1.5, lambda3=2.5),
    peeraid.Options(tau=4.0, tau_p=2.0, gamma1=0.5, gamma2=3.0,
                    lambda1=0.2, lambda2=1.5, lambda3=2.5,
                    reduction="batchmean"),
]


@pytest.mark.parametrize("w", PEERAID_WEIGHTS)
def test_peeraid_objective(w):
  args = _logits(6, 4)     # p_adv, s_adv_1, s_adv_2, s_clean
  y = _labels()
  got = peeraid.peeraid_objective(*args, y, w)
  for g, r in zip(got, ref_peeraid(*args, y, w)):
    _close(g, r)
  # The default 'mean' reduction is / (B * C): 10x smaller KL terms than
  # batchmean with C = 10 (spec §2.2).
  if w.reduction == "mean":
    p1, s1 = args[:2]
    _close(kl_mean(s1, p1) * C, kl_batchmean(s1, p1))


def test_peeraid_weights_table():
  """Spec §2.3 (and the Fashion-MNIST config uses the CIFAR-10 row)."""
  from tsjax.configs import distill as dcfg
  rows = {"cifar10": (5, 1, 1, 0.1, 0, 1, 1), "cifar100": (5, 1, 1, 1, 0, 1, 1),
          "tiny_imagenet": (1, 1, 1, 100, 0.035, 35, 20)}
  names = ("tau", "tau_p", "gamma1", "gamma2", "lambda1", "lambda2", "lambda3")
  for ds, row in rows.items():
    w = peeraid.Options.for_dataset(ds)
    assert tuple(getattr(w, n) for n in names) == row and w.reduction == "mean"
    o = dcfg.get_config(f"peeraid,{ds}").method.options
    assert tuple(o[n] for n in names) == row and o.reduction == "mean"
  o = dcfg.get_config("peeraid,fashion_mnist").method.options
  assert tuple(o[n] for n in names) == rows["cifar10"]
  with pytest.raises(ValueError, match="no PeerAiD weights"):
    peeraid.Options.for_dataset("mnist")


# ----------------------------------------------------- 2. gradient paths
def _norm(a):
  return float(np.max(np.abs(np.asarray(a))))


def test_peeraid_gradient_paths():
  w = PEERAID_WEIGHTS[2]
  args = _logits(7, 4)     # p_adv, s_adv_1, s_adv_2, s_clean
  y = _labels()
  part = lambda i: (lambda *a: peeraid.peeraid_objective(*a, y, w)[i])
  g_tot, g_peer, g_stu = (jax.grad(part(i), argnums=tuple(range(4)))(*args)
                          for i in range(3))
  # ref(k, i): term i (0 total, 1 L_peer, 2 L_student) of the undetached
  # NumPy formula as a function of logit k.
  ref = lambda k, i: (lambda z: ref_peeraid(*[z if j == k else a for j, a in
                                              enumerate(args)], y, w)[i])
  # The peer's one pass P(x*) feeds both losses: L_peer trains the peer
  # through it (CE and the KL's input) ...
  assert _norm(g_peer[0]) > 1e-3
  _close(g_peer[0], finite_diff(ref(0, 1), args[0]), 1e-8)
  # ... while L_student reads it detached (exactly zero gradient) ...
  assert _norm(g_stu[0]) == 0.0
  # ... although the undetached formula does depend on it: the total
  # gradient at P(x*) is L_peer's alone, not the undetached total's.
  assert _norm(finite_diff(ref(0, 2), args[0])) > 1e-3
  _close(g_tot[0], g_peer[0], 1e-12)
  assert _norm(np.asarray(g_tot[0]) - finite_diff(ref(0, 0), args[0])) > 1e-3
  # L_peer's KL target S(x*) is NOT detached: the reference's kl_div
  # differentiates its target. Same gradient as the undetached formula.
  assert _norm(g_peer[1]) > 1e-3
  _close(g_peer[1], finite_diff(ref(1, 1), args[1]), 1e-8)
  # L_student: S(x*) and the clean S(x) (lambda3 term, both sides) get
  # gradient, equal to the formula's.
  assert _norm(g_stu[3]) > 1e-3
  _close(g_stu[3], finite_diff(ref(3, 2), args[3]), 1e-8)
  _close(g_stu[2], finite_diff(ref(2, 2), args[2]), 1e-8)
  # No cross terms: L_peer does not see L_student's S(x*) nor S(x),
  # L_student not L_peer's S(x*); the total is the sum.
  for k in (2, 3):
    assert _norm(g_peer[k]) == 0.0
  assert _norm(g_stu[1]) == 0.0
  for k in range(4):
    _close(g_tot[k], np.asarray(g_peer[k]) + np.asarray(g_stu[k]), 1e-12)


def test_rslad_gradient_paths():
  s_adv, s_nat, t_nat = _logits(8, 3)
  g = jax.grad(lambda a, b: rslad.rslad_objective(a, b, t_nat)[0],
               (0, 1))(s_adv, s_nat)
  for k, z in enumerate((s_adv, s_nat)):     # both student terms trainable
    ref = lambda v, k=k: ref_rslad(*[v if j == k else a for j, a in
                                     enumerate((s_adv, s_nat))], t_nat)
    assert _norm(g[k]) > 1e-4
    _close(g[k], finite_diff(ref, z), 1e-8)


def test_iad_gradient_paths():
  s_adv, s_nat, t_nat, t_adv = _logits(9, 4)
  y = _labels()
  f = lambda active: (lambda *a: iad.iad_objective(*a, y, active,
                                                   temperature=2.0)[0])
  g_on = jax.grad(f(True), argnums=(0, 1, 2, 3))(s_adv, s_nat, t_nat, t_adv)
  g_off = jax.grad(f(False), argnums=(0, 1, 2, 3))(s_adv, s_nat, t_nat, t_adv)
  # The trust alpha = softmax(T(x'))_y ** beta carries no gradient.
  assert _norm(g_on[3]) == 0.0 and _norm(g_off[3]) == 0.0
  # S(x) is not detached in the introspection term (TRADES-like), and the
  # term is off before the begin epoch.
  assert _norm(g_on[1]) > 1e-4 and _norm(g_off[1]) == 0.0
  ref = lambda k: (lambda v: ref_iad(*[v if j == k else a for j, a in
                                       enumerate((s_adv, s_nat))], t_nat,
                                     t_adv, y, 1, 0, 2.0, 0.1))
  _close(g_on[0], finite_diff(ref(0), s_adv), 1e-8)
  _close(g_on[1], finite_diff(ref(1), s_nat), 1e-8)


def test_kd_and_ard_gradients_match_formulas():
  s, s_nat, t = _logits(10, 3)
  y = _labels()
  g = jax.grad(lambda a: kd.kd_objective(a, t, y, alpha=0.7,
                                         temperature=3.0)[0])(s)
  _close(g, finite_diff(lambda v: ref_kd(v, t, y, 0.7, 3.0), s), 1e-8)
  g_adv, g_nat = jax.grad(lambda a, b: ard.ard_objective(
      a, b, t, y, alpha=0.6, temperature=5.0)[0], (0, 1))(s, s_nat)
  _close(g_adv, finite_diff(lambda v: ref_ard(v, s_nat, t, y, 0.6, 5.0), s),
         1e-8)
  _close(g_nat, finite_diff(lambda v: ref_ard(s, v, t, y, 0.6, 5.0), s_nat),
         1e-8)


# ------------------------------------------------------------ tiny models
def init_numpy(model, shape, seed, dtype=np.float64):
  """Random ``(params, model_state)`` without compiling ``model.init``
  (shapes from ``jax.eval_shape``; fan-in scaled normal kernels, random
  biases, random batch-norm statistics)."""
  abstract = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, *shape), dtype)))
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    name = path[-1].key
    if name == "kernel":
      return (rng.standard_normal(s.shape)
              / np.sqrt(np.prod(s.shape[:-1]))).astype(s.dtype)
    if name in ("scale", "var"):
      return rng.uniform(0.5, 1.5, s.shape).astype(s.dtype)
    return (0.1 * rng.standard_normal(s.shape)).astype(s.dtype)

  v = dict(jax.tree_util.tree_map_with_path(leaf, abstract))
  params = v.pop("params")
  return params, v


def small_cnn(features=(4, 8), hidden=16, **kw):
  return models.get_model("small_cnn", num_classes=C, features=features,
                          hidden=hidden, param_dtype=F64, **kw)


_apply_jit = jax.jit(lambda model, v, x: model.apply(v, x), static_argnums=0)
_apply_train_jit = jax.jit(lambda model, v, x: model.apply(
    v, x, train=True, mutable=["batch_stats"])[0], static_argnums=0)
_ce_attack_jit = jax.jit(ce_attack, static_argnums=(0, 6))
_mismatch_jit = jax.jit(advfunmatch.mismatched_examples,
                        static_argnums=(0, 1, 7), static_argnames="temperature")
_mixup_jit = jax.jit(funmatch.funmatch_mixup, static_argnums=2)


def z_of(model, params, x, model_state=None):
  """Eval-mode logits as float64 NumPy."""
  return np.asarray(_apply_jit(model, {"params": params, **(model_state or {})},
                               jnp.asarray(x)), np.float64)


@pytest.fixture(scope="module")
def tiny():
  student = small_cnn()
  teacher = small_cnn(features=(6, 12), hidden=20)   # disjoint kernel shapes
  sp, sm = init_numpy(student, HW, 0)
  tp, tm = init_numpy(teacher, HW, 1)
  rng = np.random.default_rng(2)
  x = rng.uniform(0, 1, (B, *HW))
  x[0, :2] = 0.0        # pixels on the box boundary
  x[1, :2] = 1.0
  y = rng.integers(0, C, B).astype(np.int32)
  return dict(student=student, teacher=teacher, sp=sp, sm=sm, tp=tp, tm=tm,
              x=x, y=y)


# ------------------------------------------- 3. one step of every method
# Uniform start (ARD / IAD, the student in train mode: SmallCNN has no batch
# norm, see section 5 for the statistics); Gaussian start x + 0.001 N(0, I)
# (RSLAD); AdvFunMatch as its recipe: Gaussian start, the best iterate.
ATT_U_TRAIN = AttackSpec(eps=0.1, step_size=0.05, steps=2, bn_mode="train")
ATT_N = AttackSpec(eps=0.1, step_size=0.05, steps=2, start="normal")
ATT_AFM = AttackSpec(eps=0.1, step_size=0.025, steps=6, start="normal",
                     keep_best=True)
KD_OPTS = kd.Options(alpha=0.7, temperature=3.0)
ARD_OPTS = ard.Options(alpha=0.8, temperature=5.0)
IAD_OPTS = iad.Options(temperature=2.0, beta=0.1, begin_epoch=1)
FM_OPTS = funmatch.Options(temperature=2.0)
AFM_OPTS = advfunmatch.Options(temperature=2.0, clean_weight=0.5)
PEER_W = PEERAID_WEIGHTS[2]
# PeerAiD's step (joint student + peer) is tested on a batch-norm model below.
DISTILL_METHODS = ("kd", "ard", "rslad", "iad", "funmatch", "advfunmatch")
_STEPS = {}


def method_loss(name, t):
  """The method's loss through the one signature every method has."""
  module = {"kd": kd, "ard": ard, "rslad": rslad, "iad": iad,
            "funmatch": funmatch, "advfunmatch": advfunmatch}[name]
  attack, options = {
      "kd": (None, KD_OPTS), "ard": (ATT_U_TRAIN, ARD_OPTS),
      "rslad": (ATT_N, rslad.Options()), "iad": (ATT_U_TRAIN, IAD_OPTS),
      "funmatch": (None, FM_OPTS), "advfunmatch": (ATT_AFM, AFM_OPTS)}[name]
  return module.make_loss(t["student"], teacher=t["teacher"], attack=attack,
                          options=options)


OPT = optax.sgd(0.1, momentum=0.9)


def jitted_step(name, t):
  """One compiled step per method, shared by the tests of this module."""
  if name not in _STEPS:
    _STEPS[name] = clf.jit_train_step(method_loss(name, t), OPT)
  return _STEPS[name]


def expected_loss(name, t, params, key, batch):
  """The NumPy formula at the method's own inner point (same key)."""
  s, te, x, y = t["student"], t["teacher"], batch["image"], batch["label"]
  tp, sm, tm = t["tp"], t["sm"], t["tm"]
  ctx = teacher_ctx(tp, tm)
  S = lambda xx: z_of(s, params, xx)
  T = lambda xx: z_of(te, tp, xx)
  if name == "kd":
    return ref_kd(S(x), T(x), y, KD_OPTS.alpha, KD_OPTS.temperature)
  if name in ("ard", "iad"):   # the same attack: one compile for both
    x_adv, _ = _ce_attack_jit(s, params, sm, x, y, key, ATT_U_TRAIN)
    if name == "ard":
      return ref_ard(S(x_adv), S(x), T(x), y, ARD_OPTS.alpha,
                     ARD_OPTS.temperature)
    return ref_iad(S(x_adv), S(x), T(x), T(x_adv), y, int(batch["epoch"]),
                   IAD_OPTS.begin_epoch, IAD_OPTS.temperature, IAD_OPTS.beta)
  if name == "rslad":
    f = logits_fn(s, params, sm)
    t_nat = jnp.asarray(T(x))
    x_adv = jax.jit(lambda: ATT_N.run(
        lambda xa: losses.kl(t_nat, f(xa), reduction="none"), x, key))()
    return ref_rslad(S(x_adv), S(x), T(x))
  if name == "funmatch":
    x_mix, a = _mixup_jit(key, jnp.asarray(x), 1.0)
    a = float(a)       # a = max(b, 1 - b): the own image dominates
    assert 0.5 <= a <= 1.0
    _close(x_mix, a * x + (1 - a) * np.roll(x, 1, axis=0), 1e-12)
    return ref_funmatch(S(x_mix), T(x_mix), FM_OPTS.temperature)
  if name == "advfunmatch":
    x_adv, _ = _mismatch_jit(te, s, params, sm, ctx, x, key, ATT_AFM,
                             temperature=AFM_OPTS.temperature)
    tau = AFM_OPTS.temperature
    return (ref_funmatch(S(x_adv), T(x_adv), tau)
            + AFM_OPTS.clean_weight * ref_funmatch(S(x), T(x), tau))
  raise ValueError(name)


def _max_diff(a, b):
  return [float(np.max(np.abs(np.asarray(u) - np.asarray(v))))
          for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b))]


@pytest.mark.parametrize("name", DISTILL_METHODS)
def test_one_step_every_method(name, tiny):
  t = tiny
  params, ms = t["sp"], t["sm"]
  ctx = teacher_ctx(jax.tree.map(jnp.asarray, t["tp"]), t["tm"])
  batch = {"image": t["x"], "label": t["y"], "epoch": np.int32(3)}
  state = TrainState.create(jax.tree.map(jnp.array, params), OPT,
                            jax.random.key(11), ms)   # donated by the step
  before = jax.tree.map(np.array, params)
  teacher_before = jax.tree.map(np.array, ctx)
  new, metrics = jitted_step(name, t)(state, batch, ctx)
  loss = float(metrics["loss"])
  assert bool(metrics["finite"]) and np.isfinite(loss) and int(new.step) == 1
  # The step's loss (at the old parameters) is the reference formula at the
  # method's own attack / mixup point (step key = fold_in(key, 0)).
  want = expected_loss(name, t, params,
                       jax.random.fold_in(jax.random.key(11), 0), batch)
  np.testing.assert_allclose(loss, want, rtol=1e-9, atol=1e-12)
  if name == "iad":   # before the begin epoch: the teacher term only
    fresh = TrainState.create(jax.tree.map(jnp.array, params), OPT,
                              jax.random.key(11), ms)
    _, m0 = jitted_step(name, t)(fresh, {**batch, "epoch": np.int32(0)}, ctx)
    want0 = expected_loss(name, t, params,
                          jax.random.fold_in(jax.random.key(11), 0),
                          {**batch, "epoch": np.int32(0)})
    np.testing.assert_allclose(float(m0["loss"]), want0, rtol=1e-9)
    assert float(m0["loss"]) < loss
  # Every parameter array moves ...
  moved = _max_diff(new.params, before)
  assert min(moved) > 0, moved
  # ... and the frozen teacher in ctx does not (it is never donated either).
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, ctx),
               teacher_before)


def test_teacher_is_detached(tiny):
  """Every distillation loss reads the teacher through ``teacher_logits``
  (eval mode): no gradient to the teacher's variables nor to its input. (The
  train step differentiates only the student's ``params``; the teacher in
  ``ctx`` is passed through untouched: see test_one_step_every_method.)"""
  t = tiny
  f = lambda tp, x: jnp.sum(teacher_logits(t["teacher"],
                                           teacher_ctx(tp, t["tm"]), x) ** 2)
  gp, gx = jax.jit(jax.grad(f, (0, 1)))(t["tp"], jnp.asarray(t["x"]))
  assert all(_norm(g) == 0 for g in jax.tree.leaves(gp)) and _norm(gx) == 0
  np.testing.assert_allclose(jax.jit(lambda tp, x: teacher_logits(
      t["teacher"], teacher_ctx(tp, t["tm"]), x))(t["tp"], t["x"]),
      z_of(t["teacher"], t["tp"], t["x"]), rtol=1e-12)
  with pytest.raises(ValueError, match="teacher_ctx"):
    teacher_logits(t["teacher"], None, t["x"])


# ------------------------------------------- 4. AdvFunMatch inner loop
def test_advfunmatch_inner_maximisation(tiny):
  t = tiny
  s, te, x = t["student"], t["teacher"], jnp.asarray(t["x"])
  ctx = teacher_ctx(t["tp"], t["tm"])
  att, tau = ATT_AFM, AFM_OPTS.temperature
  x_adv, kl_adv = _mismatch_jit(te, s, t["sp"], t["sm"], ctx, x,
                                jax.random.key(5), att, temperature=tau)
  x_adv, kl_adv = np.asarray(x_adv), np.asarray(kl_adv)
  # Feasible: in the eps-ball and in [0, 1].
  assert np.abs(x_adv - t["x"]).max() <= att.eps + 1e-12
  assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
  assert np.abs(x_adv - t["x"]).max() > 0.5 * att.eps
  # The returned value is KL(T(x*) || S(x*)) per example (NumPy).
  kl_at = lambda xx: kl_elem(z_of(te, t["tp"], xx), z_of(s, t["sp"], xx),
                             tau).sum(-1)
  _close(kl_adv, kl_at(x_adv), 1e-9)
  # It increases the KL it maximises: above the clean point for every
  # example, and above a random point of the ball on average and mostly.
  kl_clean = kl_at(t["x"])
  rng = np.random.default_rng(0)
  x_rand = np.clip(t["x"] + rng.uniform(-att.eps, att.eps, t["x"].shape), 0, 1)
  kl_rand = kl_at(x_rand)
  assert np.all(kl_adv > kl_clean), (kl_adv, kl_clean)
  assert kl_adv.mean() > 1.3 * kl_clean.mean()   # 1.16 with the student-only gradient
  assert kl_adv.mean() > kl_rand.mean() and np.mean(kl_adv >= kl_rand) >= 0.75


def test_advfunmatch_best_vs_last_iterate(tiny):
  """``keep_best=True`` (the recipe) returns the per-example best iterate,
  ``False`` AdaAD's last one (AT_helper.py:22-48): the same iterates (same
  key), so the best KL is >= the last one for every example."""
  t = tiny
  s, te, x = t["student"], t["teacher"], jnp.asarray(t["x"])
  ctx = teacher_ctx(t["tp"], t["tm"])
  tau, key = AFM_OPTS.temperature, jax.random.key(5)
  _, kl_best = _mismatch_jit(te, s, t["sp"], t["sm"], ctx, x, key, ATT_AFM,
                             temperature=tau)
  x_last, kl_last = _mismatch_jit(te, s, t["sp"], t["sm"], ctx, x, key,
                                  ATT_AFM.replace(keep_best=False),
                                  temperature=tau)
  x_last = np.asarray(x_last)
  assert np.abs(x_last - t["x"]).max() <= ATT_AFM.eps + 1e-12
  assert x_last.min() >= 0.0 and x_last.max() <= 1.0
  _close(kl_last, kl_elem(z_of(te, t["tp"], x_last), z_of(s, t["sp"], x_last),
                          tau).sum(-1), 1e-9)
  assert np.all(np.asarray(kl_best) >= np.asarray(kl_last) - 1e-12)


@pytest.mark.parametrize("reduction", ["batchmean", "mean"])
def test_advfunmatch_outer_reduction(reduction, tiny):
  """``Options.reduction``: ``"batchmean"`` (FunMatch's, the default) or
  ``"mean"`` (/ (B * C), AdaAD's ``nn.KLDivLoss()``), in both KL terms. A
  zero-step inner loop keeps this cheap (x* = the projected Gaussian start)."""
  t = tiny
  s, te, x, y = t["student"], t["teacher"], t["x"], t["y"]
  ctx = teacher_ctx(t["tp"], t["tm"])
  att = ATT_AFM.replace(steps=0)
  opts = advfunmatch.Options(temperature=2.0, clean_weight=0.5,
                             reduction=reduction)
  fn = jax.jit(advfunmatch.make_loss(s, teacher=te, attack=att, options=opts))
  key = jax.random.key(8)
  loss, (metrics, _) = fn(t["sp"], t["sm"], {"image": x, "label": y}, key, ctx)
  x_adv, _ = _mismatch_jit(te, s, t["sp"], t["sm"], ctx, jnp.asarray(x), key,
                           att, temperature=opts.temperature)
  x_adv = np.asarray(x_adv)
  assert 0 < np.abs(x_adv - x).max() <= 0.01          # 0.001 N(0, I) start
  kl = kl_batchmean if reduction == "batchmean" else kl_mean
  tau = opts.temperature
  S = lambda xx: z_of(s, t["sp"], xx)
  T = lambda xx: z_of(te, t["tp"], xx)
  adv = tau ** 2 * kl(T(x_adv), S(x_adv), tau)
  nat = tau ** 2 * kl(T(x), S(x), tau)
  _close(metrics["kl_adv"], adv, 1e-9)
  _close(metrics["kl_clean"], nat, 1e-9)
  _close(loss, adv + opts.clean_weight * nat, 1e-9)


def test_advfunmatch_inner_gradient_flows_through_teacher_and_student(tiny):
  """Both networks are recomputed at x' and the ascent direction is the
  gradient of KL(T(x') || S(x')) through *both* (AdaAD's inner loss does not
  detach ``teacher_model(x_adv)``); no gradient reaches either network's
  variables."""
  t = tiny
  s, te, x = t["student"], t["teacher"], jnp.asarray(t["x"])
  obj = advfunmatch.mismatch_kl(te, s, t["sp"], t["sm"],
                                teacher_ctx(t["tp"], t["tm"]), temperature=2.0)
  direct = lambda xa, det: jnp.sum(losses.kl(
      (jax.lax.stop_gradient if det else (lambda a: a))(
          te.apply({"params": t["tp"]}, xa)),
      s.apply({"params": t["sp"]}, xa), temperature=2.0, reduction="none"))
  g, g_both, g_student = jax.jit(lambda xa: (
      jax.grad(lambda v: jnp.sum(obj(v)))(xa),
      jax.grad(lambda v: direct(v, False))(xa),
      jax.grad(lambda v: direct(v, True))(xa)))(x)
  _close(g, g_both, 1e-10)
  # ... which is not the student-only gradient (the check can fail).
  assert _norm(g - g_student) > 1e-6


# ------------------- 5. PeerAiD, ARD and IAD steps with batch norm
class TinyBN(nn.Module):
  """conv 3x3 -> BatchNorm (momentum 0.9, eps 1e-5) -> ReLU -> mean pool ->
  dense; the smallest model with batch norm."""
  num_classes: int = C
  features: int = 4

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.Conv(self.features, (3, 3), padding="SAME", name="conv",
                param_dtype=F64)(x)
    h = nn.BatchNorm(use_running_average=not train, momentum=0.9,
                     epsilon=1e-5, name="bn", param_dtype=F64)(h)
    h = nn.relu(h).mean(axis=(1, 2))
    return nn.Dense(self.num_classes, name="fc", param_dtype=F64)(h)


def bn_input(params, x):
  """The BN layer's input (the conv output) of TinyBN, directly."""
  return np.asarray(nn.Conv(params["conv"]["kernel"].shape[-1], (3, 3),
                            padding="SAME", param_dtype=F64).apply(
      {"params": params["conv"]}, jnp.asarray(x)), np.float64)


def running_stats(params, model_state, inputs):
  """TinyBN's running statistics after one train-mode pass at each of
  ``inputs`` in order: a momentum-0.9 update with the batch mean and
  *biased* variance of the BN input (NumPy)."""
  m, v = (np.asarray(model_state["batch_stats"]["bn"][k]) for k in
          ("mean", "var"))
  for xx in inputs:
    h = bn_input(params, xx)
    m, v = 0.9 * m + 0.1 * h.mean((0, 1, 2)), 0.9 * v + 0.1 * h.var((0, 1, 2))
  return m, v


def _close_stats(model_state, want, tol=1e-9):
  _close(model_state["batch_stats"]["bn"]["mean"], want[0], tol)
  _close(model_state["batch_stats"]["bn"]["var"], want[1], tol)


def _stats_differ(a, b):
  return max(np.abs(a[0] - b[0]).max(), np.abs(a[1] - b[1]).max()) > 1e-6


def test_peeraid_step_updates_student_and_peer_with_batch_norm(tiny):
  model = TinyBN()
  seeds = iter((10, 11))
  params, ms = peeraid.init_pair(lambda k: init_numpy(model, HW, next(seeds)),
                                 jax.random.key(4))
  x, y = tiny["x"], tiny["y"]
  att = AttackSpec(eps=0.1, step_size=0.05, steps=2, start="normal")
  opt = optax.sgd(0.1)
  state = TrainState.create(jax.tree.map(jnp.array, params), opt,
                            jax.random.key(6), jax.tree.map(jnp.array, ms))
  # The peer: the student's architecture (make_loss's default).
  loss_fn = peeraid.make_loss(model, attack=att, options=PEER_W)
  step = clf.jit_train_step(loss_fn, opt)
  new, metrics = step(state, {"image": x, "label": y}, None)
  assert bool(metrics["finite"]) and int(new.step) == 1
  for net in ("student", "peer"):
    assert min(_max_diff(new.params[net], params[net])) > 0, net
    assert min(_max_diff(new.model_state[net], ms[net])) > 0, net
  # The inner maximisation runs the student in eval mode: no update.
  x_adv, s_state = jax.jit(lambda: peeraid.student_adversarial(
      model, model, params, ms, jnp.asarray(x),
      jax.random.fold_in(jax.random.key(6), 0), att))()
  x_adv = np.asarray(x_adv)
  jax.tree.map(np.testing.assert_array_equal, s_state, ms["student"])
  # The loss: the reference formula on the train-mode (batch-statistics)
  # logits; the peer's one pass at x* feeds both losses, the student's two
  # passes at x* give the same logits.
  z = lambda net, xx: np.asarray(_apply_train_jit(
      model, {"params": params[net], **ms[net]}, jnp.asarray(xx)))
  sa, pa = z("student", x_adv), z("peer", x_adv)
  want = ref_peeraid(pa, sa, sa, z("student", x), y, PEER_W)
  for k, v in zip(("loss", "loss_peer", "loss_student"), want):
    np.testing.assert_allclose(float(metrics[k]), v, rtol=1e-9, atol=1e-12)
  # Running statistics as the reference's train-mode passes update them
  # (main.py:359-383): the student 3 (x*, x*, x), the peer 1 (x*).
  for net, inputs in (("student", (x_adv, x_adv, x)), ("peer", (x_adv,))):
    _close_stats(new.model_state[net], running_stats(params[net], ms[net],
                                                     inputs))
  # (The check can fail: a second peer pass at x* gives another state.)
  assert _stats_differ(running_stats(params["peer"], ms["peer"], (x_adv,)),
                       running_stats(params["peer"], ms["peer"],
                                     (x_adv, x_adv)))


def tinybn_train_logits(params, x):
  """TinyBN in train mode written out (not through Flax's BatchNorm): the
  batch mean and biased variance of the conv output over (N, H, W)."""
  c, bn, fc = params["conv"], params["bn"], params["fc"]
  h = jax.lax.conv_general_dilated(
      x, c["kernel"], (1, 1), "SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC")) + c["bias"]
  m = h.mean((0, 1, 2))
  v = ((h - m) ** 2).mean((0, 1, 2))
  h = (h - m) / jnp.sqrt(v + 1e-5) * bn["scale"] + bn["bias"]
  return jax.nn.relu(h).mean((1, 2)) @ fc["kernel"] + fc["bias"]


def _summed_ce(params, x, y):
  return -jnp.sum(jnp.take_along_axis(
      jax.nn.log_softmax(tinybn_train_logits(params, x)), y[:, None], 1))


_ce_input_grad = jax.jit(jax.grad(_summed_ce, argnums=1))


def ref_train_mode_pgd(params, x, y, att):
  """ARD's ``AttackPGD`` on a train-mode student (main.py:68-79) from a zero
  start: sign steps on the summed cross-entropy, projected to the eps-ball
  and [0, 1]. Returns the iterates ``[x_0, ..., x_K]``; the attack's
  forward passes (one running-statistic update each) run at x_0..x_{K-1}."""
  xs = [np.array(x, np.float64)]
  for _ in range(att.steps):
    g = np.asarray(_ce_input_grad(params, jnp.asarray(xs[-1]), jnp.asarray(y)))
    xn = np.clip(xs[-1] + att.step_size * np.sign(g), x - att.eps, x + att.eps)
    xs.append(np.clip(xn, 0.0, 1.0))
  return xs


# The student attacked in train mode (the ARD / IAD recipes), zero start so
# the iterates are reproducible without the attack's random draw.
ATT_BN = AttackSpec(eps=0.1, step_size=0.04, steps=3, start="zero",
                    bn_mode="train")


@pytest.fixture(scope="module")
def bn_pair(tiny):
  """A TinyBN student and a TinyBN teacher (its own variables, eval mode)."""
  model = TinyBN()
  sp, sm = init_numpy(model, HW, 20)
  tp, tm = init_numpy(model, HW, 21)
  # Flax keeps running statistics in float32; this float64 model updates
  # them in float64, so start there (the attack loop carries them).
  sm = jax.tree.map(lambda a: np.asarray(a, np.float64), sm)
  x, y = tiny["x"], tiny["y"]
  xs = ref_train_mode_pgd(sp, x, y, ATT_BN)
  assert np.abs(xs[-1] - x).max() > 0.5 * ATT_BN.eps       # the attack moved
  S = lambda xx: np.asarray(tinybn_train_logits(sp, jnp.asarray(xx)))
  T = lambda xx: z_of(model, tp, xx, tm)
  return dict(model=model, sp=sp, sm=sm, tp=tp, tm=tm, x=x, y=y, xs=xs, S=S,
              T=T, ctx=teacher_ctx(tp, tm))


def test_train_mode_ce_attack_updates_batch_norm_once_per_step(bn_pair):
  b = bn_pair
  # The written-out train-mode forward is Flax's.
  _close(b["S"](b["x"]), _apply_train_jit(b["model"], {"params": b["sp"],
                                                       **b["sm"]},
                                          jnp.asarray(b["x"])), 1e-10)
  x_adv, new_ms = _ce_attack_jit(b["model"], b["sp"], b["sm"],
                                 jnp.asarray(b["x"]), jnp.asarray(b["y"]),
                                 jax.random.key(0), ATT_BN)
  _close(x_adv, b["xs"][-1], 1e-12)
  _close_stats(new_ms, running_stats(b["sp"], b["sm"], b["xs"][:-1]))
  # In eval mode the running statistics are read, never written.
  _, eval_ms = _ce_attack_jit(b["model"], b["sp"], b["sm"], jnp.asarray(b["x"]),
                              jnp.asarray(b["y"]), jax.random.key(0),
                              ATT_BN.replace(bn_mode="eval"))
  jax.tree.map(np.testing.assert_array_equal, eval_ms, b["sm"])


def test_ard_step_with_train_mode_attack_updates_batch_norm(bn_pair):
  """ARD (main.py:68-79, 121-123): K attack passes, then S(x') and S(x), all
  in train mode: K + 2 running-statistic updates per step."""
  b = bn_pair
  opts = ard.Options(alpha=0.8, temperature=5.0)
  fn = jax.jit(ard.make_loss(b["model"], teacher=b["model"], attack=ATT_BN,
                             options=opts))
  x, y, xs = b["x"], b["y"], b["xs"]
  loss, (metrics, new_ms) = fn(b["sp"], b["sm"], {"image": x, "label": y},
                               jax.random.key(1), b["ctx"])
  S, T = b["S"], b["T"]
  want = ref_ard(S(xs[-1]), S(x), T(x), y, opts.alpha, opts.temperature)
  np.testing.assert_allclose(float(loss), want, rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(float(metrics["ce"]), np_ce(S(x), y), rtol=1e-9)
  ref = running_stats(b["sp"], b["sm"], xs[:-1] + [xs[-1], x])
  _close_stats(new_ms, ref)
  # The check can fail: discarding the attack's updates gives other
  # statistics.
  assert _stats_differ(ref, running_stats(b["sp"], b["sm"], [xs[-1], x]))


def test_iad_step_batch_norm_passes_before_and_after_begin_epoch(bn_pair):
  """IAD-I (IAD-I.py:95-106, 164-178): K attack passes, S(x'), a discarded
  S(x') (``basicop``), S(x), and from the begin epoch on S(x) once more."""
  b = bn_pair
  opts = iad.Options(temperature=2.0, beta=0.1, begin_epoch=1)
  fn = jax.jit(iad.make_loss(b["model"], teacher=b["model"], attack=ATT_BN,
                             options=opts))
  x, y, xs = b["x"], b["y"], b["xs"]
  S, T = b["S"], b["T"]
  results = {}
  for epoch in (0, 1, 3):
    loss, (metrics, new_ms) = fn(b["sp"], b["sm"],
                                 {"image": x, "label": y,
                                  "epoch": np.int32(epoch)},
                                 jax.random.key(1), b["ctx"])
    want = ref_iad(S(xs[-1]), S(x), T(x), T(xs[-1]), y, epoch,
                   opts.begin_epoch, opts.temperature, opts.beta)
    np.testing.assert_allclose(float(loss), want, rtol=1e-9, atol=1e-12)
    passes = xs[:-1] + [xs[-1], xs[-1], x] + ([x] if epoch >= 1 else [])
    ref = running_stats(b["sp"], b["sm"], passes)
    _close_stats(new_ms, ref)
    results[epoch] = (float(loss), ref)
  assert results[0][0] < results[1][0] == results[3][0]   # introspection on
  assert _stats_differ(results[0][1], results[1][1])      # one S(x) more


# ------------------------------------- 6. SWA and batch-norm re-estimation
def test_swa_update_is_the_equal_weight_average():
  rng = np.random.default_rng(0)
  snaps = [{"a": rng.standard_normal((3, 4)), "b": {"c": rng.standard_normal(5)}}
           for _ in range(5)]
  # fit() starts from a copy of the parameters with count 0: the first update
  # replaces it.
  swa = jax.tree.map(lambda a: a + 100.0, snaps[0])
  for k, p in enumerate(snaps):
    swa = clf.swa_update(swa, p, jnp.asarray(k))
    want = jax.tree.map(lambda *a: np.mean(a, axis=0), *snaps[:k + 1])
    jax.tree.map(lambda g, w: _close(g, w, 1e-12), swa, want)


def test_bn_reestimate_is_the_cumulative_average_of_batch_statistics():
  """Asserts Flax's convention: the average over batches of each batch's mean
  and *biased* variance of the BN input. ``torch.optim.swa_utils.update_bn``
  averages the same means and the *unbiased* variances (n / (n - 1) with n =
  B * H * W per channel, equal for equal batch sizes): checked when torch is
  installed."""
  model = TinyBN()
  params, ms = init_numpy(model, (6, 6, 2), 7)
  rng = np.random.default_rng(1)
  batches = [rng.uniform(0, 1, (8, 6, 6, 2)) for _ in range(3)]
  new = clf.bn_reestimate(model, params, ms, batches)
  hs = [bn_input(params, xb) for xb in batches]
  want_m = np.mean([h.mean((0, 1, 2)) for h in hs], 0)
  want_v = np.mean([h.var((0, 1, 2)) for h in hs], 0)        # biased
  got = new["batch_stats"]["bn"]
  _close(got["mean"], want_m, 1e-10)
  _close(got["var"], want_v, 1e-10)
  # Not the statistics of the pooled data (a different, wrong average).
  pooled_v = np.concatenate(hs).var((0, 1, 2))
  assert np.abs(pooled_v - want_v).max() > 1e-6
  # The old running statistics are discarded.
  assert np.abs(np.asarray(ms["batch_stats"]["bn"]["mean"]) - want_m).max() > 1e-3

  torch = pytest.importorskip("torch")
  tn = torch.nn
  net = tn.Sequential(tn.Conv2d(2, 4, 3, padding=1), tn.BatchNorm2d(4)).double()
  with torch.no_grad():
    net[0].weight.copy_(torch.tensor(np.transpose(
        np.asarray(params["conv"]["kernel"]), (3, 2, 0, 1))))
    net[0].bias.copy_(torch.tensor(np.asarray(params["conv"]["bias"])))
    net[1].running_mean.fill_(3.0)
  loader = [torch.tensor(np.transpose(xb, (0, 3, 1, 2))) for xb in batches]
  torch.optim.swa_utils.update_bn(loader, net)
  n = 8 * 6 * 6
  _close(net[1].running_mean.numpy(), want_m, 1e-10)
  _close(net[1].running_var.numpy(), want_v * n / (n - 1), 1e-10)


# ------------------------------- 7. the teacher stays out of checkpoints
def _shapes(tree):
  return {tuple(np.shape(l)) for l in jax.tree.leaves(tree)}


def _teacher_only_shapes(teacher_params, student_params):
  only = _shapes(teacher_params) - _shapes(student_params)
  assert len(only) >= 4
  return only


def test_fit_checkpoints_hold_no_teacher(tiny, tmp_path):
  """``fit`` with a KD step (teacher in ctx), EMA, SWA and model selection:
  neither checkpoints/ nor best/ holds a teacher array."""
  from tsjax.train.fit import fit
  t = tiny
  ctx = teacher_ctx(jax.tree.map(jnp.asarray, t["tp"]), t["tm"])
  state = TrainState.create(jax.tree.map(jnp.array, t["sp"]), OPT,
                            jax.random.key(0), t["sm"])
  batch = {"image": t["x"], "label": t["y"], "epoch": np.int32(0)}
  out = fit(workdir=str(tmp_path), state=state, step_fn=jitted_step("kd", t),
            train_batches=lambda e: [batch], epochs=2, steps_per_epoch=1,
            evaluate_fn=lambda p, m: {"acc": 0.5}, select_metric="acc",
            ctx=ctx, ema_decay=0.5, swa_start_epoch=0, bn_batches=lambda epoch: [],
            model=t["student"], progress=False)
  assert out["best"]["epoch"] == 1 and int(out["swa"]["count"]) == 2
  ckpt = CheckpointStore(str(tmp_path / "checkpoints")).restore_raw()
  best = CheckpointStore(str(tmp_path / "best"), max_to_keep=1).restore_raw()
  assert set(ckpt) == {"state", "ema", "swa", "best_metric", "best_epoch",
                       "swa_best_metric", "swa_best_epoch"}
  assert set(ckpt["state"]) == {"params", "model_state", "opt_state", "step",
                                "key"}
  assert set(best) == {"params"} | ({"model_state"} if "model_state" in best
                                    else set())
  teacher_only = _teacher_only_shapes(t["tp"], t["sp"])
  for tree in (ckpt, best):
    assert not (_shapes(tree) & teacher_only)
  for tree in (ckpt["state"]["params"], ckpt["ema"], ckpt["swa"]["params"],
               best["params"]):
    assert jax.tree.structure(jax.tree.map(np.asarray, tree)) == \
        jax.tree.structure(t["sp"])


def _distill_config(arg, teacher_dir=None):
  from tsjax.configs import distill as dcfg
  c = dcfg.get_config(arg)
  c.data.train_subset, c.data.num_val, c.data.test_subset = 192, 64, 50
  c.train.batch_size, c.eval.val_subset = 32, 64
  if teacher_dir is not None:
    c.teacher.checkpoint = teacher_dir
  return c


def _set(config, path, value):
  *parents, leaf = path.split(".")
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = value
  return config


TEACHER = "<teacher dir>"
CONFIG_ERRORS = [   # (variant, edits, field named in the error)
    ("kd,fashion_mnist,smoke", {}, "teacher.checkpoint"),
    ("rslad,fashion_mnist,smoke", {"teacher.checkpoint": "nowhere"},
     "teacher.checkpoint"),
    ("ard,fashion_mnist,smoke", {"teacher.checkpoint": "not_a_run"},
     "teacher.checkpoint"),
    ("kd,fashion_mnist,smoke", {"teacher.checkpoint": TEACHER,
                                "teacher.torch_checkpoint": "/x.pt"},
     "teacher.checkpoint"),
    ("iad,fashion_mnist,smoke", {"teacher.torch_checkpoint": "/nowhere.pt"},
     "teacher.torch_checkpoint"),
    ("kd,fashion_mnist,smoke", {"teacher.checkpoint": TEACHER,
                                "method.options.temperature": -4.0},
     "method.options.temperature"),
    ("funmatch,fashion_mnist,smoke", {"teacher.checkpoint": TEACHER,
                                      "method.options.temperature": 0.0},
     "method.options.temperature"),
    ("peeraid,fashion_mnist,smoke", {"method.options.tau_p": -1.0},
     "method.options.tau_p"),
    ("ard,fashion_mnist,smoke", {"teacher.checkpoint": TEACHER,
                                 "method.options.alpha": 1.5},
     "method.options.alpha"),
    ("kd,fashion_mnist,smoke", {"teacher.checkpoint": TEACHER,
                                "method.options.reduction": "avg"},
     "method.options.reduction"),
    ("iad,fashion_mnist,smoke", {"teacher.checkpoint": TEACHER,
                                 "teacher.which": "first"}, "teacher.which"),
]


@pytest.mark.parametrize("arg,edits,field", CONFIG_ERRORS)
def test_config_errors_before_compiling(arg, edits, field, tmp_path):
  from experiments import distill
  teacher = tmp_path / "teacher"
  teacher.mkdir()
  (teacher / "config.json").write_text("{}")
  (tmp_path / "not_a_run").mkdir()
  c = _distill_config(arg)
  for path, value in edits.items():
    if value == TEACHER:
      value = str(teacher)
    elif value in ("nowhere", "not_a_run"):
      value = str(tmp_path / value)
    _set(c, path, value)
  workdir = tmp_path / "work"
  with compile_events() as events:
    with pytest.raises(cc.ConfigError, match=re.escape(f"'{field}'")):
      distill.run(c, str(workdir), progress=False)
  assert not events, f"compiled/traced before raising: {events}"
  assert not workdir.exists()


def test_peeraid_needs_no_teacher():
  from experiments import train
  with compile_events() as events:
    train.validate(_distill_config("peeraid,fashion_mnist,smoke"))
  assert not events


def test_registry_records_of_the_distillation_methods():
  """Every distillation method is one registered record with the shared
  ``make_loss(model, *, teacher, attack, options)``; the configs build its
  ``Options`` (errors naming ``method.options.FIELD``)."""
  modules = {"kd": kd, "ard": ard, "rslad": rslad, "iad": iad,
             "funmatch": funmatch, "advfunmatch": advfunmatch,
             "peeraid": peeraid}
  for name, module in modules.items():
    m = methods.REGISTRY[name]
    assert m.make_loss is module.make_loss and m.options is module.Options
    assert m.needs_teacher == (name != "peeraid")
    assert m.uses_attack == (name not in ("kd", "funmatch"))
    c = _distill_config(f"{name},fashion_mnist,smoke")
    assert m.build_options(c.method.options) == module.Options(
        **c.method.options.to_dict())
  assert methods.REGISTRY["peeraid"].view is peeraid.student_view
  assert methods.REGISTRY["peeraid"].init is peeraid.init_pair
  with pytest.raises(cc.ConfigError, match="'method.options.alpha'"):
    methods.REGISTRY["kd"].build_options({"alpha": 2.0})
  with pytest.raises(cc.ConfigError, match="'method.options.gamma'"):
    methods.REGISTRY["peeraid"].build_options({"gamma": 1.0})


FMNIST = os.path.isdir("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
  """experiments.train (PGD-AT teacher), then experiments.distill KD and
  PeerAiD on the smoke configs, shrunk (~1.5-2 min on 2 busy cores)."""
  from tsjax.configs import adv_train
  from experiments import distill, train
  root = tmp_path_factory.mktemp("distill_e2e")
  tc = adv_train.get_config("fashion_mnist,pgd_at,smoke")
  tc.data.train_subset, tc.data.num_val, tc.data.test_subset = 192, 64, 50
  tc.train.batch_size, tc.eval.val_subset = 32, 64
  tc.train.epochs, tc.train.boundaries = 1, ()
  teacher_dir = str(root / "teacher")
  train.run(tc, teacher_dir, progress=False)
  teacher_best = CheckpointStore(os.path.join(teacher_dir, "best"),
                                 max_to_keep=1).restore_raw()
  out = {"root": root, "teacher": teacher_dir,
         "teacher_best": jax.tree.map(np.asarray, teacher_best)}
  c = _distill_config("kd,fashion_mnist,smoke", teacher_dir)
  c.train.epochs, c.train.boundaries = 1, ()
  out["kd"] = distill.run(c, str(root / "kd"), progress=False)
  c = _distill_config("peeraid,fashion_mnist,smoke")
  out["peeraid"] = distill.run(c, str(root / "peeraid"), progress=False)
  return out


@pytest.mark.slow
@pytest.mark.skipif(not FMNIST, reason="needs Fashion-MNIST")
def test_e2e_kd_checkpoints_hold_no_teacher(e2e):
  from tsjax.train.teachers import load_run
  t_params = e2e["teacher_best"]["params"]
  kd_dir = str(e2e["root"] / "kd")
  ckpt = CheckpointStore(os.path.join(kd_dir, "checkpoints")).restore_raw()
  best = CheckpointStore(os.path.join(kd_dir, "best"),
                         max_to_keep=1).restore_raw()
  student = e2e["kd"]["fit"]["state"].params
  assert "state" in ckpt and set(ckpt) <= {"state", "ema", "swa",
                                           "best_metric", "best_epoch"}
  teacher_only = _teacher_only_shapes(t_params, student)
  for tree in (ckpt, best):
    assert not (_shapes(tree) & teacher_only)
  assert jax.tree.structure(jax.tree.map(np.asarray, ckpt["state"]["params"])) \
      == jax.tree.structure(jax.tree.map(np.asarray, student))
  # The teacher's own run is untouched.
  now = CheckpointStore(os.path.join(e2e["teacher"], "best"),
                        max_to_keep=1).restore_raw()
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, now),
               e2e["teacher_best"])
  model, params, _, cfg = load_run(kd_dir, "best")
  assert cfg.method.name == "kd" and _shapes(params) == _shapes(student)
  assert e2e["kd"]["summary"]["results"]["last"]["num_test"] == 50


@pytest.mark.slow
@pytest.mark.skipif(not FMNIST, reason="needs Fashion-MNIST")
def test_e2e_peeraid_best_and_swa_are_the_student(e2e):
  from tsjax.train.teachers import load_run
  d = str(e2e["root"] / "peeraid")
  state = e2e["peeraid"]["fit"]["state"]
  assert set(state.params) == {"student", "peer"}
  ckpt = CheckpointStore(os.path.join(d, "checkpoints")).restore_raw()
  assert set(ckpt["state"]["params"]) == {"student", "peer"}   # training state
  best = CheckpointStore(os.path.join(d, "best"), max_to_keep=1).restore_raw()
  student_struct = jax.tree.structure(jax.tree.map(np.asarray,
                                                   state.params["student"]))
  assert jax.tree.structure(jax.tree.map(np.asarray, best["params"])) == \
      student_struct
  assert jax.tree.structure(jax.tree.map(np.asarray, ckpt["swa"]["params"])) \
      == student_struct and int(ckpt["swa"]["count"]) == 1
  x = np.random.default_rng(0).uniform(0, 1, (4, 28, 28, 1)).astype(np.float32)
  for which in ("best", "last", "swa"):
    model, params, ms, _ = load_run(d, which)
    assert jax.tree.structure(jax.tree.map(np.asarray, params)) == \
        student_struct
    assert np.isfinite(np.asarray(model.apply({"params": params, **ms},
                                              x))).all()
  _, last, _, _ = load_run(d, "last")
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, last),
               jax.tree.map(np.asarray, state.params["student"]))
  assert set(e2e["peeraid"]["summary"]["results"]) >= {"last", "best", "swa"}


# --------------------------------- 8. a teacher from a PyTorch state dict
def test_load_teacher_from_pytorch_state_dict_npz(tmp_path):
  torch = pytest.importorskip("torch")
  from tsjax.models import compute_sha256, save_state_dict_npz
  from tsjax.train.teachers import load_teacher
  F = torch.nn.functional
  rng = np.random.default_rng(0)
  sd = {"conv1.weight": (4, 1, 3, 3), "conv1.bias": (4,),
        "conv2.weight": (8, 4, 3, 3), "conv2.bias": (8,),
        "fc1.weight": (16, 8 * 2 * 2), "fc1.bias": (16,),
        "fc.weight": (C, 16), "fc.bias": (C,)}
  sd = {k: (0.5 * rng.standard_normal(s)).astype(np.float32)
        for k, s in sd.items()}
  path = tmp_path / "teacher.npz"
  save_state_dict_npz(sd, path)
  tcfg = ml_collections.ConfigDict({
      "checkpoint": None, "torch_checkpoint": str(path),
      "sha256": compute_sha256(path),
      "model": {"name": "small_cnn",
                "kwargs": {"features": (4, 8), "hidden": 16}}})
  mean, std = (0.25,), (0.5,)
  model, params, ms = load_teacher(tcfg, num_classes=C, mean=mean, std=std,
                                   input_shape=HW)
  x = rng.uniform(0, 1, (B, *HW)).astype(np.float32)
  got = np.asarray(teacher_logits(model, teacher_ctx(params, ms),
                                  jnp.asarray(x)))
  w = {k: torch.tensor(v) for k, v in sd.items()}
  h = (torch.tensor(np.transpose(x, (0, 3, 1, 2))) - mean[0]) / std[0]
  h = F.max_pool2d(F.relu(F.conv2d(h, w["conv1.weight"], w["conv1.bias"],
                                   padding=1)), 2)
  h = F.max_pool2d(F.relu(F.conv2d(h, w["conv2.weight"], w["conv2.bias"],
                                   padding=1)), 2)
  h = F.relu(F.linear(torch.flatten(h, 1), w["fc1.weight"], w["fc1.bias"]))
  want = F.linear(h, w["fc.weight"], w["fc.bias"]).numpy()
  assert np.abs(want).max() > 0.1
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  tcfg.sha256 = "0" * 64
  with pytest.raises(ValueError, match="sha256|SHA-256|checksum"):
    load_teacher(tcfg, num_classes=C, mean=mean, std=std, input_shape=HW)
  tcfg.sha256 = ""
  with pytest.raises(ValueError, match="classes|fc"):
    load_teacher(tcfg, num_classes=3, mean=mean, std=std, input_shape=HW)


def test_bn_free_students_unchanged_by_bn_mode_changes():
  """The recipes change moved ARD's and IAD's attacks to train mode (batch
  statistics updated at every step). For a student without batch norm (the
  small CNN of experiments/results/fashion_mnist_distill.md) that must change
  nothing: the same loss and gradient, bit for bit, in either mode; for a
  network with batch norm it does change (``bn_pair`` tests above)."""
  model = models.get_model("small_cnn", num_classes=10, features=(4, 8),
                           hidden=16)
  x = jax.random.uniform(jax.random.key(0), (4, 8, 8, 1))
  y = jnp.arange(4) % 10
  params = model.init(jax.random.key(1), x)["params"]
  ctx = teacher_ctx(model.init(jax.random.key(2), x)["params"], {})
  batch = {"image": x, "label": y, "epoch": np.int32(2)}
  att = AttackSpec(eps=0.1, step_size=0.05, steps=1)
  for mod, opts in ((ard, ard.Options()), (iad, iad.Options(begin_epoch=1))):
    grads = []
    for mode in ("train", "eval"):
      fn = mod.make_loss(model, teacher=model,
                         attack=att.replace(bn_mode=mode), options=opts)
      grads.append(jax.jit(jax.grad(lambda p: fn(p, {}, batch,
                                                 jax.random.key(3), ctx)[0]))(
          params))
    jax.tree.map(np.testing.assert_array_equal, *grads)
