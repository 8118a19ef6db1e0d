"""One PeerAiD and one AdvFunMatch training step: tsjax (jitted) vs PyTorch (eager).

Both steps have a 10-step PGD inner maximisation and a distillation outer
step; the settings are those of ``configs/distill.py`` (float32, batch 128,
no augmentation: only the method's step is timed).

* ``--model small_cnn`` (default; the Fashion-MNIST setting, 28x28x1, runs on
  a 2-core CPU): student ``small_cnn`` features (16, 32), hidden 64, inputs
  normalised inside the model; L-inf eps 0.1, step 0.025, 10 steps, start
  ``x + 0.001 N(0, I)``, eval-mode attack; SGD lr 0.05, momentum 0.9, coupled
  weight decay 5e-4. AdvFunMatch teacher: ``small_cnn`` 32-64-128 (the image
  stack's PGD-AT small CNN; random weights here, which changes no cost).
* ``--model resnet18`` (the CIFAR-10 setting, 32x32x3, for ``--device gpu``):
  student ``resnet18`` (kuangliu CIFAR ResNet-18, no input normalisation);
  eps 8/255, step 2/255, 10 steps; SGD lr 0.1, momentum 0.9, wd 2e-4; the
  AdvFunMatch teacher is a second ResNet-18 (the config's default teacher is
  a WRN-34-10, which would time mostly the teacher).

The steps (tsjax: ``tsjax/methods/peeraid.py`` / ``advfunmatch.py``; spec
§2 and §3; PyTorch: ``TorchPeerAiDStep`` / ``TorchAdvFunMatchStep`` below,
the same passes in the same order):

* **PeerAiD** (student and peer both the student architecture, one update of
  both from ``L_peer + L_student``): ``P(x)`` once, peer in eval mode, no
  gradient; 10 PGD steps on ``sum KL(P(x) || S(x'))`` with the student in eval
  mode (gradient w.r.t. the input only); then 4 train-mode forward passes in
  the reference's order ``P(x*), S(x*), S(x*), S(x)`` (PeerAiD main.py
  359-383: the peer's output on ``x*`` is computed once and reused, detached,
  as the student's target);
  ``L_peer = g1 CE(P1) + g2 tau_p^2 KL(S1 || P1)`` (S1 not detached),
  ``L_student = l1 CE(S2) + l2 tau^2 KL(sg P1 || S2) + l3 tau^2 KL(S(x) ||
  S2)``, every KL ``nn.KLDivLoss()``'s element-wise mean (/ (B * C)); one
  backward pass; one SGD step on each network (two ``torch.optim.SGD`` as in
  the reference; one optax optimizer over the joint tree in tsjax).
* **AdvFunMatch**: 10 PGD steps maximising per-example ``KL(T(x') || S(x'))``
  with *both* networks recomputed at ``x'`` (teacher and student in eval
  mode), the ascent direction the input gradient through both networks (as
  AdaAD's inner loss, which does not detach the teacher; no network's
  weights get gradient), the best iterate per example kept (tsjax
  ``keep_best``: one more evaluation of both at the last iterate); then
  ``tau^2 KL(T(x*) || S(x*))`` (batch mean; teacher eval, detached; student
  train mode) and one SGD step on the student.

Both frameworks start from the same weights (PyTorch networks initialised by
PyTorch, converted with ``tsjax.models.convert_state_dict``). Before timing,
the *whole step* is checked end to end (``--skip-check`` to skip): in
float64, with the PGD start at ``x`` itself (so both attacks are
deterministic), one step of each framework from the same weights and batch
must give the same losses and the same parameter update of every network
(max abs difference / max abs update <= ``CHECK_RTOL`` = 1e-9; measured
~1e-14). A different gradient flow (a term detached that should not be, or
the other way round), a different KL reduction or temperature, or a missing
pass fails it (detaching ``S(x*)`` in ``L_peer`` gives 5e-3). The check is
float64 because in float32 a PGD sign step taken where a gradient entry is
within rounding of 0 can go either way (even between two tsjax programs), and
those few pixels move the float32 update by up to ~1e-2. Timed steps are
float32, each framework at its default precision.

Timing: compilation and warm-up excluded; ``--repeats`` repeats of
``--steps-per-repeat`` consecutive steps; in every repeat each variant runs
once, interleaved, the order rotated from repeat to repeat (load drift hits
all of them): tsjax, then PyTorch with each ``--torch-threads`` setting
(default ``os.cpu_count()`` and 1 on a CPU; ``torch.set_num_threads`` is set
before each PyTorch repeat) in each ``--torch-layouts`` memory layout (NCHW
and ``channels_last``, nets and input batch, each layout its own copy of the
initial nets; a float32 step of each layout from the same weights is checked
against NCHW first). Per thread count the faster layout is the reference
(``speedup_vs_torch_<n>t``, ``torch_<n>t_layout``). Per-step time =
repeat wall time / steps; the median (and min) over repeats is reported,
with the load average
(1-minute ``os.getloadavg()`` after every repeat, ``uptime`` before and
after each method). On a GPU: ``cudnn.benchmark``,
``torch.cuda.synchronize`` after each PyTorch repeat,
``jax.block_until_ready`` after each tsjax repeat.

Also recorded: the number of compilations of the jitted tsjax step after all
timed steps (1 = no retracing) and whether the donated input state was
deleted (donation works). ``--breakdown`` also times the attack alone in both
frameworks (the update = step - attack). ``--pgd-loop rolled`` times tsjax
with the PGD loop as a while loop (tsjax's behaviour before ``pgd`` unrolled
convolutional losses on a CPU; see ``tsjax.attacks.pgd.auto_unroll``).

Run from the repository root::

  python benchmarks/distill_step.py                       # small CNN, CPU
  python benchmarks/distill_step.py --methods peeraid --repeats 9
  python benchmarks/distill_step.py --breakdown
  python benchmarks/distill_step.py --pgd-loop rolled      # the old PGD loop
  python benchmarks/distill_step.py --model resnet18 --device gpu
  python benchmarks/distill_step.py --quick               # sanity run

Results: a table on stdout and ``benchmarks/results/distill_step_<backend>.json``
(one entry per model; ``--quick`` writes ``distill_step_<backend>_quick.json``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import importlib
import os
import pathlib
import statistics
import sys
import time
import warnings

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):
  if _p not in sys.path:
    sys.path.insert(0, _p)

# On a GPU both frameworks share the device: keep JAX from preallocating 75%
# of its memory (an explicit setting in the environment wins).
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as tnn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# nn.KLDivLoss()'s "mean" reduction is PeerAiD's (spec §2.2), on purpose.
warnings.filterwarnings("ignore", message="reduction: 'mean' divides")

import adv_train_step as ats  # noqa: E402  (count_*)
from _common import (loadavg, machine_info, merge_rows,  # noqa: E402
                     open_results, uptime, write_results)
from tests.torch_nets import TorchResNet18, TorchSmallCNN  # noqa: E402
from tsjax.configs.distill import get_config  # noqa: E402
from experiments.common import IMAGE_XLA_FLAGS, prepare_backend  # noqa: E402
from experiments.train import attack_spec, with_augmentation  # noqa: E402
from tsjax import models  # noqa: E402
from tsjax.data import images  # noqa: E402
from tsjax.methods import advfunmatch, peeraid  # noqa: E402
from tsjax.methods.distill import teacher_ctx  # noqa: E402
from tsjax.train import TrainState  # noqa: E402
from tsjax.train import classifier as clf  # noqa: E402

METHODS = ("peeraid", "advfunmatch")
MODELS = ("small_cnn", "resnet18")
NUM_CLASSES = 10
# model -> (data set of configs/distill.py, image shape, train-set size after
# the config's validation split: only sets the schedule's steps per epoch)
SETTINGS = {"small_cnn": ("fashion_mnist", (28, 28, 1), 60_000 - 5_000),
            "resnet18": ("cifar10", (32, 32, 3), 50_000 - 1_000)}
TEACHER = {"small_cnn": ("small_cnn", {"features": (32, 64), "hidden": 128}),
           "resnet18": ("resnet18", {})}
QUICK = {"repeats": 2, "steps_per_repeat": 1, "warmup": 1}
CHECK_RTOL = 1e-9     # float64 check: losses and parameter update, relative
LAYOUT_RTOL = 1e-3    # float32 PyTorch layouts against each other: losses


# ------------------------------------------------------------------ arguments
def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="small_cnn", choices=MODELS)
  p.add_argument("--device", default="cpu", choices=("cpu", "gpu"),
                 help="where both frameworks run (gpu: jax's GPU backend and "
                      "torch cuda, both required)")
  p.add_argument("--methods", default=",".join(METHODS),
                 help=f"comma-separated, from {METHODS}")
  p.add_argument("--repeats", type=int, default=None,
                 help="timed repeats per variant (default 7; "
                      f"{QUICK['repeats']} with --quick)")
  p.add_argument("--steps-per-repeat", type=int, default=None,
                 help="consecutive steps per timed repeat (default 3 for "
                      "small_cnn and 1 for resnet18 on a CPU, 10 on a GPU)")
  p.add_argument("--warmup", type=int, default=None,
                 help="untimed steps after compilation (default 2)")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--torch-threads", default=None,
                 help="comma-separated torch.set_num_threads settings timed "
                      "(default: os.cpu_count(),1 on a CPU)")
  p.add_argument("--torch-layouts", default=",".join(ats.LAYOUTS),
                 help=f"PyTorch memory layouts timed, from {ats.LAYOUTS}; per "
                      "thread count the faster is the reference")
  p.add_argument("--breakdown", action="store_true",
                 help="also time the attack alone in both frameworks")
  p.add_argument("--pgd-loop", default="auto", choices=("auto", "rolled"),
                 help="auto: tsjax's default PGD loop (unrolled on a CPU for "
                      "convolutional losses); rolled: a lax.fori_loop while "
                      "loop as before that default (sets tsjax.attacks.pgd."
                      "CPU_UNROLL_MAX_STEPS = 0; saved under its own key)")
  p.add_argument("--skip-check", action="store_true",
                 help="skip the end-to-end step agreement check")
  p.add_argument("--quick", action="store_true",
                 help="sanity run (2 repeats of 1 step)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None,
                 help="JSON path (default benchmarks/results/"
                      "distill_step_<backend>[_quick].json)")
  a = p.parse_args(argv)
  a.argv = list(sys.argv[1:] if argv is None else argv)
  a.methods = [m.strip() for m in a.methods.split(",") if m.strip()]
  a.torch_layouts = ats.parse_layouts(p, a.torch_layouts)
  bad = [m for m in a.methods if m not in METHODS]
  if bad or not a.methods:
    p.error(f"--methods takes names from {METHODS}, got {bad or a.methods}")
  for name, default in (("repeats", 7), ("warmup", 2)):
    if getattr(a, name) is None:
      setattr(a, name, QUICK[name] if a.quick else default)
  if a.steps_per_repeat is None:
    if a.quick:
      a.steps_per_repeat = QUICK["steps_per_repeat"]
    elif a.device == "gpu":
      a.steps_per_repeat = 10
    else:
      a.steps_per_repeat = 3 if a.model == "small_cnn" else 1
  if a.torch_threads is None:
    a.torch_threads = ([os.cpu_count(), 1] if a.device == "cpu"
                       else [torch.get_num_threads()])
  else:
    a.torch_threads = [int(t) for t in a.torch_threads.split(",") if t]
  if (a.repeats < 1 or a.warmup < 0 or a.batch < 1 or a.steps_per_repeat < 1
      or not a.torch_threads or min(a.torch_threads) < 1):
    p.error("--repeats, --steps-per-repeat, --batch, --torch-threads must be "
            ">= 1 and --warmup >= 0")
  return a


def make_pair(name, kwargs, mean, std, image_shape, seed):
  """``(flax_model, params, model_state, torch_net)`` with the same weights:
  the PyTorch net initialised by PyTorch (``seed``), converted by
  ``tsjax.models.convert_state_dict``."""
  h, _, c = image_shape
  model = models.get_model(name, num_classes=NUM_CLASSES, mean=mean, std=std,
                           **kwargs)
  models.check_input_shape(model, image_shape)
  torch.manual_seed(seed)
  if name == "small_cnn":
    net = TorchSmallCNN(NUM_CLASSES, in_channels=c, hw=h, mean=mean, std=std,
                        **kwargs)
  elif name == "resnet18":
    net = TorchResNet18(NUM_CLASSES, in_channels=c, mean=mean, std=std,
                        **kwargs)
  else:
    raise ValueError(name)
  params, state = models.convert_state_dict(net.state_dict(), model,
                                            input_shape=image_shape)
  params = jax.tree.map(jnp.asarray, params)
  state = jax.tree.map(jnp.asarray, state)
  n_j = ats.count_tsjax(params), ats.count_tsjax(state)
  if n_j != ats.count_torch(net):
    raise SystemExit(f"{name}: parameter / BN statistic counts differ "
                     f"(tsjax {n_j}, torch {ats.count_torch(net)})")
  return model, params, state, net


# --------------------------------------------------------------- torch steps
def _to_float(images):
  """uint8 -> [0, 1] float32 (as tsjax's step); float images as they are."""
  if images.dtype == torch.uint8:
    return images.float().div_(255.0)
  return images


def _project(x_adv, x, eps):
  return torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)


def _start(x, eps, start_std):
  """tsjax's start: ``x + start_std N(0, I)`` projected on the ball and
  [0, 1] (the PeerAiD reference does not clip the start; tsjax does)."""
  if not start_std:
    return x.clone()
  return _project(x + start_std * torch.randn_like(x), x, eps)


def kl_per_example(target_logits, logits, tau=1.0):
  """``KL(softmax(target / tau) || softmax(logits / tau))`` per example."""
  return F.kl_div(F.log_softmax(logits / tau, dim=1),
                  F.softmax(target_logits / tau, dim=1),
                  reduction="none").sum(1)


def _sgd(params, tcfg):
  return torch.optim.SGD(params, lr=float(tcfg.lr),
                         momentum=float(tcfg.momentum),
                         weight_decay=float(tcfg.weight_decay),
                         nesterov=bool(tcfg.get("nesterov", False)))


class TorchPeerAiDStep:
  """PeerAiD (jaewonalive/PeerAiD ``train``), the passes of tsjax.methods.peeraid."""

  def __init__(self, student, peer, attack, tcfg, w: peeraid.Options):
    self.student, self.peer, self.w = student, peer, w
    self.eps, self.alpha = float(attack.eps), float(attack.step_size)
    self.steps, self.start_std = int(attack.steps), attack.start_std
    self.bn_eval = attack.bn_mode == "eval"
    self.opt_s = _sgd(student.parameters(), tcfg)
    self.opt_p = _sgd(peer.parameters(), tcfg)
    self.kl = tnn.KLDivLoss()                   # reduction "mean": / (B * C)

  def attack(self, x):
    self.peer.eval()
    with torch.no_grad():
      p_soft = F.softmax(self.peer(x), dim=1)
    self.student.train(not self.bn_eval)
    x_adv = _start(x, self.eps, self.start_std)
    for _ in range(self.steps):
      x_adv.requires_grad_(True)
      loss = F.kl_div(F.log_softmax(self.student(x_adv), dim=1), p_soft,
                      reduction="sum")
      grad, = torch.autograd.grad(loss, x_adv)
      with torch.no_grad():
        x_adv = _project(x_adv + self.alpha * grad.sign(), x, self.eps)
    return x_adv.detach()

  def __call__(self, images, y):
    w, kl = self.w, self.kl
    x = _to_float(images)
    x_adv = self.attack(x)
    self.student.train()
    self.peer.train()
    ls = lambda z, t: F.log_softmax(z / t, dim=1)
    sm = lambda z, t: F.softmax(z / t, dim=1)
    p1 = self.peer(x_adv)
    s1 = self.student(x_adv)
    l_peer = (w.gamma1 * F.cross_entropy(p1, y)
              + w.gamma2 * w.tau_p ** 2 * kl(ls(p1, w.tau_p), sm(s1, w.tau_p)))
    s2 = self.student(x_adv)
    s_nat = self.student(x)
    l_student = (w.lambda1 * F.cross_entropy(s2, y)
                 + w.lambda2 * w.tau ** 2 * kl(ls(s2, w.tau),
                                                sm(p1.detach(), w.tau))
                 + w.lambda3 * w.tau ** 2 * kl(ls(s2, w.tau), sm(s_nat, w.tau)))
    loss = l_peer + l_student
    self.opt_s.zero_grad(set_to_none=True)
    self.opt_p.zero_grad(set_to_none=True)
    loss.backward()
    self.opt_s.step()
    self.opt_p.step()
    return {"loss": loss.detach(), "loss_peer": l_peer.detach(),
            "loss_student": l_student.detach()}

  def nets(self):
    return {peeraid.STUDENT: self.student, peeraid.PEER: self.peer}


class TorchAdvFunMatchStep:
  """AdvFunMatch, the passes of tsjax.methods.advfunmatch (keep-best PGD)."""

  def __init__(self, student, teacher, attack, tcfg, temperature=1.0):
    self.student, self.teacher, self.tau = student, teacher, float(temperature)
    self.eps, self.alpha = float(attack.eps), float(attack.step_size)
    self.steps, self.start_std = int(attack.steps), attack.start_std
    self.bn_eval = attack.bn_mode == "eval"
    self.opt = _sgd(student.parameters(), tcfg)
    self.teacher.eval()
    for q in self.teacher.parameters():       # frozen (tsjax: ctx, no grad)
      q.requires_grad_(False)

  def attack(self, x):
    self.student.train(not self.bn_eval)
    x_adv = _start(x, self.eps, self.start_std)
    best, best_kl = x_adv, torch.full((x.shape[0],), -float("inf"),
                                      device=x.device, dtype=x.dtype)
    for _ in range(self.steps):
      x_adv.requires_grad_(True)    # gradient through teacher and student
      kl = kl_per_example(self.teacher(x_adv), self.student(x_adv), self.tau)
      grad, = torch.autograd.grad(kl.sum(), x_adv)
      with torch.no_grad():
        better = kl > best_kl
        best = torch.where(better.view(-1, 1, 1, 1), x_adv, best)
        best_kl = torch.where(better, kl, best_kl)
        x_adv = _project(x_adv + self.alpha * grad.sign(), x, self.eps)
    with torch.no_grad():       # the last iterate is a candidate too
      kl = kl_per_example(self.teacher(x_adv), self.student(x_adv), self.tau)
      better = kl > best_kl
      best = torch.where(better.view(-1, 1, 1, 1), x_adv, best)
      best_kl = torch.where(better, kl, best_kl)
    return best.detach(), best_kl

  def __call__(self, images, y):
    x = _to_float(images)
    x_adv, inner = self.attack(x)
    with torch.no_grad():
      t_adv = self.teacher(x_adv)
    self.student.train()
    s_adv = self.student(x_adv)
    loss = self.tau ** 2 * F.kl_div(F.log_softmax(s_adv / self.tau, dim=1),
                                    F.softmax(t_adv / self.tau, dim=1),
                                    reduction="batchmean")
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    self.opt.step()
    return {"loss": loss.detach(), "inner_kl": inner.mean()}

  def nets(self):
    return {"student": self.student}


# --------------------------------------------------------------- the setup
@dataclasses.dataclass
class Setup:
  method: str
  config: object
  attack: object
  image_shape: tuple
  step: object            # jitted tsjax step(state, batch, ctx)
  make_state: object      # () -> fresh TrainState (the step donates it)
  ctx: object
  optimizer: object
  tstep: object           # the PyTorch step
  flax_models: dict       # trained net name -> flax model
  loss_for: object        # attack -> tsjax method loss
  torch_for: object       # (attack, layout) -> PyTorch step on net copies
  counts: dict
  norm: tuple             # (mean, std) inside the models
  attack_fn: object       # jitted (params, model_state, x, key, ctx) -> x_adv


def build(method, args, jdev, tdev) -> Setup:
  dataset, image_shape, train_size = SETTINGS[args.model]
  config = get_config(f"{method},{dataset}")
  config.augment = ""                   # only the method's step
  config.train.batch_size = args.batch
  if config.model.name != args.model:
    raise SystemExit(f"configs/distill.py:{method},{dataset} has student "
                     f"{config.model.name}, not {args.model}")
  normalize = bool(config.model.get("normalize", True))
  mean, std = images._STATS[dataset] if normalize else ((0.0,), (1.0,))
  kwargs = config.model.kwargs.to_dict()
  attack = attack_spec(config)
  optimizer, sched = clf.make_optimizer(config.train,
                                        train_size // args.batch)
  if abs(float(sched(0)) / float(config.train.lr) - 1) > 1e-6:
    raise SystemExit("the schedule does not start at train.lr")
  put = lambda t: jax.device_put(t, jdev)
  s_model, sp, sm, s_net = make_pair(args.model, kwargs, mean, std,
                                     image_shape, args.seed)
  s_net.to(tdev)
  counts = {"student": ats.count_tsjax(sp)}
  ctx = None
  o = config.method.options
  if method == "peeraid":
    _, pp, pm, p_net = make_pair(args.model, kwargs, mean, std, image_shape,
                                 args.seed + 1)
    p_net.to(tdev)
    w = peeraid.Options(**{f: o[f] for f in (
        "tau", "tau_p", "gamma1", "gamma2", "lambda1", "lambda2", "lambda3",
        "reduction")})
    loss_for = lambda att: peeraid.make_loss(s_model, attack=att, options=w)
    params = {peeraid.STUDENT: sp, peeraid.PEER: pp}
    model_state = {peeraid.STUDENT: sm, peeraid.PEER: pm}
    flax_models = {peeraid.STUDENT: s_model, peeraid.PEER: s_model}
    counts["peer"] = ats.count_tsjax(pp)
    torch_for = lambda att, nets: TorchPeerAiDStep(
        nets[peeraid.STUDENT], nets[peeraid.PEER], att, config.train, w)
    nets = {peeraid.STUDENT: s_net, peeraid.PEER: p_net}
    attack_fn = jax.jit(lambda p, m, x, k, c: peeraid.student_adversarial(
        s_model, s_model, p, m, x, k, attack)[0])
  else:
    t_name, t_kwargs = TEACHER[args.model]
    t_model, tp, tm, t_net = make_pair(t_name, t_kwargs, mean, std,
                                       image_shape, args.seed + 2)
    t_net.to(tdev)
    ctx = put(teacher_ctx(tp, tm))
    loss_for = lambda att: advfunmatch.make_loss(
        s_model, teacher=t_model, attack=att, options=advfunmatch.Options(
            temperature=o.temperature, clean_weight=o.clean_weight,
            reduction=o.reduction))
    params, model_state = sp, sm
    flax_models = {"student": s_model}
    counts["teacher"] = ats.count_tsjax(tp)
    torch_for = lambda att, nets: TorchAdvFunMatchStep(
        nets["student"], nets["teacher"], att, config.train, o.temperature)
    nets = {"student": s_net, "teacher": t_net}
    attack_fn = jax.jit(lambda p, m, x, k, c: advfunmatch.mismatched_examples(
        t_model, s_model, p, m, c, x, k, attack,
        temperature=o.temperature)[0])
  params, model_state = put(params), put(model_state)
  step = clf.jit_train_step(with_augmentation(loss_for(attack), config,
                                              NUM_CLASSES), optimizer)
  k_train = jax.random.key(args.seed + 10)

  def make_state():   # fresh buffers: the step donates (deletes) its input
    # committed to the device like the step's outputs (and like the state
    # experiments/train.py device_puts), else the second call recompiles
    return jax.device_put(TrainState.create(
        jax.tree.map(jnp.copy, params), optimizer,
        jax.random.wrap_key_data(jnp.copy(jax.random.key_data(k_train))),
        jax.tree.map(jnp.copy, model_state)), jdev)

  def torch_copy(att, layout="nchw"):
    # a PyTorch step on copies of the initial nets, in memory layout `layout`
    fmt = ats.memory_format(layout)
    return torch_for(att, {k: copy.deepcopy(v).to(memory_format=fmt)
                           for k, v in nets.items()})

  return Setup(method, config, attack, image_shape, step, make_state, ctx,
               optimizer, torch_for(attack, nets), flax_models, loss_for,
               torch_copy, counts, (mean, std), attack_fn)


# ------------------------------------------------------------------- check
def _torch_vars(su: Setup, tstep) -> tuple:
  """The PyTorch nets' ``(params, model_state)`` in the tsjax layout, float64
  (call with ``jax_enable_x64`` on)."""
  conv = {k: models.convert_state_dict(
      {n: v.detach().cpu() for n, v in net.state_dict().items()},
      su.flax_models[k].clone(param_dtype=jnp.float64),
      input_shape=su.image_shape)
      for k, net in tstep.nets().items()}
  if su.method != "peeraid":
    return conv["student"]
  return ({k: v[0] for k, v in conv.items()}, {k: v[1] for k, v in conv.items()})


def _exact_norm(tstep, mean_std):
  """Normalisation constants of the PyTorch nets in float64 from the exact
  values (``.double()`` would keep the float32-rounded ones; tsjax uses the
  Python floats)."""
  dtype = torch.float64
  mean, std = mean_std
  for net in list(tstep.nets().values()) + [getattr(tstep, "teacher", None)]:
    norm = getattr(net, "norm", None)
    if norm is not None:
      dev = norm.mean.device
      norm.mean = torch.tensor(mean, dtype=dtype, device=dev).view(1, -1, 1, 1)
      norm.std = torch.tensor(std, dtype=dtype, device=dev).view(1, -1, 1, 1)


def _rel_update(new_a, new_b, old) -> tuple:
  """max |(a - old) - (b - old)| / max |b - old| over all leaves."""
  f64 = lambda t: [np.asarray(v, np.float64) for v in jax.tree.leaves(t)]
  a, b, o = f64(new_a), f64(new_b), f64(old)
  diff = max((float(np.max(np.abs(x - y))) for x, y in zip(a, b)), default=0)
  scale = max((float(np.max(np.abs(y - z))) for y, z in zip(b, o)), default=0)
  return diff, scale, diff / max(scale, 1e-300)


def check_step(su: Setup, imgs, labels, tdev) -> dict:
  """One step of each framework in float64 from the same weights and batch,
  the PGD start at ``x`` itself: losses and parameter updates agree."""
  attack0 = dataclasses.replace(su.attack, start_std=0.0)
  keys = (("loss", "loss_peer", "loss_student") if su.method == "peeraid"
          else ("loss", "inner_kl"))
  s32 = su.make_state()
  to64 = lambda t: jax.tree.map(lambda v: np.asarray(v, np.float64), t)
  p0, ms0 = to64(s32.params), to64(s32.model_state)
  x64 = imgs.astype(np.float64) / 255.0
  tstep0 = su.torch_for(attack0)
  for net in tstep0.nets().values():
    net.double()
  teacher = getattr(tstep0, "teacher", None)   # a copy too (torch_for)
  if teacher is not None:
    teacher.double()
  _exact_norm(tstep0, su.norm)
  jax.config.update("jax_enable_x64", True)
  try:
    step0 = jax.jit(clf.make_train_step(
        with_augmentation(su.loss_for(attack0), su.config, NUM_CLASSES),
        su.optimizer))
    state0 = TrainState.create(jax.tree.map(jnp.asarray, p0), su.optimizer,
                               jax.random.key(0),
                               jax.tree.map(jnp.asarray, ms0))
    ctx = None if su.ctx is None else jax.tree.map(jnp.asarray, to64(su.ctx))
    state1, m_j = step0(state0, {"image": jnp.asarray(x64),
                                 "label": jnp.asarray(labels)}, ctx)
    m_j = {k: float(v) for k, v in m_j.items()}
    p1_j = to64(state1.params)
    ms1_j = to64(state1.model_state)
    x_t = torch.from_numpy(np.ascontiguousarray(x64.transpose(0, 3, 1, 2)))
    m_t = tstep0(x_t.to(tdev),
                 torch.from_numpy(labels.astype(np.int64)).to(tdev))
    p1_t, ms1_t = map(to64, _torch_vars(su, tstep0))
  finally:
    jax.config.update("jax_enable_x64", False)
  out = {"dtype": "float64"}
  for k in keys:
    a, b = m_j[k], float(m_t[k])
    out[f"{k}_tsjax"], out[f"{k}_torch"] = a, b
    out[f"{k}_rel_err"] = abs(a - b) / max(abs(b), 1e-300)
  diff, scale, rel = _rel_update(p1_j, p1_t, p0)
  out.update(update_max_abs_diff=diff, update_max_abs=scale,
             update_rel_err=rel, tolerance=CHECK_RTOL,
             finite=bool(m_j["finite"]))
  if jax.tree.leaves(ms0):
    # information only: Flax's running variance uses the biased batch
    # variance, PyTorch's the unbiased one (a relative n / (n - 1)).
    out["bn_stats_update_rel_err"] = _rel_update(ms1_j, ms1_t, ms0)[2]
  out["ok"] = (out["update_rel_err"] <= CHECK_RTOL and out["finite"] and
               all(out[f"{k}_rel_err"] <= CHECK_RTOL for k in keys))
  return out


# ------------------------------------------------------------------ timing
def sync(device):
  if device.type == "cuda":
    torch.cuda.synchronize(device)


def _time(fn, finish) -> float:
  t0 = time.perf_counter()
  finish(fn())
  return time.perf_counter() - t0


def _summary(times) -> dict:
  return {"median_ms": 1e3 * statistics.median(times),
          "min_ms": 1e3 * min(times), "all_ms": [1e3 * t for t in times]}


def interleaved(variants: dict, repeats: int, label: str, per: int = 1,
                unit: str = "") -> dict:
  """``{name: (run, finish, threads)}``: each repeat runs every variant once,
  in an order rotated per repeat; per-call wall times in s."""
  names = list(variants)
  times = {n: [] for n in names}
  loads = []
  for r in range(repeats):
    order = names[r % len(names):] + names[:r % len(names)]
    for n in order:
      run, finish, threads = variants[n]
      if threads:
        torch.set_num_threads(threads)
      times[n].append(_time(run, finish))
    loads.append(os.getloadavg()[0])
    print(f"  {label} repeat {r + 1}/{repeats} (load {loads[-1]:.2f}): " +
          "  ".join(f"{n} {1e3 * times[n][-1] / per:.0f}" for n in names) +
          f" ms{unit}", flush=True)
  return times, loads


def variant(threads: int, layout: str) -> str:
  """Timing key of PyTorch on ``threads`` threads in ``layout`` (NCHW keeps
  the key it had before layouts were timed)."""
  return f"torch_{threads}t" + ("" if layout == "nchw" else f"_{layout}")


def check_layout(su: Setup, layout, imgs, labels, tdev) -> dict:
  """One float32 PyTorch step in ``layout`` and one in NCHW from the same
  weights and batch, PGD from ``x``: the same losses up to float32 rounding
  (and the odd sign-step flip): the layouts time the same computation."""
  attack0 = dataclasses.replace(su.attack, start_std=0.0)
  x = torch.from_numpy(np.ascontiguousarray(
      imgs.transpose(0, 3, 1, 2))).to(tdev)
  y = torch.from_numpy(labels.astype(np.int64)).to(tdev)
  ref = su.torch_for(attack0, "nchw")(x, y)
  got = su.torch_for(attack0, layout)(
      x.contiguous(memory_format=ats.memory_format(layout)), y)
  err = max(abs(float(got[k]) - float(ref[k])) / max(abs(float(ref[k])), 1e-30)
            for k in ref)
  return {"layout": layout, "loss_rel_err": err, "tolerance": LAYOUT_RTOL,
          "ok": err <= LAYOUT_RTOL}


def bench_method(method, args, jdev, tdev) -> dict:
  dataset, image_shape, _ = SETTINGS[args.model]
  n_steps = args.steps_per_repeat
  t0 = time.perf_counter()
  su = build(method, args, jdev, tdev)
  rng = np.random.default_rng(args.seed)
  imgs = rng.integers(0, 256, (args.batch, *image_shape), dtype=np.uint8)
  labels = rng.integers(0, NUM_CLASSES, (args.batch,)).astype(np.int32)
  batch = {"image": jax.device_put(imgs, jdev),
           "label": jax.device_put(labels, jdev)}
  x_u8_t = torch.from_numpy(np.ascontiguousarray(
      imgs.transpose(0, 3, 1, 2))).to(tdev)
  y_t = torch.from_numpy(labels.astype(np.int64)).to(tdev)
  print(f"\n{method} ({args.model}, {dataset} setting, batch {args.batch}): "
        f"parameters {su.counts}", flush=True)
  check = None
  if not args.skip_check:
    check = check_step(su, imgs, labels, tdev)
    keys = [k[:-8] for k in check if k.endswith("_rel_err")
            and not k.startswith(("update", "bn_"))]
    print("  float64 step check (PGD start at x): " +
          ", ".join(f"{k} rel err {check[k + '_rel_err']:.1e}" for k in keys) +
          f", parameter update rel err {check['update_rel_err']:.1e} -> "
          f"{'ok' if check['ok'] else 'MISMATCH'}", flush=True)
    if not check["ok"]:
      raise SystemExit(f"{method}: tsjax and torch steps disagree beyond "
                       f"{CHECK_RTOL}; not timing different computations")
  layout_checks = {}
  for layout in args.torch_layouts:
    if layout != "nchw":
      c = layout_checks[layout] = check_layout(su, layout, imgs, labels, tdev)
      print(f"  PyTorch {layout} step vs NCHW (float32, PGD start at x): "
            f"loss rel err {c['loss_rel_err']:.1e} -> "
            f"{'ok' if c['ok'] else 'MISMATCH'}", flush=True)
      if not c["ok"]:
        raise SystemExit(f"{method}: PyTorch {layout} and NCHW steps "
                         f"disagree beyond {LAYOUT_RTOL}")
  # one PyTorch step per layout, each on its own copy of the initial nets
  tsteps = {layout: su.tstep if layout == "nchw" else
            su.torch_for(su.attack, layout) for layout in args.torch_layouts}
  x_u8 = {layout: x_u8_t.contiguous(memory_format=ats.memory_format(layout))
          for layout in args.torch_layouts}
  setup_s = time.perf_counter() - t0

  # ---- compile + warm-up (untimed); donation check on the first call
  state = su.make_state()
  first = state
  t0 = time.perf_counter()
  state, metrics = su.step(state, batch, su.ctx)
  jax.block_until_ready(state)
  compile_s = time.perf_counter() - t0
  donated = all(leaf.is_deleted() for leaf in jax.tree.leaves(first.params))
  del first
  for _ in range(args.warmup):
    state, metrics = su.step(state, batch, su.ctx)
  jax.block_until_ready(state)
  torch.manual_seed(args.seed)
  t0 = time.perf_counter()
  tout = None
  for threads in args.torch_threads:
    torch.set_num_threads(threads)
    for layout, tstep in tsteps.items():
      for _ in range(max(args.warmup, 1)):
        tout = tstep(x_u8[layout], y_t)
  sync(tdev)
  torch_warm_s = time.perf_counter() - t0
  print(f"  tsjax compile + first step {compile_s:.1f} s (state donated: "
        f"{donated}); torch warm-up {torch_warm_s:.1f} s; timing "
        f"{args.repeats} x {n_steps} steps per variant", flush=True)

  def run_tsjax():
    nonlocal state, metrics
    for _ in range(n_steps):
      state, metrics = su.step(state, batch, su.ctx)
    return state

  def run_torch(layout):
    nonlocal tout
    for _ in range(n_steps):
      tout = tsteps[layout](x_u8[layout], y_t)
    return tout

  variants = {"tsjax": (run_tsjax, jax.block_until_ready, None)}
  for threads in args.torch_threads:
    for layout in args.torch_layouts:
      variants[variant(threads, layout)] = (
          lambda layout=layout: run_torch(layout), lambda _: sync(tdev),
          threads)
  load_before = uptime()
  times, loads = interleaved(variants, args.repeats, "step", n_steps,
                             "/step")
  row = {"method": method, "model": args.model, "dataset_setting": dataset,
         "steps_per_repeat": n_steps, "load_before": load_before,
         "load_per_repeat": loads, "load_after": uptime()}
  for n, ts in times.items():
    row[n] = _summary([t / n_steps for t in ts])
  row["tsjax_ms"] = row["tsjax"]["median_ms"]
  for threads in args.torch_threads:
    # the reference: the faster layout at this thread count
    best = min(args.torch_layouts,
               key=lambda l: row[variant(threads, l)]["median_ms"])
    tm = row[variant(threads, best)]["median_ms"]
    row[f"torch_{threads}t_layout"] = best
    row[f"torch_{threads}t_best_ms"] = tm
    row[f"speedup_vs_torch_{threads}t"] = tm / row["tsjax_ms"]
  row["layout_checks"] = layout_checks
  row.update({
      "params": su.counts, "check": check, "tsjax_compile_s": compile_s,
      "setup_s": setup_s, "tsjax_state_donated": donated,
      # jit cache entries after every step: 1 = compiled once, no retracing
      "tsjax_step_compilations": int(su.step._cache_size()),
      "final_loss_tsjax": float(metrics["loss"]),
      "final_loss_torch": float(tout["loss"]),
      "finite": bool(metrics["finite"]) and bool(torch.isfinite(tout["loss"])),
      "tsjax_steps_run": int(state.step),
  })
  if args.breakdown:
    row["breakdown"] = breakdown(su, state, batch, tsteps, x_u8, args)
  return row


def breakdown(su, state, batch, tsteps, x_u8, args) -> dict:
  """The attack alone in both frameworks (median ms); update = step - attack."""
  x_j = batch["image"].astype(jnp.float32) / 255.0
  key = jax.random.key(1)
  params, ms = state.params, state.model_state
  tdev = next(iter(x_u8.values())).device
  variants = {"tsjax": (lambda: su.attack_fn(params, ms, x_j, key, su.ctx),
                        jax.block_until_ready, None)}
  for threads in args.torch_threads:
    for layout in args.torch_layouts:
      x_t = x_u8[layout].float() / 255.0
      variants[variant(threads, layout)] = (
          lambda t=tsteps[layout], x=x_t: t.attack(x), lambda _: sync(tdev),
          threads)
  for run, finish, threads in variants.values():   # compile / warm up
    if threads:
      torch.set_num_threads(threads)
    finish(run())
    finish(run())
  times, loads = interleaved(variants, args.repeats, "attack")
  return {"attack": {n: _summary(ts) for n, ts in times.items()},
          "load_per_repeat": loads}


# -------------------------------------------------------------- reporting
def print_table(result: dict) -> None:
  threads = result["torch_threads"]
  print(f"\n{result['model']} distillation steps (PGD loop "
        f"{result['pgd_loop']}), batch {result['batch']}, "
        f"float32, backend {result['backend']}, median ms/step of "
        f"{result['repeats']} interleaved repeats (load average "
        f"{result['load_before'][0]:.1f} before, "
        f"{result['load_after'][0]:.1f} after):")
  hdr = f"{'method':<12} | {'tsjax':>8}"
  layouts = result["torch_layouts"]
  for t in threads:
    hdr += "".join(f" | {f'torch {t}t {l}':>22}" for l in layouts)
    hdr += f" | {'speed-up':>8}"
  print(hdr)
  print("-" * len(hdr))
  for r in result["rows"]:
    line = f"{r['method']:<12} | {r['tsjax_ms']:>8.1f}"
    for t in threads:
      line += "".join(f" | {r[variant(t, l)]['median_ms']:>22.1f}"
                      for l in layouts)
      line += f" | {r[f'speedup_vs_torch_{t}t']:>7.2f}x"
    print(line)
    if "breakdown" in r:
      b = r["breakdown"]["attack"]
      line = f"{'  attack':<12} | {b['tsjax']['median_ms']:>8.1f}"
      for t in threads:
        tb = {l: b[variant(t, l)]["median_ms"] for l in layouts}
        line += "".join(f" | {tb[l]:>22.1f}" for l in layouts)
        line += f" | {min(tb.values()) / b['tsjax']['median_ms']:>7.2f}x"
      print(line)
  print("speed-up = the faster PyTorch layout's time / tsjax time (> 1: tsjax "
        "faster)")


def save(result: dict, machine: dict, args) -> pathlib.Path:
  path, data, command = open_results("distill_step", machine, args)
  run_key = args.model + ("_pgd_rolled" if args.pgd_loop == "rolled" else "")
  merge_rows(data, run_key, result, machine, command, "method", METHODS)
  return write_results(path, data)


def main(argv=None) -> None:
  args = parse_args(argv)
  # The XLA flags experiments/distill.py runs with (before JAX starts).
  prepare_backend(IMAGE_XLA_FLAGS)
  if args.pgd_loop == "rolled":
    pgd_module = importlib.import_module("tsjax.attacks.pgd")
    pgd_module.CPU_UNROLL_MAX_STEPS = 0      # auto_unroll -> False
  if args.device == "gpu":
    if jax.default_backend() != "gpu" or not torch.cuda.is_available():
      raise SystemExit(f"--device gpu needs jax's GPU backend (have "
                       f"{jax.default_backend()}) and torch cuda (available: "
                       f"{torch.cuda.is_available()})")
    jdev, tdev = jax.devices("gpu")[0], torch.device("cuda")
    torch.backends.cudnn.benchmark = True
  else:
    jdev, tdev = jax.devices("cpu")[0], torch.device("cpu")
  torch.set_num_threads(args.torch_threads[0])
  machine = machine_info(tdev)
  machine["backend"] = jdev.platform
  machine["device_kind"] = jdev.device_kind
  machine["loadavg_before"] = loadavg()
  machine["uptime_before"] = uptime()
  print(f"jax {jax.__version__} ({jdev.platform}, {jdev.device_kind}), torch "
        f"{torch.__version__} ({tdev}, threads {args.torch_threads}; "
        f"os.cpu_count() {os.cpu_count()}), cpu: {machine['cpu_model']}, "
        f"model {args.model}, batch {args.batch}, load average "
        f"{machine['loadavg_before']}", flush=True)
  t0 = time.perf_counter()
  with jax.default_device(jdev):
    rows = [bench_method(m, args, jdev, tdev) for m in args.methods]
  machine["loadavg_after"] = loadavg()
  machine["uptime_after"] = uptime()
  dataset, image_shape, _ = SETTINGS[args.model]
  result = {
      "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "model": args.model, "dataset_setting": dataset, "dtype": "float32",
      "batch": args.batch, "image_shape": list(image_shape),
      "backend": jdev.platform, "repeats": args.repeats,
      "warmup": args.warmup, "torch_threads": args.torch_threads,
      "torch_layouts": args.torch_layouts,
      "pgd_loop": args.pgd_loop,
      "timing": "median (and min) over repeats of per-step wall time; "
                "compilation and warm-up excluded; variants interleaved "
                "with the order rotated per repeat",
      "load_before": machine["loadavg_before"],
      "load_after": machine["loadavg_after"],
      "total_s": time.perf_counter() - t0,
      "rows": rows,
  }
  print_table(result)
  path = save(result, machine, args)
  print(f"\nsaved {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}"
        f" (total {result['total_s']:.0f} s)")


if __name__ == "__main__":
  main()
