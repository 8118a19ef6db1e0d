"""The paper recipes against their reference code *as it runs*.

Each expected value is written out here from the reference repository's
code (file:line in the test), not from tsjax: the learning rate of every
epoch, what weight decay does to which parameters, how many batch-norm
running-statistic updates one training step makes, and the evaluation
attack's step size. A recipe that drifts fails here.
"""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tsjax.configs import adv_train
from experiments import train as exp
from tsjax import config_checks as cc
from tsjax import methods
from tsjax.methods.distill import teacher_ctx
from tsjax.models.cnn import SmallCNN
from tsjax.train import classifier as clf

PAPER = adv_train.PAPER_DATASETS
STEPS_PER_EPOCH = 7


def _lr_per_epoch(config, where=0):
  """tsjax's learning rate at step ``where`` of every epoch."""
  sched = clf.make_schedule(config.train, STEPS_PER_EPOCH)
  return np.array([float(sched(e * STEPS_PER_EPOCH + where))
                   for e in range(int(config.train.epochs))])


# ------------------------------------------------ executed lr schedules
def ard_executed(epochs=200, lr_schedule=(100, 150), base=0.1, factor=0.1):
  """goldblum/AdversariallyRobustDistillation main.py:32-36, 167-170 (and
  ZFancy/IAD IAD-I.py:49-53, 218-230): ``adjust_learning_rate(optimizer,
  epoch, lr)`` multiplies its *local* ``lr`` (always the base rate) and
  writes it to the optimizer, every 0-based epoch in ``range(epochs)``."""
  group_lr, out = base, []
  for epoch in range(epochs):
    lr = base
    if epoch in lr_schedule:
      lr *= factor
      group_lr = lr
    out.append(group_lr)
  return np.array(out)


def trades_executed(epochs=76, base=0.1):
  """yaodongyu/TRADES train_trades_cifar10.py:140-155: epochs 1..76."""
  out = []
  for epoch in range(1, epochs + 1):
    lr = base
    if epoch >= 75:
      lr = base * 0.1
    if epoch >= 90:
      lr = base * 0.01
    if epoch >= 100:
      lr = base * 0.001
    out.append(lr)
  return np.array(out)


def rslad_executed(epochs=300, base=0.1):
  """zibojia/RSLAD resnet18_rslad_cifar10.py:37, 47, 81-83: train epoch
  1..300 at the optimizer's lr, then ``*= 0.1`` after epochs 215/260/285."""
  lr, out = base, []
  for epoch in range(1, epochs + 1):
    out.append(lr)
    if epoch in [215, 260, 285]:
      lr *= 0.1
  return np.array(out)


def multistep_executed(epochs, milestones, base=0.1):
  """PyTorch MultiStepLR stepped once per 0-based epoch (PeerAiD main.py,
  milestones from configs/*.json as spec §2.3 lists them)."""
  return np.array([base * 0.1 ** sum(e >= m for m in milestones)
                   for e in range(epochs)])


@pytest.mark.parametrize("dataset", PAPER)
@pytest.mark.parametrize("method", ["ard", "iad"])
def test_ard_iad_lr_as_executed(method, dataset):
  c = adv_train.get_config(f"{dataset},{method}")
  np.testing.assert_allclose(_lr_per_epoch(c), ard_executed(), rtol=1e-6)
  assert _lr_per_epoch(c)[150] == pytest.approx(0.01)   # not 0.001


@pytest.mark.parametrize("dataset", PAPER)
def test_trades_lr_as_executed(dataset):
  c = adv_train.get_config(f"{dataset},trades")
  np.testing.assert_allclose(_lr_per_epoch(c), trades_executed(), rtol=1e-6)
  assert np.sum(_lr_per_epoch(c) < 0.1) == 2     # two epochs at 0.01
  assert c.model.normalize is False              # raw [0, 1] inputs


@pytest.mark.parametrize("dataset", PAPER)
def test_rslad_lr_as_executed(dataset):
  c = adv_train.get_config(f"{dataset},rslad")
  np.testing.assert_allclose(_lr_per_epoch(c), rslad_executed(), rtol=1e-6)


@pytest.mark.parametrize("dataset,epochs,milestones", [
    ("cifar10", 300, (214, 259, 284)), ("cifar100", 300, (214, 259, 284)),
    ("tiny_imagenet", 200, (99, 149))])
def test_peeraid_lr_and_swa(dataset, epochs, milestones):
  c = adv_train.get_config(f"{dataset},peeraid")
  np.testing.assert_allclose(_lr_per_epoch(c),
                             multistep_executed(epochs, milestones), rtol=1e-6)
  assert c.train.swa_start_epoch == milestones[0]


def test_ccat_lr_is_floor_stepped_without_weight_decay():
  """experiments/config/common.py: LambdaLR(gamma ** floor(step /
  batches_per_epoch)) stepped per batch, SGD without weight_decay."""
  c = adv_train.get_config("cifar10,ccat")
  sched = clf.make_schedule(c.train, STEPS_PER_EPOCH)
  for step in range(0, 3 * STEPS_PER_EPOCH):
    want = 0.075 * 0.95 ** math.floor(step / STEPS_PER_EPOCH)
    assert float(sched(step)) == pytest.approx(want, rel=1e-6)
  assert c.train.weight_decay == 0.0 and c.train.batch_size == 100
  a = exp.attack_spec(c)
  # __normalized_random_pgd(base_lr=0.005, max_iterations=2 * 20,
  # backtrack=True, lr_factor=1.5, momentum=0.9), mixed initialisation.
  assert (a.optimizer, a.start, a.steps, a.step_size, a.momentum,
          a.lr_factor, a.eps) == ("backtrack", "mixed", 40, 0.005, 0.9, 1.5,
                                  0.03)


# ------------------------------------------------ weight-decay semantics
PARAMS = {"conv": {"kernel": jnp.full((3, 3, 1, 2), 2.0),
                   "bias": jnp.full((2,), 3.0)},
          "bn": {"scale": jnp.full((2,), 4.0)}}


def _zero_grad_update(config, step=0):
  """The parameter change of one optimizer step at ``step`` with a zero
  gradient: weight decay alone."""
  opt, _ = clf.make_optimizer(config.train, STEPS_PER_EPOCH)
  st = opt.init(PARAMS)
  for _ in range(step):
    _, st = opt.update(jax.tree.map(jnp.zeros_like, PARAMS), st, PARAMS)
  upd, _ = opt.update(jax.tree.map(jnp.zeros_like, PARAMS), st, PARAMS)
  return upd


@pytest.mark.parametrize("variant,wd", [("cifar10,ard", 2e-4),
                                        ("cifar10,pgd_at", 5e-4),  # Rice :230
                                        ("cifar10,trades", 2e-4),
                                        ("cifar10,peeraid", 2e-4),
                                        ("cifar10,pgd_at", 5e-4)])
def test_sgd_weight_decay_is_pytorch_coupled_on_all_parameters(variant, wd):
  """``optim.SGD(..., weight_decay=wd)``: ``g + wd * theta`` for every
  parameter, scaled by the lr (first step: no momentum history)."""
  c = adv_train.get_config(variant)
  upd = _zero_grad_update(c)
  for path, u in jax.tree_util.tree_leaves_with_path(upd):
    p = PARAMS[path[0].key][path[1].key]
    np.testing.assert_allclose(u, -0.1 * wd * p, rtol=1e-5)


def test_funmatch_weight_decay_is_big_vision_decoupled_on_kernels():
  """big_vision/optax.py:133-145: ``wd * schedule multiplier * theta`` added
  after the lr scaling, kernels only (Adam's update is 0 at a 0 gradient)."""
  c = adv_train.get_config("cifar10,funmatch")
  step = 10 * STEPS_PER_EPOCH            # after the 5-epoch warm-up
  sched = clf.make_schedule(c.train, STEPS_PER_EPOCH)
  mult = float(sched(step)) / c.train.lr
  upd = _zero_grad_update(c, step)
  np.testing.assert_allclose(upd["conv"]["kernel"],
                             -3e-4 * mult * PARAMS["conv"]["kernel"], rtol=1e-5)
  np.testing.assert_allclose(upd["conv"]["bias"], 0.0)
  np.testing.assert_allclose(upd["bn"]["scale"], 0.0)
  assert 0.5 < mult < 1.0


def test_ccat_has_no_weight_decay():
  upd = _zero_grad_update(adv_train.get_config("cifar10,ccat"))
  for u in jax.tree.leaves(upd):
    np.testing.assert_allclose(u, 0.0)


# ------------------------------------------------ batch-norm updates
class Counting(nn.Module):
  """A small CNN that counts its train-mode calls in ``batch_stats``."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    calls = self.variable("batch_stats", "calls",
                          lambda: jnp.zeros((), jnp.int32))
    if train and not self.is_initializing():
      calls.value += 1
    return SmallCNN(num_classes=10, features=(4, 4), hidden=8)(x, train=train)


def _calls(model_state):
  return int(model_state["batch_stats"]["calls"])


# Train-mode passes of one step in the reference code:
# ARD main.py:68-79, 121-123: 10 attack steps on net.train(), S(x'), S(x).
# IAD IAD-I.py:95-106, 164-178: 10 attack steps, S(x'), basicop = S(x'),
#   then S(x) once (epoch < begin: the CE term) or twice (KL target + CE).
# TRADES trades.py:79-82: model.eval() to attack, then model(x),
#   model(x_adv) and model(x) again inside the KL.
# RSLAD: student.eval() to attack, student(x_adv), student(x).
# PGD-AT, Rice et al. train_cifar.py:294, 316, 324, 339: 10 attack steps on
#   model.train(), model(x_adv), then model(x) after the step.
# AdvFunMatch as AdaAD main.py:333-334 (the adaad variant): net(x), net(x*).
# CCAT (one concatenated pass), KD, FunMatch, AdvFunMatch (default): 1.
EXPECTED_CALLS = {("ard", 0): 12, ("iad", 0): 13, ("iad", 99): 14,
                  ("trades", 0): 3, ("rslad", 0): 2, ("pgd_at", 0): 12,
                  ("ccat", 0): 1, ("kd", 0): 1, ("funmatch", 0): 1,
                  ("advfunmatch", 0): 1, ("advfunmatch,adaad", 0): 2}


def _one_loss_call(name, epoch, dataset="cifar10", overrides=None):
  c = adv_train.get_config(f"{dataset},{name}")
  for path, value in (overrides or {}).items():
    *parents, field = path.split(".")
    node = c
    for part in parents:
      node = node[part]
    node[field] = value
  name = name.split(",")[0]
  m = methods.get(name)
  model = Counting()
  x = jax.random.uniform(jax.random.key(0), (6, 8, 8, 1))
  y = jnp.arange(6) % 10
  variables = model.init(jax.random.key(1), x)
  params = variables.pop("params")
  teacher, ctx = None, None
  if m.needs_teacher:
    teacher = SmallCNN(num_classes=10, features=(4, 4), hidden=8)
    tv = teacher.init(jax.random.key(2), x)
    ctx = teacher_ctx(tv.pop("params"), dict(tv))
  loss_fn = m.make_loss(model, teacher=teacher,
                        attack=exp.attack_spec(c) if m.uses_attack else None,
                        options=m.build_options(c.method.options))
  batch = {"image": x, "label": y, "epoch": jnp.int32(epoch)}
  if m.init:
    params, variables = m.init(lambda k: (params, dict(variables)),
                               jax.random.key(3))
  loss, (_, new_state) = jax.jit(loss_fn)(params, dict(variables), batch,
                                          jax.random.key(4), ctx)
  return c, new_state, loss


@pytest.mark.parametrize("name,epoch", sorted(EXPECTED_CALLS))
def test_batch_norm_updates_per_step(name, epoch):
  c, st, _ = _one_loss_call(name, epoch)
  if name == "iad":
    assert c.method.options.begin_epoch == 60
  assert _calls(st) == EXPECTED_CALLS[(name, epoch)]


def test_peeraid_batch_norm_updates_per_step():
  """PeerAiD main.py:359-383: P(x*) once (reused detached), S(x*) twice,
  S(x) once; the attack runs the student in eval mode."""
  _, st, _ = _one_loss_call("peeraid", 0)
  assert _calls(st["peer"]) == 1 and _calls(st["student"]) == 3


def test_trades_reusing_the_clean_pass_is_the_same_loss_one_pass_less():
  """recompute_clean=False: the KL target from the first pass (same value,
  a train-mode pass is deterministic), batch statistics updated twice."""
  _, st3, loss3 = _one_loss_call("trades", 0)
  _, st2, loss2 = _one_loss_call(
      "trades", 0, overrides={"method.options.recompute_clean": False})
  assert (_calls(st3), _calls(st2)) == (3, 2)
  np.testing.assert_allclose(loss2, loss3, rtol=1e-6)


def rice_executed(epochs=200, batches=STEPS_PER_EPOCH, lr_max=0.1):
  """locuslab/robust_overfitting train_cifar.py:248-255, 306: the rate of
  batch i of epoch e is lr_schedule(e + (i + 1) / len(train_batches))."""
  def lr_schedule(t):
    if t / epochs < 0.5:
      return lr_max
    if t / epochs < 0.75:
      return lr_max / 10.
    return lr_max / 100.
  return np.array([lr_schedule(e + (i + 1) / batches)
                   for e in range(epochs) for i in range(batches)])


@pytest.mark.parametrize("dataset", PAPER)
def test_pgd_at_is_rice_et_al_as_executed(dataset):
  c = adv_train.get_config(f"{dataset},pgd_at")
  sched = clf.make_schedule(c.train, STEPS_PER_EPOCH)
  got = np.array([float(sched(s))
                  for s in range(c.train.epochs * STEPS_PER_EPOCH)])
  np.testing.assert_allclose(got, rice_executed(), rtol=1e-6)
  assert got[100 * STEPS_PER_EPOCH - 1] == pytest.approx(0.01)  # a step early
  a = exp.attack_spec(c)
  # train_cifar.py:139-142, 316: PGD-10, 8/255, 2/255, uniform start, the
  # model in train mode (:294), the last iterate.
  assert (a.steps, a.start, a.bn_mode, a.keep_best, a.restarts) == (
      10, "uniform", "train", False, 1)
  assert a.eps == pytest.approx(8 / 255) and a.step_size == pytest.approx(2 / 255)
  assert c.model.name == "preact_resnet18"                       # :128


def test_autoattack_plus_runs_fab_t_with_one_restart(monkeypatch):
  """fra31/auto-attack autoattack.py:211-216: self.fab.n_restarts = 1 before
  FAB-T; the untargeted FAB of "plus" keeps 5."""
  from tsjax.attacks import autoattack as aa
  seen = {}
  monkeypatch.setattr(aa, "fab", lambda *a, **kw: seen.setdefault(
      kw["targeted"], kw["restarts"]))
  for name in ("fab", "fab-t"):
    aa._attack_fn(name, "linf", 0.1, aa._settings("plus", 10), 10)(
        None, None, None, None)
  assert seen == {False: 5, True: 1}


# ------------------------------------------------ evaluation attacks
@pytest.mark.parametrize("variant,steps,step_size,eps", [
    ("cifar10,peeraid", 20, 2 / 255, 8 / 255),       # PeerAiD main.py:134
    ("cifar100,peeraid", 20, 2 / 255, 8 / 255),
    ("cifar10,trades", 20, 0.003, 0.031),           # pgd_attack_cifar10.py
    ("cifar10,rslad", 20, 0.003, 8 / 255),          # resnet18_rslad_cifar10.py:72
    ("cifar10,iad", 20, 2 / 255, 8 / 255),          # IAD basic_eval.py:51
    ("cifar100,iad", 20, 2 / 255, 8 / 255),
    ("cifar10,pgd_at", 10, 2 / 255, 8 / 255),       # Rice train_cifar.py:366
    ("fashion_mnist,pgd_at", 20, 2.5 * 0.1 / 20, 0.1)])
def test_evaluation_attack(variant, steps, step_size, eps):
  c = adv_train.get_config(variant)
  a = exp.eval_attack(c)
  assert (a.steps, a.start, a.bn_mode) == (steps, "uniform", "eval")
  assert a.step_size == pytest.approx(step_size)
  assert a.eps == pytest.approx(eps)


@pytest.mark.parametrize("variant", ["cifar10,pgd_at", "cifar10,peeraid",
                                     "cifar10,iad", "fashion_mnist,pgd_at"])
def test_selection_attack_is_its_own(variant):
  """Model selection: PGD-10 2/255 (PeerAiD main.py:183, 505; Rice
  train_cifar.py:366, 441); changing the test attack leaves it as it is."""
  c = adv_train.get_config(variant)
  before = exp.select_attack(c)
  c.eval.pgd_step_size, c.eval.pgd_steps = 0.5, 3
  assert exp.select_attack(c) == before
  assert before.steps == 10
  assert before.step_size == pytest.approx(2.5 * c.eval.eps / 10)


@pytest.mark.parametrize("dataset", PAPER)
def test_test_set_selection_uses_every_test_image(dataset):
  """PeerAiD, IAD and AdaAD select on all 10k test images: with
  select_on="test" nothing is cut."""
  c = adv_train.get_config(f"{dataset},peeraid")
  assert c.eval.val_subset is None
  c = adv_train.get_config("fashion_mnist,pgd_at")
  assert c.eval.val_subset == 1000


def test_ccat_evaluation_as_the_reference():
  """experiments/eval/main.ipynb (linf_ours, linf_pgd): PGD-Conf 1000 iter
  from zero and with 10 attempts, PGD-CE 200 iter with 50 attempts, lr
  0.001 / 0.005, lr factors paired as config/common.py:1399-1425; first
  1000 test images (config/cifar10.py:35); tau on the last 10%
  (adversarial_evaluation.py:144)."""
  c = adv_train.get_config("cifar10,ccat")
  m = methods.get("ccat")
  opts = m.build_options(c.method.options)
  attacks, n = m.test_attacks(exp.eval_attack(c), exp.attack_spec(c), opts)
  got = sorted((obj, a.start, a.steps, a.step_size, a.lr_factor, a.restarts,
                a.optimizer, a.momentum, a.keep_best, a.eps)
               for obj, a in attacks.values())
  want = sorted([("conf", "zero", 1000, 0.001, 1.1, 1),
                 ("conf", "uniform", 1000, 0.001, 1.1, 10),
                 ("ce", "uniform", 200, 0.005, 1.25, 50)])
  assert [g[:6] for g in got] == want
  assert all(g[6:9] == ("backtrack", 0.9, True) for g in got)
  assert all(g[9] == pytest.approx(0.03) for g in got)
  assert (n, opts.threshold_split, opts.tpr) == (1000, 0.1, 0.99)
  pairs = dict(zip((20, 100, 200, 1000, 2000, 4000),
                   (1.5, 1.3, 1.25, 1.1, 1.05, 1.025)))
  assert all(pairs[g[2]] == g[4] for g in got)


def test_ccat_report_thresholds_on_the_held_out_tail():
  """tau from the last 10% of the clean test set only, errors over the
  attacked first examples, the worst attack per example by its largest
  wrong-class probability (misc.py:321-333), counted as the reference does
  (adversarial_evaluation.py:428-443), here written out per example."""
  rng = np.random.default_rng(0)
  n_test, n_att = 500, 100
  pe = {"clean/conf": rng.uniform(0.3, 1, n_test),
        "clean/correct": rng.uniform(size=n_test) < 0.8}
  pe["clean/conf"][-50:] = np.linspace(0.6, 0.99, 50)   # the split: tau 0.6
  pe["clean/correct"][-50:] = True
  for name in ("ccat0", "ccat1"):
    pe[f"{name}/conf"] = rng.uniform(0.2, 1, n_att)
    pe[f"{name}/correct"] = rng.uniform(size=n_att) < 0.5
    pe[f"{name}/other"] = rng.uniform(0, 0.8, n_att)
  row = methods.ccat.report(pe, methods.ccat.Options())
  assert row["ccat_tau"] == pytest.approx(0.6)
  num = den = 0
  for i in range(n_att):
    j = 0 if pe["ccat0/other"][i] >= pe["ccat1/other"][i] else 1
    adv_conf, adv_ok = pe[f"ccat{j}/conf"][i], pe[f"ccat{j}/correct"][i]
    clean_in, adv_in = pe["clean/conf"][i] >= 0.6, adv_conf >= 0.6
    num += (not pe["clean/correct"][i] and clean_in) or (not adv_ok and adv_in)
    den += clean_in or adv_in
  assert row["ccat_robust_error"] == pytest.approx(num / den)
  assert (row["ccat_num_attacked"], row["ccat_num_threshold"]) == (100, 50)


def test_ccat_inputs_raw_and_augmentation_one_of_three():
  """models/classifier.py:43 (whiten=False), config/cifar10.py:24-26."""
  c = adv_train.get_config("cifar10,ccat")
  assert c.model.normalize is False and c.augment == "ccat"
  c = adv_train.get_config("fashion_mnist,ccat")          # as config/mnist.py
  assert c.model.normalize is False and c.augment == ""


@pytest.mark.parametrize("variant,normalize,augment", [
    # Rice utils.py:26-27 (reflect pad) + train_cifar.py:182; normalize :23.
    ("cifar10,pgd_at", True, "crop_flip_reflect"),
    # TRADES train_trades_cifar10.py: RandomCrop(32, 4) + flip, raw inputs.
    ("cifar10,trades", False, "crop_flip"),
    ("cifar10,ccat", False, "ccat"),
    # The distillation codes (ARD main.py, IAD IAD-I.py:71-84, RSLAD,
    # PeerAiD datasets.py): RandomCrop(32, 4) + flip on raw [0, 1] inputs.
    ("cifar10,kd", False, "crop_flip"), ("cifar10,ard", False, "crop_flip"),
    ("cifar10,iad", False, "crop_flip"), ("cifar10,rslad", False, "crop_flip"),
    ("cifar10,peeraid", False, "crop_flip"),
    ("cifar10,funmatch", False, "crop_flip"),
    ("cifar10,advfunmatch", False, "crop_flip,autoaugment_cifar10")])
def test_normalisation_and_augmentation_of_every_recipe(variant, normalize,
                                                       augment):
  c = adv_train.get_config(variant)
  assert (c.model.normalize, c.augment) == (normalize, augment)


def test_peeraid_reports_the_swa_student_selected_on_its_own(tmp_path):
  """PeerAiD main.py:786-812: the SWA student of the epoch with its own best
  PGD-10 accuracy is kept (not only the final average)."""
  from tsjax.train import TrainState
  from tsjax.train.fit import fit
  import optax

  @jax.jit
  def step(state, batch, ctx):          # every step adds 1 to w
    del batch, ctx
    new = state.replace(params={"w": state.params["w"] + 1.0},
                        step=state.step + 1)
    return new, {"loss": jnp.float32(0), "finite": jnp.bool_(True)}

  state = TrainState.create({"w": jnp.zeros(())}, optax.sgd(0.1),
                            jax.random.key(0), {})
  # SWA after epochs 2..6 (w = 2..6): averages 2, 2.5, 3, 3.5, 4.
  out = fit(workdir=str(tmp_path), state=state, step_fn=step,
            train_batches=lambda e: [{"x": np.zeros(1)}], epochs=6,
            steps_per_epoch=1, swa_start_epoch=1,
            evaluate_fn=lambda p, m: {"acc": -abs(float(p["w"]) - 2.5)},
            select_metric="acc", bn_batches=lambda epoch: [], model=None,
            progress=False)
  assert out["swa_best"]["epoch"] == 3
  assert float(out["swa_best"]["params"]["w"]) == pytest.approx(2.5)
  assert float(out["swa"]["params"]["w"]) == pytest.approx(4.0)   # 2..6
  assert out["best"]["epoch"] == 2                       # w = 2 (or 3)


@pytest.mark.parametrize("variant,wd", [
    ("cifar10,kd", 2e-4), ("cifar10,iad", 2e-4), ("cifar10,rslad", 2e-4),
    ("cifar10,advfunmatch", 2e-4),
    ("cifar10,advfunmatch,adaad", 5e-4)])           # AdaAD main.py:64
def test_weight_decay_of_the_other_recipes(variant, wd):
  c = adv_train.get_config(variant)
  assert c.train.weight_decay == wd and c.train.weight_decay_style == "l2"


def test_adaad_variant_sets_every_adaad_choice():
  """boyellow/AdaAD main.py:64, 333-334, 342-351; AT_helper.py:22-48."""
  c10 = adv_train.get_config("cifar10,advfunmatch,adaad")
  c100 = adv_train.get_config("cifar100,advfunmatch,adaad")
  assert (c10.method.options.reduction, c100.method.options.reduction) == (
      "mean", "batchmean")
  assert c10.method.options.clean_pass and not c10.method.attack.keep_best
  with pytest.raises(ValueError, match="adaad"):
    adv_train.get_config("cifar10,kd,adaad")


def test_advfunmatch_choices_are_fields():
  """AdaAD main.py:342-345 (nn.KLDivLoss(), / (B C)) and AT_helper.py:22-48
  (last iterate) are reachable; the default is batchmean and the best
  iterate."""
  c = adv_train.get_config("cifar10,advfunmatch")
  assert c.method.options.reduction == "batchmean"
  assert c.method.attack.keep_best is True
  c.method.options.reduction = "mean"
  c.method.attack.keep_best = False
  m = methods.get("advfunmatch")
  assert m.build_options(c.method.options).reduction == "mean"
  assert exp.attack_spec(c).keep_best is False


def test_every_paper_variant_builds_and_names_its_reference():
  for name in methods.REGISTRY:
    for dataset in PAPER:
      c = adv_train.get_config(f"{dataset},{name}")
      m = methods.get(name)
      m.build_options(c.method.options)
      exp.attack_spec(c)
      if name != "standard":
        assert c.reference, (name, dataset)


def test_option_errors_name_the_field():
  m = methods.get("trades")
  with pytest.raises(cc.ConfigError, match=r"method\.options\.beta"):
    m.build_options({"beta": -1.0})
  with pytest.raises(cc.ConfigError, match=r"method\.options\.gamma"):
    m.build_options({"gamma": 1.0})
  c = adv_train.get_config("fashion_mnist,pgd_at")
  c.method.attack.start = "sideways"
  with pytest.raises(cc.ConfigError, match=r"method\.attack\.start"):
    exp.attack_spec(c)
  assert dataclasses.is_dataclass(m.options)
