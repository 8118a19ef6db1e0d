"""The AutoAttack ensemble: cascade bookkeeping, versions, sanity checks,
resume, and the evaluate command."""

import json
import os
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tsjax.attacks import autoattack as aa
from tsjax.attacks import pgd
from tsjax.attacks import square as sq
from tsjax import losses
from tsjax.data import images
from tsjax.methods.common import ModelLogits

from reference_models import (flax_logits_fn, fmnist_reference, to_torch_images,
                              torch_model)

pytestmark = pytest.mark.skipif(
    not os.path.isdir(images.DEFAULT_FASHION_MNIST_DIR),
    reason=f"needs `{images.FASHION_MNIST_APT}`")


@pytest.fixture(scope="module")
def ref():
  model, params, x, y = fmnist_reference(n_test=120)
  return flax_logits_fn(model, params), x, y


FAST = dict(steps=10, batch_size=64)


def test_cascade_is_monotone_and_within_threat_model(ref):
  f, x, y = ref
  eps = 0.05
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", aa.AutoAttackWarning)
    out = aa.autoattack(f, x, y, jax.random.key(0), eps=eps,
                        attacks=("apgd-ce", "apgd-t", "square"), **FAST)
  accs = [out["clean_acc"], *out["robust_acc_after"].values()]
  assert all(a >= b for a, b in zip(accs, accs[1:]))
  assert out["robust_acc"] == accs[-1]
  d = (out["x_adv"] - x).reshape(len(x), -1)
  assert np.abs(d).max() <= eps + 1e-6
  assert out["x_adv"].min() >= 0 and out["x_adv"].max() <= 1
  pred = np.asarray(f(jnp.asarray(out["x_adv"]))).argmax(-1)
  np.testing.assert_array_equal(pred == y, out["robust"])
  # AutoAttack is at least as strong as PGD-20 on the same points.
  xp = pgd(lambda z: losses.cross_entropy(f(z), jnp.asarray(y)), jnp.asarray(x),
           jax.random.key(1), eps=eps, step_size=eps / 8, steps=20,
           bounds=(0.0, 1.0))
  pgd_acc = float(np.mean(np.asarray(f(xp)).argmax(-1) == y))
  assert out["robust_acc"] <= pgd_acc


def test_same_key_same_result_and_huge_eps(ref):
  f, x, y = ref
  kw = dict(eps=0.03, attacks=("apgd-ce", "square"), checks=False, **FAST)
  a = aa.autoattack(f, x[:40], y[:40], jax.random.key(3), **kw)
  b = aa.autoattack(f, x[:40], y[:40], jax.random.key(3), **kw)
  np.testing.assert_array_equal(a["x_adv"], b["x_adv"])
  big = aa.autoattack(f, x[:40], y[:40], jax.random.key(3), eps=1.0,
                      attacks=("apgd-ce",), checks=False, **FAST)
  assert big["robust_acc"] == 0.0


def test_params_argument_reuses_compiled_attacks_and_equals_closure():
  """With the model passed as ``ModelLogits`` and its parameters as
  ``params``, a second evaluation of other parameters of an equal model
  compiles nothing new and gives what the closure path gives."""
  model, params, x, y = fmnist_reference(n_test=120)
  x, y = x[:64], y[:64]
  kw = dict(eps=0.05, attacks=("apgd-ce", "fab-t"), checks=False,
            steps=10, batch_size=64)
  mf = ModelLogits(model)
  first = aa.autoattack(mf, x, y, jax.random.key(4), params=(params, {}),
                        **kw)
  compiled = {k: v._cache_size() for k, v in aa._COMPILED.items()
              if k[0] == mf}
  assert len(compiled) == 3 and all(n >= 1 for n in compiled.values())
  other = jax.tree.map(lambda p: 1.5 * p, params)   # other predictions
  second = aa.autoattack(ModelLogits(type(model)()), x, y, jax.random.key(4),
                         params=(other, {}), **kw)
  assert {k: v._cache_size() for k, v in aa._COMPILED.items()
          if k[0] == mf} == compiled
  closure = aa.autoattack(flax_logits_fn(model, other), x, y,
                          jax.random.key(4), **kw)
  assert second["robust_acc_after"] == closure["robust_acc_after"]
  np.testing.assert_array_equal(second["robust"], closure["robust"])
  np.testing.assert_allclose(second["x_adv"], closure["x_adv"], atol=1e-5)
  assert not np.array_equal(first["x_adv"], second["x_adv"])


def test_rand_version_with_model_logits():
  """``version="rand"`` with ``ModelLogits`` (which takes no random draw of
  its own; the EOT wrapper passes one per draw) runs APGD-CE -> APGD-DLR
  with EOT, and since the model is deterministic its EOT average (mean of
  20 equal log-softmaxes) gives what the plain attack gives: the same robust
  accuracy after APGD-CE as ``attacks=("apgd-ce",)`` with the same key."""
  model, params, x, y = fmnist_reference(n_test=120)
  x, y = x[:32], y[:32]
  kw = dict(eps=0.05, steps=5, batch_size=32)
  mf = ModelLogits(model)
  with warnings.catch_warnings():
    warnings.simplefilter("error", aa.AutoAttackWarning)   # checks pass
    out = aa.autoattack(mf, x, y, jax.random.key(6), version="rand",
                        params=(params, {}), **kw)
  assert tuple(out["robust_acc_after"]) == aa.VERSIONS["rand"]
  accs = [out["clean_acc"], *out["robust_acc_after"].values()]
  assert all(a >= b for a, b in zip(accs, accs[1:]))
  assert out["robust_acc"] < out["clean_acc"] - 0.1    # the attacks bite
  d = np.abs(out["x_adv"] - x).reshape(len(x), -1).max(1)
  assert d.max() <= 0.05 + 1e-6
  f = flax_logits_fn(model, params)
  pred = np.asarray(f(jnp.asarray(out["x_adv"]))).argmax(-1)
  np.testing.assert_array_equal(pred == y, out["robust"])
  plain = aa.autoattack(mf, x, y, jax.random.key(6), attacks=("apgd-ce",),
                        params=(params, {}), checks=False, **kw)
  assert out["robust_acc_after"]["apgd-ce"] == plain["robust_acc"]


def test_square_runs_with_the_ensembles_p_schedule(monkeypatch):
  """AutoAttack builds Square as the reference ensemble does
  (``SquareAttack(..., n_queries=5000, resc_schedule=False)``): its Square
  runs with the square sides of the p schedule *not* rescaled to the 5000
  queries; ``square`` on its own rescales (the reference class default;
  traced only)."""
  calls = []
  real = sq.square_sizes

  def spy(n_queries, p_init, shape, norm, rescale=True):
    calls.append((int(n_queries), float(p_init), bool(rescale)))
    return real(n_queries, p_init, shape, norm, rescale)
  monkeypatch.setattr(sq, "square_sizes", spy)
  w = jnp.asarray(np.random.default_rng(0).normal(size=(16, 3)), jnp.float32)
  f = lambda z: z.reshape(len(z), -1) @ w
  x = np.random.default_rng(1).uniform(size=(8, 4, 4, 1)).astype(np.float32)
  y = np.asarray(f(jnp.asarray(x))).argmax(-1).astype(np.int32)  # all correct
  aa.autoattack(f, x, y, jax.random.key(0), eps=0.3, attacks=("square",),
                checks=False, batch_size=8)
  assert calls == [(5000, 0.8, False)]
  calls.clear()
  jax.eval_shape(lambda k: sq.square(f, jnp.asarray(x), jnp.asarray(y), k,
                                     eps=0.3, queries=20), jax.random.key(0))
  assert calls == [(20, 0.8, True)]
  assert all(s["square_resc_schedule"] is False
             for s in (aa._settings(v, 10) for v in aa.VERSIONS))


def test_resume_after_interruption(ref, tmp_path, monkeypatch):
  f, x, y = ref
  kw = dict(eps=0.05, attacks=("apgd-ce", "apgd-dlr"), checks=False,
            steps=10, batch_size=32, state_dir=str(tmp_path))
  full = aa.autoattack(f, x, y, jax.random.key(5), **kw)
  for p in tmp_path.iterdir():
    p.unlink()
  real_save = aa._Progress.save

  def save_then_die(self, **arrays):
    real_save(self, **arrays)
    if int(arrays["attack"]) == 1 and int(arrays["batch"]) == 1:
      raise KeyboardInterrupt("killed after the first batch of apgd-dlr")
  monkeypatch.setattr(aa._Progress, "save", save_then_die)
  with pytest.raises(KeyboardInterrupt):
    aa.autoattack(f, x, y, jax.random.key(5), **kw)
  monkeypatch.setattr(aa._Progress, "save", real_save)
  saved = np.load(next(tmp_path.glob("*.npz")))
  assert int(saved["attack"]) == 1 and int(saved["batch"]) >= 1
  resumed = aa.autoattack(f, x, y, jax.random.key(5), **kw)
  np.testing.assert_array_equal(resumed["robust"], full["robust"])
  np.testing.assert_array_equal(resumed["x_adv"], full["x_adv"])
  assert resumed["robust_acc_after"] == full["robust_acc_after"]


def test_sanity_checks_warn(ref):
  f, x, y = ref
  probs = lambda z: jax.nn.softmax(f(z))
  with pytest.warns(aa.AutoAttackWarning, match="probabilities"):
    aa.sanity_checks(probs, x, y, 10, ("apgd-ce",))
  masked = lambda z: f(jax.lax.stop_gradient(z))
  with pytest.warns(aa.AutoAttackWarning, match="zero input gradient"):
    aa.sanity_checks(masked, x, y, 10, ("apgd-ce",))
  with pytest.warns(aa.AutoAttackWarning, match="only 4 classes"):
    aa.sanity_checks(lambda z: f(z)[:, :4], x, y % 4, 4, ("apgd-t",))
  counter = {"i": 0}
  def noisy(z):
    counter["i"] += 1
    return f(z) + 0.1 * counter["i"]
  with pytest.warns(aa.AutoAttackWarning, match="not deterministic"):
    aa.sanity_checks(noisy, x, y, 10, ("apgd-ce",))
  with warnings.catch_warnings():
    warnings.simplefilter("error", aa.AutoAttackWarning)
    assert aa.sanity_checks(f, x, y, 10, ("apgd-ce",)) == []


def test_bad_arguments():
  f = lambda z: z.reshape(len(z), -1)[:, :3]
  x, y = np.zeros((2, 2, 2, 1), np.float32), np.zeros(2, np.int32)
  with pytest.raises(ValueError, match="version"):
    aa.autoattack(f, x, y, jax.random.key(0), eps=0.1, version="fast")
  with pytest.raises(ValueError, match="unknown attack"):
    aa.autoattack(f, x, y, jax.random.key(0), eps=0.1, attacks=("cw",))
  with pytest.raises(ValueError, match="eps"):
    aa.autoattack(f, x, y, jax.random.key(0), eps=-1.0)


def test_evaluate_command(tmp_path):
  from tsjax.configs.adv_train import get_config
  from tsjax.configs.evaluate import get_config as eval_config
  from experiments import evaluate, train
  c = get_config("fashion_mnist,pgd_at,smoke")
  c.data.train_subset, c.data.num_val, c.train.epochs = 128, 32, 1
  c.train.batch_size, c.eval.val_subset = 32, 32
  c.train.boundaries = ()
  train.run(c, str(tmp_path / "run"), progress=False)
  e = eval_config("smoke")
  e.checkpoint = str(tmp_path / "run")
  e.subset = 37                     # not a multiple of the batch size (32)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", aa.AutoAttackWarning)
    out = evaluate.run(e, str(tmp_path / "eval"), progress=False)
  r = out["results"]
  assert r["num_examples"] == 37 and r["autoattack/num_examples"] == 37
  for k in ("clean/acc", "fgsm/acc", "pgd3/acc", "cw/acc", "autoattack/acc"):
    assert 0.0 <= r[k] <= 1.0
  assert r["autoattack/acc"] <= r["clean/acc"]
  saved = json.load(open(tmp_path / "eval" / "eval.json"))
  assert saved["results"]["autoattack/acc"] == r["autoattack/acc"]
  assert saved["eps"] == c.eval.eps        # eps None: the training config's
  assert saved["provenance"]["jax"] == jax.__version__
  e.subset = 36                  # the same work dir, another config: refused
  with pytest.raises(ValueError, match="holds a run made with a different"):
    evaluate.run(e, str(tmp_path / "eval"), progress=False)
  assert (tmp_path / "eval" / "eval.md").read_text().startswith("# ")
  e2 = eval_config("smoke")
  e2.checkpoint = str(tmp_path / "nothing")
  with pytest.raises(ValueError, match="config field 'checkpoint'.*no "
                     "config.json"):
    evaluate.run(e2, str(tmp_path / "e2"), progress=False)


# --------------------------------------------------------------------------
# Cross-check of the whole ensemble against torchattacks.AutoAttack (slow).
#
# How torchattacks 3.5.1's AutoAttack differs from the reference
# (fra31/auto-attack) and from tsjax, read from its source:
#
# * Its "standard" version builds APGD, APGDT, FAB(multi_targeted) and Square
#   with their own constructor defaults, so APGD-CE, APGD-T and FAB-T run
#   **10 iterations**, not the reference's 100 (Square: 5000 queries, p_init
#   0.8, 1 restart; APGD-T / FAB-T: n_classes - 1 = 9 targets, as in the
#   reference). The as-shipped comparison therefore runs tsjax with
#   ``steps=10``; the 100-iteration test sets the torchattacks sub-attacks'
#   ``steps`` to 100 (the attribute every one of them reads in ``perturb``).
# * Its cascade (``MultiAttack``) hands every attack all points not yet
#   broken, *including* the points the model misclassifies without attack;
#   APGD (the first) returns those unchanged, so they count as broken after
#   the first attack, as the reference's clean-accuracy step (and tsjax's)
#   counts them. The whole remaining set is one batch (tsjax: batches of
#   at most ``batch_size``, each attack's padded to a power of two).
# * It does not itself check the threat model (the sub-attacks project / clip
#   and FAB keeps only points within eps); the test checks that both outputs
#   lie in the eps-ball and the box.
# * Per-attack robust accuracy is not part of its public API: ``MultiAttack``
#   counts the points still correctly classified after each attack in
#   ``_multi_atk_records`` (what its ``save(..., return_verbose=True)``
#   reports as success rates); the test switches that counting on and reads it.
# * Its Square keeps the ``Square`` class default ``resc_schedule=True`` (p
#   schedule stretched to the 5000 queries), while the reference ensemble
#   builds ``SquareAttack(..., resc_schedule=False)`` (fra31/auto-attack
#   autoattack.py), as tsjax does: the comparison sets it to False.
# * Randomness (starts, Square's squares) is torch's and JAX's: equal seeds do
#   not give equal draws, so only accuracies are compared, not points.


def _torchattacks_autoattack(torch, torchattacks, net, xt, yt, eps, steps,
                             n_attacks=4):
  """torchattacks' standard AutoAttack (Square with the reference
  ensemble's ``resc_schedule=False``), its cascade cut to the first
  ``n_attacks`` attacks; (x_adv, robust acc after each of them)."""
  atk = torchattacks.AutoAttack(net, norm="Linf", eps=eps, version="standard",
                                n_classes=10, seed=0)
  multi = atk._autoattack
  square_atk = multi.attacks[3]
  assert square_atk.rescale_schedule       # torchattacks' default, see above
  square_atk.rescale_schedule = False
  if steps is not None:
    for sub in multi.attacks[:3]:          # APGD, APGDT, FAB
      assert sub.steps == 10               # its default, changed here
      sub.steps = steps
  multi.attacks = multi.attacks[:n_attacks]
  multi._accumulate_multi_atk_records = True
  multi._multi_atk_records = [0.0] * (1 + len(multi.attacks))
  xa = atk(xt, yt)
  rec = multi._multi_atk_records
  n = len(yt)
  assert rec[0] == n
  # (Entries of attacks skipped because nothing was left stay 0.)
  return xa.detach(), [r / n for r in rec[1:]]


def _compare_with_torchattacks(cases, n, capsys, title):
  torch = pytest.importorskip("torch")
  torchattacks = pytest.importorskip("torchattacks")
  model, params, x, y = fmnist_reference()        # n_test = 500
  x, y = x[:n], np.asarray(y[:n])
  f = flax_logits_fn(model, params)
  net = torch_model(params)
  xt, yt = to_torch_images(x), torch.from_numpy(y).long()
  threads = torch.get_num_threads()
  torch.set_num_threads(1)    # 2 busy threads on a shared 2-core CPU crawl
  rows = []
  try:
    for eps, steps in cases:
      t0 = time.time()
      with warnings.catch_warnings():
        warnings.simplefilter("ignore", aa.AutoAttackWarning)
        out = aa.autoattack(f, x, y, jax.random.key(0), norm="linf", eps=eps,
                            version="standard", steps=steps, batch_size=n)
      t_jax = time.time() - t0
      t0 = time.time()
      xa_t, after_t = _torchattacks_autoattack(
          torch, torchattacks, net, xt, yt, eps, None if steps == 10 else steps)
      t_torch = time.time() - t0
      xa_t = xa_t.numpy()
      with torch.no_grad():
        robust_t = net(torch.from_numpy(xa_t)).argmax(1).numpy() == y
      # Both in the threat model (NCHW vs NHWC: one channel, same order).
      d_t = np.abs(xa_t.reshape(n, -1) - x.reshape(n, -1)).max(1)
      d_j = np.abs(out["x_adv"].reshape(n, -1) - x.reshape(n, -1)).max(1)
      assert d_t.max() <= eps + 1e-6 and d_j.max() <= eps + 1e-6
      assert xa_t.min() >= 0 and xa_t.max() <= 1
      after_j = [out["robust_acc_after"][k] for k in aa.VERSIONS["standard"]]
      assert after_t[-1] == pytest.approx(float(robust_t.mean()))
      rows.append((eps, steps, out["clean_acc"], after_j, after_t,
                   int(np.sum(out["robust"] != robust_t)), t_jax, t_torch))
  finally:
    torch.set_num_threads(threads)
  with capsys.disabled():
    print(f"\n{title}, Fashion-MNIST MLP, n={n}, linf; robust accuracy after "
          f"APGD-CE / APGD-T / FAB-T / Square (tsjax | torchattacks)")
    for eps, steps, clean, aj, at, nd, tj, tt in rows:
      print(f"eps {eps:<6} steps {steps:3d} clean {clean:.3f}  "
            + "  ".join(f"{a:.3f}|{b:.3f}" for a, b in zip(aj, at))
            + f"  final diff {100 * (aj[-1] - at[-1]):+.2f} pp, {nd} examples"
            f" differ; tsjax {tj:.1f} s (with compile), torchattacks "
            f"{tt:.1f} s (1 thread)")
  tol = max(0.005, 2 / n)
  for eps, steps, clean, aj, at, _, _, _ in rows:
    # A meaningful eps: robust accuracy well away from 0 and from clean.
    assert 0.2 <= aj[-1] <= 0.8 and aj[-1] < clean - 0.05, (eps, aj)
    assert abs(aj[-1] - at[-1]) <= tol + 1e-9, (eps, steps, aj, at)
    for stage, a, b in zip(aa.VERSIONS["standard"], aj, at):
      assert abs(a - b) <= tol + 1e-9, (eps, steps, stage, aj, at)


# Fast cross-check (every run): APGD-CE -> APGD-T, the first two attacks of
# the standard version, against the two torchattacks.AutoAttack builds (10
# iterations, its default) on the same MLP: 1000 test points (the attacks
# cost ~1 s a side on this MLP; compiling dominates) at eps = 0.04, where
# the robust accuracy (~47%) is most sensitive to the attack's strength on
# this model. Tolerance: 5 of 1000 points per stage (0.5 pp, as the slow
# tests): over 5 seeds on each side the two differed by at most 3 points,
# while a weakened tsjax falls outside: eps x 0.98 (10 more points robust
# after APGD-CE), 3 of the 10 iterations (12). (The undefended MLP is
# nearly saturated by 5 iterations, +4 points: subtler losses of strength
# are for the slow tests and test_apgd's same-start cross-check.) FAB-T and
# Square break no further point here and would cost seconds (Square runs
# 5000 queries on every robust point), so they are left to the slow tests.
FAST_XCHECK_N = 1000
FAST_XCHECK_EPS = 0.04
FAST_XCHECK_TOL = 5          # points


def test_apgd_cascade_matches_torchattacks_fast(capsys):
  """Robust accuracy after APGD-CE and after APGD-T (cascade, 10 iterations)
  equals torchattacks' within 5 of 1000 points (see above)."""
  torch = pytest.importorskip("torch")
  torchattacks = pytest.importorskip("torchattacks")
  model, params, _, _ = fmnist_reference(n_test=120)
  test = images.load_dataset("fashion_mnist", "test")
  n, eps = FAST_XCHECK_N, FAST_XCHECK_EPS
  x = test.images[:n].astype(np.float32) / 255.0
  y = np.asarray(test.labels[:n], np.int32)
  f = flax_logits_fn(model, params)
  names = aa.VERSIONS["standard"][:2]
  t0 = time.time()
  out = aa.autoattack(f, x, y, jax.random.key(0), eps=eps, attacks=names,
                      steps=10, batch_size=n, checks=False)
  t_jax = time.time() - t0
  net = torch_model(params)
  xt, yt = to_torch_images(x), torch.from_numpy(y).long()
  threads = torch.get_num_threads()
  torch.set_num_threads(1)    # 2 busy threads on a shared 2-core CPU crawl
  try:
    with torch.no_grad():
      clean_t = net(xt).argmax(1).numpy() == y
    t0 = time.time()
    xa_t, after_t = _torchattacks_autoattack(torch, torchattacks, net, xt, yt,
                                             eps, None, n_attacks=2)
    t_torch = time.time() - t0
  finally:
    torch.set_num_threads(threads)
  after_j = [out["robust_acc_after"][k] for k in names]
  with capsys.disabled():
    print(f"\nAPGD-CE / APGD-T (10 iterations), Fashion-MNIST MLP, n={n}, "
          f"eps {eps}: clean {out['clean_acc']:.3f}, robust "
          + "  ".join(f"{a:.3f}|{b:.3f}" for a, b in zip(after_j, after_t))
          + f" (tsjax|torchattacks); tsjax {t_jax:.1f} s (with compile), "
          f"torchattacks {t_torch:.1f} s")
  assert out["clean_acc"] == pytest.approx(float(clean_t.mean()))
  d_t = np.abs(xa_t.numpy().reshape(n, -1) - x.reshape(n, -1)).max(1)
  assert d_t.max() <= eps + 1e-6
  # A meaningful eps: the attacks break a large share of the points.
  assert 0.3 <= after_j[-1] <= out["clean_acc"] - 0.2, after_j
  for stage, a, b in zip(names, after_j, after_t):
    assert abs(a - b) <= FAST_XCHECK_TOL / n + 1e-9, (stage, after_j, after_t)


@pytest.mark.slow
def test_standard_autoattack_matches_torchattacks(capsys):
  """The full standard ensemble vs ``torchattacks.AutoAttack(version=
  'standard')`` as shipped (10 iterations, see above) on 300 points of the
  Fashion-MNIST MLP at three eps (robust accuracy ~70%, ~55%, ~40%): final
  and per-attack robust accuracy within max(0.5 pp, 2 examples)."""
  _compare_with_torchattacks([(0.02, 10), (0.035, 10), (0.05, 10)], 300,
                             capsys, "standard AutoAttack (10 iterations)")


@pytest.mark.slow
def test_standard_autoattack_100_steps_matches_torchattacks(capsys):
  """As above with the reference's 100 iterations (tsjax's default; the
  torchattacks sub-attacks' ``steps`` set to 100) at one eps."""
  _compare_with_torchattacks([(0.035, 100)], 300, capsys,
                             "standard AutoAttack (100 iterations)")
