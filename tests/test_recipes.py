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
# TRADES trades.py: model.eval() to attack, model(x), model(x_adv).
# RSLAD: student.eval() to attack, student(x_adv), student(x).
# PGD-AT, CCAT (one concatenated pass), KD, FunMatch, AdvFunMatch: 1.
EXPECTED_CALLS = {("ard", 0): 12, ("iad", 0): 13, ("iad", 99): 14,
                  ("trades", 0): 2, ("rslad", 0): 2, ("pgd_at", 0): 1,
                  ("ccat", 0): 1, ("kd", 0): 1, ("funmatch", 0): 1,
                  ("advfunmatch", 0): 1}


def _one_loss_call(name, epoch, dataset="cifar10"):
  c = adv_train.get_config(f"{dataset},{name}")
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
  _, (_, new_state) = jax.jit(loss_fn)(params, dict(variables), batch,
                                       jax.random.key(4), ctx)
  return c, new_state


@pytest.mark.parametrize("name,epoch", sorted(EXPECTED_CALLS))
def test_batch_norm_updates_per_step(name, epoch):
  c, st = _one_loss_call(name, epoch)
  if name == "iad":
    assert c.method.options.begin_epoch == 60
  assert _calls(st) == EXPECTED_CALLS[(name, epoch)]


def test_peeraid_batch_norm_updates_per_step():
  """PeerAiD main.py:359-383: P(x*) once (reused detached), S(x*) twice,
  S(x) once; the attack runs the student in eval mode."""
  _, st = _one_loss_call("peeraid", 0)
  assert _calls(st["peer"]) == 1 and _calls(st["student"]) == 3


# ------------------------------------------------ evaluation attacks
@pytest.mark.parametrize("variant,steps,step_size,eps", [
    ("cifar10,peeraid", 20, 2 / 255, 8 / 255),       # PeerAiD main.py:134
    ("cifar100,peeraid", 20, 2 / 255, 8 / 255),
    ("cifar10,trades", 20, 0.003, 0.031),           # pgd_attack_cifar10.py
    ("cifar10,rslad", 20, 0.003, 8 / 255),          # resnet18_rslad_cifar10.py:72
    ("fashion_mnist,pgd_at", 20, 2.5 * 0.1 / 20, 0.1)])
def test_evaluation_attack(variant, steps, step_size, eps):
  c = adv_train.get_config(variant)
  a = exp.eval_attack(c, c.eval.pgd_steps)
  assert (a.steps, a.start, a.bn_mode) == (steps, "uniform", "eval")
  assert a.step_size == pytest.approx(step_size)
  assert a.eps == pytest.approx(eps)


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
