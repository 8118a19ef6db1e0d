"""The AutoAttack ensemble: cascade bookkeeping, versions, sanity checks,
resume, and the evaluate command."""

import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tsjax.attacks import autoattack as aa
from tsjax.attacks import pgd
from tsjax import losses
from tsjax.data import images

pytestmark = pytest.mark.skipif(
    not os.path.isdir(images.DEFAULT_FASHION_MNIST_DIR),
    reason=f"needs `{images.FASHION_MNIST_APT}`")


@pytest.fixture(scope="module")
def ref():
  from reference_models import flax_logits_fn, fmnist_reference
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
  from configs.adv_train import get_config
  from configs.evaluate import get_config as eval_config
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
  assert (tmp_path / "eval" / "eval.md").read_text().startswith("# ")
  e2 = eval_config("smoke")
  e2.checkpoint = str(tmp_path / "nothing")
  with pytest.raises(FileNotFoundError, match="checkpoint"):
    evaluate.run(e2, str(tmp_path / "e2"), progress=False)
