"""One PGD-10 adversarial-training step: tsjax (jitted) vs PyTorch (eager).

The step (Madry et al. PGD-AT): L-inf PGD, 10 steps, uniform random start,
inputs kept in [0, 1], the model in **eval** mode while attacking (running
batch-norm statistics); then one **train**-mode cross-entropy step at the
adversarial examples with SGD (momentum 0.9, coupled weight decay 5e-4 on
every parameter). Batch 128 of uint8 images (converted to [0, 1] floats
inside the step), 10 classes, the data set's mean / std normalisation inside
the model. Two input shapes (``--shapes``), each with its data set's
hyper-parameters:

* ``cifar``: 32x32x3, ``configs/adv_train.py:cifar10,pgd_at`` (eps 8/255,
  step 2/255, lr 0.1);
* ``fmnist``: 28x28x1, ``configs/adv_train.py:fashion_mnist,pgd_at`` (eps
  0.1, step 0.025, lr 0.05): the step ``benchmarks/image_run.py`` runs end
  to end. Its rows are named ``<model>_28x28x1``.

By default the small CNN runs on both shapes and PreAct ResNet-18 on the
CIFAR shape only; ``--shapes`` applies the given shapes to every model.

* tsjax: the train step is built exactly as ``experiments/train.py`` builds
  it, ``clf.jit_train_step(with_augmentation(method_loss(config, model),
  config, 10), optimizer)`` with ``config.augment = ""`` (no augmentation) and
  ``clf.make_optimizer(config.train, ...)``; the state is donated each step.
* PyTorch: an eager implementation written here with the same architectures
  (tests/torch_nets.py: ``TorchSmallCNN``, ``TorchResNet18(preact=True)``,
  layer for layer the Flax ``SmallCNN`` / ``PreActResNet18``), the same
  attack loop (gradient of the summed per-example CE w.r.t. the perturbation
  only; parameters get no gradient while attacking) and
  ``torch.optim.SGD(lr=<config lr>, momentum=0.9, weight_decay=5e-4)``.
  ``torch.set_num_threads(os.cpu_count())`` (or ``--torch-threads``); on a
  GPU ``cudnn.benchmark = True``. PyTorch runs in two memory layouts
  (``--torch-layouts``): NCHW (its default) and ``channels_last`` (model and
  input batch; oneDNN's preferred layout on CPUs), each its own model copy
  and optimizer from the same weights; the **faster layout is the
  reference** (``torch_ms``, ``speedup``, ``torch_layout``), both are
  reported (``torch_by_layout_ms``; ``speedup_vs_nchw`` for the record). On
  a CPU shared with other jobs, PyTorch's OpenMP parallel regions (one
  barrier per op, ~100 ops per PGD iteration) stall whenever one of their
  threads is preempted, so PyTorch suffers more from machine load than
  XLA's thread pool: compare on an idle machine.

Comparable work is checked before timing, for every PyTorch layout: equal
parameter (and batch-norm statistic) counts; the tsjax initial weights are
copied into the PyTorch model and clean logits (eval and train mode) and the
input gradient of the summed CE agree on 32 images (float32, full-precision
matmuls; max abs error <= 1e-4 relative to the largest logit / gradient
entry; the gradient per example, in at least 75% of the examples, because a
ReLU input within rounding of 0 may flip in one framework and change that
example's gradient by ~1e-3). Both frameworks start training from those same
weights.

Timing: compilation and warm-up (``--warmup`` steps, default 2) excluded;
``--repeats`` timed repeats of ``--steps-per-repeat`` consecutive steps each,
tsjax and each PyTorch layout interleaved repeat by repeat (so load drift
hits all); per-step time = repeat wall time / steps; the median (and min)
over repeats is reported. tsjax repeats end with ``jax.block_until_ready``,
PyTorch repeats with ``torch.cuda.synchronize()`` on a GPU.

``--bf16``: tsjax models built with ``dtype=jnp.bfloat16`` (bfloat16
compute, float32 parameters); PyTorch under ``torch.autocast(...,
dtype=torch.bfloat16)`` for the attack and the train step. Perturbations,
parameters and optimizer state stay float32 in both.

``--breakdown``: additionally times the pieces of the step (eval forward,
one attack iteration = forward + gradient w.r.t. the input, the whole
10-step attack, the train-mode forward + backward without the update) in both
frameworks (PyTorch in its reference layout).
``benchmarks/adv_train_step_profile.py`` goes further (why the tsjax attack
loop is slower than its iterations on XLA CPU).

Run from the repository root (runs unchanged on a GPU: jax's default backend,
torch on ``cuda`` when available)::

  python benchmarks/adv_train_step.py                        # both models
  python benchmarks/adv_train_step.py --models small_cnn --repeats 7  # 2 shapes
  python benchmarks/adv_train_step.py --models small_cnn --shapes fmnist
  python benchmarks/adv_train_step.py --torch-layouts nchw  # before: NCHW only
  python benchmarks/adv_train_step.py --bf16
  python benchmarks/adv_train_step.py --quick                # sanity run

Results: a table on stdout and
``benchmarks/results/adv_train_step_<backend>.json`` (one entry per
dtype, one row per model and shape; ``--quick`` writes
``adv_train_step_<backend>_quick.json``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import statistics
import sys
import time

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
import torch.nn.functional as F  # noqa: E402

from _common import (loadavg, machine_info, merge_rows,  # noqa: E402
                     open_results, write_results)
from tests.torch_nets import TorchResNet18, TorchSmallCNN  # noqa: E402
from tsjax.configs.adv_train import get_config  # noqa: E402
from experiments.common import IMAGE_XLA_FLAGS, prepare_backend  # noqa: E402
from experiments.train import attack_spec, method_loss, validate, with_augmentation  # noqa: E402
from tsjax import models  # noqa: E402
from tsjax.data import images  # noqa: E402
from tsjax.train import TrainState  # noqa: E402
from tsjax.train import classifier as clf  # noqa: E402

MODELS = ("small_cnn", "preact_resnet18")
BATCH = 128
NUM_CLASSES = 10
# Input shapes: (image shape, config variant, data set for mean / std,
# training-set size after the config's num_val, row-name suffix).
SHAPES = {
    "cifar": ((32, 32, 3), "cifar10,pgd_at", "cifar10", 50_000 - 1_000, ""),
    "fmnist": ((28, 28, 1), "fashion_mnist,pgd_at", "fashion_mnist",
               60_000 - 5_000, "_28x28x1"),
}
DEFAULT_SHAPES = {"small_cnn": ("cifar", "fmnist"),
                  "preact_resnet18": ("cifar",)}
LAYOUTS = ("nchw", "channels_last")
ROW_ORDER = tuple(m + SHAPES[s][4] for m in MODELS for s in SHAPES)
QUICK = {"models": "small_cnn", "repeats": 2, "steps_per_repeat": 1,
         "warmup": 1}
CHECK_RTOL = 1e-4               # max abs error / max abs value, float32
GRAD_FRACTION = 0.75            # examples whose input gradients must agree


# ------------------------------------------------------------------ arguments
def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--models", default=None,
                 help=f"comma-separated, from {MODELS} (default: both; "
                      f"{QUICK['models']} with --quick)")
  p.add_argument("--repeats", type=int, default=None,
                 help="timed repeats per model and framework (default 5; "
                      f"{QUICK['repeats']} with --quick)")
  p.add_argument("--steps-per-repeat", type=int, default=None,
                 help="consecutive train steps per timed repeat (default 3 "
                      "for small_cnn and 1 for preact_resnet18 on CPU, 10 on "
                      f"an accelerator; {QUICK['steps_per_repeat']} with "
                      "--quick)")
  p.add_argument("--warmup", type=int, default=None,
                 help="untimed steps after compilation (default 2; "
                      f"{QUICK['warmup']} with --quick)")
  p.add_argument("--shapes", default=None,
                 help=f"comma-separated input shapes from {tuple(SHAPES)} "
                      "for every model (default: small_cnn on both, "
                      "preact_resnet18 on cifar)")
  p.add_argument("--torch-layouts", default=",".join(LAYOUTS),
                 help=f"PyTorch memory layouts timed, from {LAYOUTS}; the "
                      "faster is the reference")
  p.add_argument("--batch", type=int, default=BATCH)
  p.add_argument("--bf16", action="store_true",
                 help="bfloat16 compute (tsjax model dtype, torch autocast)")
  p.add_argument("--breakdown", action="store_true",
                 help="also time the pieces of the step in both frameworks")
  p.add_argument("--skip-check", action="store_true",
                 help="skip the architecture agreement check")
  p.add_argument("--quick", action="store_true",
                 help="sanity run (small_cnn, 2 repeats of 1 step)")
  p.add_argument("--torch-threads", type=int, default=None,
                 help="torch.set_num_threads (default os.cpu_count(); a "
                      "different value is a sensitivity check and is saved "
                      "under its own key in the JSON)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None,
                 help="JSON path (default benchmarks/results/"
                      "adv_train_step_<backend>[_quick].json)")
  a = p.parse_args(argv)
  a.argv = list(sys.argv[1:] if argv is None else argv)
  if a.models is None:
    a.models = QUICK["models"] if a.quick else ",".join(MODELS)
  a.models = [m.strip() for m in a.models.split(",") if m.strip()]
  bad = [m for m in a.models if m not in MODELS]
  if bad or not a.models:
    p.error(f"--models takes names from {MODELS}, got {bad or a.models}")
  if a.shapes is not None:
    a.shapes = [s.strip() for s in a.shapes.split(",") if s.strip()]
    if not a.shapes or any(s not in SHAPES for s in a.shapes):
      p.error(f"--shapes takes names from {tuple(SHAPES)}, got {a.shapes}")
  a.cases = [(m, s) for m in a.models
             for s in (a.shapes or DEFAULT_SHAPES[m])]
  a.torch_layouts = parse_layouts(p, a.torch_layouts)
  for name, default in (("repeats", 5), ("warmup", 2)):
    if getattr(a, name) is None:
      setattr(a, name, QUICK[name] if a.quick else default)
  if a.quick and a.steps_per_repeat is None:
    a.steps_per_repeat = QUICK["steps_per_repeat"]
  if a.repeats < 1 or a.warmup < 0 or a.batch < 1 or (
      a.steps_per_repeat is not None and a.steps_per_repeat < 1):
    p.error("--repeats, --steps-per-repeat, --batch must be >= 1 and "
            "--warmup >= 0")
  return a


def steps_per_repeat(args, model_name: str, on_cpu: bool) -> int:
  if args.steps_per_repeat is not None:
    return args.steps_per_repeat
  if not on_cpu:
    return 10
  return 3 if model_name == "small_cnn" else 1


# ------------------------------------------------------------ torch models
def torch_model(name, mean, std, image_shape):
  h, w, c = image_shape
  if name == "small_cnn":
    return TorchSmallCNN(NUM_CLASSES, in_channels=c, hw=(h, w), mean=mean,
                         std=std)
  return TorchResNet18(NUM_CLASSES, preact=True, final_bn=True,
                       in_channels=c, mean=mean, std=std)


def parse_layouts(parser, text: str) -> list[str]:
  """``--torch-layouts``: comma-separated names from ``LAYOUTS``."""
  layouts = [s.strip() for s in text.split(",") if s.strip()]
  if not layouts or any(s not in LAYOUTS for s in layouts):
    parser.error(f"--torch-layouts takes names from {LAYOUTS}, got {layouts}")
  return layouts


def memory_format(layout: str):
  return torch.channels_last if layout == "channels_last" else \
      torch.contiguous_format


# ------------------------------------------------ tsjax -> torch weights
def _t(a):
  return torch.from_numpy(np.array(a, dtype=np.float32))


def _conv_w(k):   # HWIO -> OIHW
  return _t(np.transpose(np.asarray(k), (3, 2, 0, 1)))


def _dense_w(k):  # (in, out) -> (out, in)
  return _t(np.asarray(k).T)


def torch_state_dict(name, params, model_state) -> dict:
  """The PyTorch ``state_dict`` of the tsjax ``params`` / ``batch_stats``."""
  sd = {}
  if name == "small_cnn":
    sd["conv1.weight"] = _conv_w(params["conv1"]["kernel"])
    sd["conv1.bias"] = _t(params["conv1"]["bias"])
    sd["conv2.weight"] = _conv_w(params["conv2"]["kernel"])
    sd["conv2.bias"] = _t(params["conv2"]["bias"])
    k = np.asarray(params["fc1"]["kernel"])          # rows in (h, w, c) order
    c = np.asarray(params["conv2"]["kernel"]).shape[-1]
    side = int(round((k.shape[0] // c) ** 0.5))
    k = k.reshape(side, side, c, -1).transpose(2, 0, 1, 3).reshape(
        k.shape[0], -1)                              # rows in (c, h, w) order
    sd["fc1.weight"] = _dense_w(k)
    sd["fc1.bias"] = _t(params["fc1"]["bias"])
    sd["fc.weight"] = _dense_w(params["fc"]["kernel"])
    sd["fc.bias"] = _t(params["fc"]["bias"])
    return sd
  stats = model_state["batch_stats"]

  def bn(prefix, p, s):
    sd[f"{prefix}.weight"] = _t(p["scale"])
    sd[f"{prefix}.bias"] = _t(p["bias"])
    sd[f"{prefix}.running_mean"] = _t(s["mean"])
    sd[f"{prefix}.running_var"] = _t(s["var"])
    sd[f"{prefix}.num_batches_tracked"] = torch.tensor(0)

  sd["conv1.weight"] = _conv_w(params["stem_conv"]["kernel"])
  for s in range(1, 5):
    for i in range(2):
      fp, fs, tp = params[f"layer{s}_{i}"], stats[f"layer{s}_{i}"], \
          f"layer{s}.{i}"
      bn(f"{tp}.bn1", fp["bn1"], fs["bn1"])
      bn(f"{tp}.bn2", fp["bn2"], fs["bn2"])
      sd[f"{tp}.conv1.weight"] = _conv_w(fp["conv1"]["kernel"])
      sd[f"{tp}.conv2.weight"] = _conv_w(fp["conv2"]["kernel"])
      if "shortcut_conv" in fp:
        sd[f"{tp}.shortcut.0.weight"] = _conv_w(fp["shortcut_conv"]["kernel"])
  bn("bn", params["final_bn"], stats["final_bn"])
  sd["linear.weight"] = _dense_w(params["fc"]["kernel"])
  sd["linear.bias"] = _t(params["fc"]["bias"])
  return sd


def count_tsjax(tree) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def count_torch(model) -> tuple[int, int]:
  n_params = sum(p.numel() for p in model.parameters())
  n_stats = sum(b.numel() for n, b in model.named_buffers()
                if n.endswith(("running_mean", "running_var")))
  return int(n_params), int(n_stats)


# --------------------------------------------------------------- the steps
def tsjax_config(model_name: str, variant: str = "cifar10,pgd_at"):
  # cifar10: eps 8/255, step 2/255, lr 0.1; fashion_mnist: eps 0.1, step
  # 0.025, lr 0.05; both 10 steps, eval-mode attack.
  c = get_config(variant)
  c.augment = ""                     # no augmentation: only the PGD-AT step
  c.model.name, c.model.kwargs = model_name, {}   # the model's defaults
  c.train.batch_size = BATCH
  validate(c)
  return c


def build_tsjax(model_name, mean, std, dtype, key, shape="cifar"):
  image_shape, variant, _, train_size, _ = SHAPES[shape]
  config = tsjax_config(model_name, variant)
  kwargs = {"dtype": jnp.bfloat16} if dtype == "bfloat16" else {}
  model = models.get_model(model_name, num_classes=NUM_CLASSES, mean=mean,
                           std=std, **kwargs)
  models.check_input_shape(model, image_shape)
  optimizer, _ = clf.make_optimizer(config.train,
                                    train_size // config.train.batch_size)
  k_init, k_train = jax.random.split(key)
  params, model_state = clf.init_model(model, k_init, image_shape)
  step = clf.jit_train_step(
      with_augmentation(method_loss(config, model), config, NUM_CLASSES),
      optimizer)
  # A fresh state per call: the step donates (deletes) its input state.
  make_state = lambda: TrainState.create(
      jax.tree.map(jnp.copy, params), optimizer,
      jax.random.wrap_key_data(jnp.copy(jax.random.key_data(k_train))),
      jax.tree.map(jnp.copy, model_state))
  return config, model, params, model_state, step, make_state


class TorchAdvStep:
  """PGD-AT step in PyTorch eager mode, mirroring tsjax.methods.pgd_at."""

  def __init__(self, model, attack, train_cfg, device, bf16: bool):
    self.model = model
    self.eps = float(attack.eps)
    self.step_size = float(attack.step_size)
    self.steps = int(attack.steps)
    self.bn_eval = attack.bn_mode == "eval"
    self.device = device
    self.bf16 = bf16
    self.opt = torch.optim.SGD(model.parameters(), lr=float(train_cfg.lr),
                               momentum=float(train_cfg.momentum),
                               weight_decay=float(train_cfg.weight_decay),
                               nesterov=bool(train_cfg.get("nesterov", False)))

  def autocast(self):
    return torch.autocast(self.device.type, dtype=torch.bfloat16,
                          enabled=self.bf16)

  def attack(self, x, y):
    eps, a = self.eps, self.step_size
    self.model.train(not self.bn_eval)
    delta = torch.empty_like(x).uniform_(-eps, eps)
    delta = (x + delta).clamp_(0.0, 1.0) - x
    for _ in range(self.steps):
      delta.requires_grad_(True)
      with self.autocast():
        logits = self.model(x + delta)
      loss = F.cross_entropy(logits.float(), y, reduction="sum")
      grad, = torch.autograd.grad(loss, delta)
      with torch.no_grad():
        delta = (delta + a * grad.sign()).clamp_(-eps, eps)
        delta = (x + delta).clamp_(0.0, 1.0) - x
    return (x + delta).detach()

  def train_update(self, x_adv, y):
    self.model.train(True)
    with self.autocast():
      logits = self.model(x_adv)
    loss = F.cross_entropy(logits.float(), y)
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    self.opt.step()
    return loss.detach()

  def __call__(self, images_u8, labels):
    x = images_u8.float().div_(255.0)
    x_adv = self.attack(x, labels)
    return self.train_update(x_adv, labels)


def sync(device):
  if device.type == "cuda":
    torch.cuda.synchronize(device)


# ------------------------------------------------------------------- checks
def check_agreement(name, model_f32, params, model_state, tmodel, images_f,
                    labels, device, layout: str = "nchw") -> dict:
  """Clean logits (eval and train BN) and d(sum CE)/dx agree, float32 (the
  PyTorch model and inputs in ``layout``)."""
  x_j = jnp.asarray(images_f)
  y_j = jnp.asarray(labels)
  x_t = torch.from_numpy(np.ascontiguousarray(
      images_f.transpose(0, 3, 1, 2))).to(device).contiguous(
          memory_format=memory_format(layout))
  y_t = torch.from_numpy(labels.astype(np.int64)).to(device)
  variables = {"params": params, **model_state}

  def ce_sum(x):
    logits = model_f32.apply(variables, x, train=False)
    logp = jax.nn.log_softmax(logits)
    return -jnp.sum(jnp.take_along_axis(logp, y_j[:, None], axis=1))

  def train_logits(x):
    if model_state:
      return model_f32.apply(variables, x, train=True,
                             mutable=list(model_state))[0]
    return model_f32.apply(variables, x, train=True)

  prev = (torch.backends.cudnn.allow_tf32,
          torch.backends.cuda.matmul.allow_tf32)
  torch.backends.cudnn.allow_tf32 = False
  torch.backends.cuda.matmul.allow_tf32 = False
  try:
    with jax.default_matmul_precision("float32"):
      j_eval = np.asarray(jax.jit(
          lambda x: model_f32.apply(variables, x, train=False))(x_j))
      j_train = np.asarray(jax.jit(train_logits)(x_j))
      j_grad = np.asarray(jax.jit(jax.grad(ce_sum))(x_j))
    tmodel.eval()
    xg = x_t.clone().requires_grad_(True)
    t_eval_logits = tmodel(xg)
    F.cross_entropy(t_eval_logits, y_t, reduction="sum").backward()
    t_eval = t_eval_logits.detach().cpu().numpy()
    t_grad = xg.grad.detach().cpu().numpy().transpose(0, 2, 3, 1)
    # train-mode forward without touching the running statistics
    saved = {k: v.clone() for k, v in tmodel.state_dict().items()}
    tmodel.train()
    with torch.no_grad():
      t_train = tmodel(x_t).cpu().numpy()
    tmodel.load_state_dict(saved)
    tmodel.eval()
  finally:
    (torch.backends.cudnn.allow_tf32,
     torch.backends.cuda.matmul.allow_tf32) = prev

  def rel(a, b):
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))

  # Input gradients per example: a ReLU input within float32 rounding of 0
  # can take opposite sides in the two frameworks (and in float64), which
  # changes that example's gradient in the unit's receptive field by O(1e-3);
  # with ~1e7 ReLU inputs per batch this hits an occasional example. So the
  # gradient check asks most examples (not all) to agree to CHECK_RTOL.
  per_ex = [rel(t_grad[i], j_grad[i]) for i in range(len(j_grad))]
  out = {"logits_eval_rel_err": rel(t_eval, j_eval),
         "logits_train_rel_err": rel(t_train, j_train),
         "input_grad_rel_err": rel(t_grad, j_grad),
         "input_grad_median_example_rel_err": float(np.median(per_ex)),
         "input_grad_examples_within_tol": float(np.mean(
             np.asarray(per_ex) <= CHECK_RTOL)),
         "logits_eval_max_abs": float(np.max(np.abs(j_eval))),
         "examples": int(len(j_grad)),
         "tolerance": CHECK_RTOL, "layout": layout}
  out["ok"] = (out["logits_eval_rel_err"] <= CHECK_RTOL and
               out["logits_train_rel_err"] <= CHECK_RTOL and
               out["input_grad_examples_within_tol"] >= GRAD_FRACTION)
  return out


# ------------------------------------------------------------------ timing
def _time(fn, finish) -> float:
  t0 = time.perf_counter()
  finish(fn())
  return time.perf_counter() - t0


def breakdown(model_name, model, params, model_state, tstep, x_u8_j, y_j,
              x_u8_t, y_t, attack, device, repeats) -> dict:
  """Median ms of the pieces of one step, both frameworks (timed alone)."""
  from tsjax import losses
  from tsjax.methods.common import ce_attack, forward
  variables = {"params": params, **model_state}
  x_j = x_u8_j.astype(jnp.float32) / 255.0
  key = jax.random.key(1)

  def fwd(x):
    return model.apply(variables, x, train=False)

  def attack_iter(x):    # one PGD iteration: value and input gradient
    def l(xa):
      return losses.cross_entropy(model.apply(variables, xa, train=False),
                                  y_j)
    vals, vjp = jax.vjp(l, x)
    return vjp(jnp.ones_like(vals))[0]

  def full_attack(x):
    return ce_attack(model, params, model_state, x, y_j, key, attack)[0]

  def train_grad(x):
    def l(p):
      logits, ms = forward(model, p, model_state, x, train=True)
      return jnp.mean(losses.cross_entropy(logits, y_j)), ms
    return jax.grad(l, has_aux=True)(params)

  j_fns = {"forward_eval": jax.jit(fwd), "attack_iter": jax.jit(attack_iter),
           "attack_10": jax.jit(full_attack),
           "train_fwd_bwd": jax.jit(train_grad)}
  x_t = x_u8_t.float() / 255.0

  def t_fwd():
    tstep.model.eval()
    with torch.no_grad(), tstep.autocast():
      return tstep.model(x_t)

  def t_attack_iter():
    tstep.model.eval()
    d = x_t.clone().requires_grad_(True)
    with tstep.autocast():
      logits = tstep.model(d)
    return torch.autograd.grad(
        F.cross_entropy(logits.float(), y_t, reduction="sum"), d)[0]

  def t_attack():
    return tstep.attack(x_t, y_t)

  def t_train():   # forward + backward (no optimizer update)
    tstep.model.train()
    with tstep.autocast():
      logits = tstep.model(x_t)
    loss = F.cross_entropy(logits.float(), y_t)
    tstep.opt.zero_grad(set_to_none=True)
    loss.backward()
    return loss

  t_fns = {"forward_eval": t_fwd, "attack_iter": t_attack_iter,
           "attack_10": t_attack, "train_fwd_bwd": t_train}
  saved = {k: v.clone() for k, v in tstep.model.state_dict().items()}
  out = {}
  for piece in j_fns:
    jf, tf = j_fns[piece], t_fns[piece]
    jax.block_until_ready(jf(x_j))
    jax.block_until_ready(jf(x_j))
    tf(); tf(); sync(device)
    tj, tt = [], []
    for _ in range(repeats):
      tj.append(_time(lambda: jf(x_j), jax.block_until_ready))
      tt.append(_time(tf, lambda _: sync(device)))
    out[piece] = {"tsjax_ms": 1e3 * statistics.median(tj),
                  "torch_ms": 1e3 * statistics.median(tt)}
    print(f"    {piece:<14} tsjax {out[piece]['tsjax_ms']:9.1f} ms   torch "
          f"{out[piece]['torch_ms']:9.1f} ms", flush=True)
  tstep.model.load_state_dict(saved)
  tstep.opt.zero_grad(set_to_none=True)
  return out


def bench_model(name, args, torch_device, shape="cifar") -> dict:
  on_cpu = jax.default_backend() == "cpu"
  n_steps = steps_per_repeat(args, name, on_cpu)
  dtype = "bfloat16" if args.bf16 else "float32"
  image_shape, _, stats_name, _, suffix = SHAPES[shape]
  row_name = name + suffix
  mean, std = images._STATS[stats_name]
  key = jax.random.key(args.seed)
  t0 = time.perf_counter()
  config, model, params, model_state, step, make_state = build_tsjax(
      name, mean, std, dtype, key, shape)
  attack = attack_spec(config)

  rng = np.random.default_rng(args.seed)
  imgs = rng.integers(0, 256, (args.batch, *image_shape), dtype=np.uint8)
  labels = rng.integers(0, NUM_CLASSES, (args.batch,)).astype(np.int32)
  batch = {"image": jax.device_put(imgs), "label": jax.device_put(labels)}
  x_u8_nchw = torch.from_numpy(np.ascontiguousarray(
      imgs.transpose(0, 3, 1, 2))).to(torch_device)
  y_t = torch.from_numpy(labels.astype(np.int64)).to(torch_device)

  n_params_j = count_tsjax(params)
  n_stats_j = count_tsjax(model_state)
  f32_model = None
  if not args.skip_check:
    f32_model = models.get_model(name, num_classes=NUM_CLASSES, mean=mean,
                                 std=std)
  tsteps, x_u8, checks = {}, {}, {}
  for layout in args.torch_layouts:
    fmt = memory_format(layout)
    tmodel = torch_model(name, mean, std, image_shape)
    tmodel.load_state_dict(torch_state_dict(name, params, model_state))
    tmodel.to(torch_device)
    tmodel = tmodel.to(memory_format=fmt)
    n_params_t, n_stats_t = count_torch(tmodel)
    print(f"\n{row_name} ({'x'.join(map(str, image_shape))}), torch "
          f"{layout}: {n_params_j:,} parameters (torch {n_params_t:,}), "
          f"{n_stats_j:,} BN statistics (torch {n_stats_t:,})", flush=True)
    if (n_params_j, n_stats_j) != (n_params_t, n_stats_t):
      raise SystemExit(f"{row_name}: parameter counts differ; not timing "
                       "different architectures")
    if not args.skip_check:
      check = check_agreement(name, f32_model, params, model_state, tmodel,
                              imgs[:32].astype(np.float32) / 255.0,
                              labels[:32], torch_device, layout)
      print(f"  architecture check (32 images, float32, torch {layout}): "
            f"logits eval rel err {check['logits_eval_rel_err']:.1e}, train "
            f"{check['logits_train_rel_err']:.1e}, d(CE)/dx median per "
            f"example {check['input_grad_median_example_rel_err']:.1e} "
            f"({100 * check['input_grad_examples_within_tol']:.0f}% of "
            f"examples within {CHECK_RTOL:g}; max "
            f"{check['input_grad_rel_err']:.1e}) -> "
            f"{'ok' if check['ok'] else 'MISMATCH'}", flush=True)
      if not check["ok"]:
        raise SystemExit(f"{row_name}: tsjax and torch ({layout}) models "
                         f"disagree beyond {CHECK_RTOL}; not timing "
                         "different architectures")
      checks[layout] = check
    tsteps[layout] = TorchAdvStep(tmodel, attack, config.train, torch_device,
                                  args.bf16)
    x_u8[layout] = x_u8_nchw.contiguous(memory_format=fmt)
  setup_s = time.perf_counter() - t0

  # ---- compile + warm-up (untimed)
  state = make_state()
  t0 = time.perf_counter()
  state, metrics = step(state, batch, None)
  jax.block_until_ready(state)
  compile_s = time.perf_counter() - t0
  for _ in range(args.warmup):
    state, metrics = step(state, batch, None)
  jax.block_until_ready(state)
  tloss, torch_warm_s = {}, {}
  for layout, tstep in tsteps.items():
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    for _ in range(max(args.warmup, 1)):
      tloss[layout] = tstep(x_u8[layout], y_t)
    sync(torch_device)
    torch_warm_s[layout] = time.perf_counter() - t0
  print(f"  tsjax compile + first step {compile_s:.1f} s; torch warm-up "
        f"({max(args.warmup, 1)} steps) " + ", ".join(
            f"{k} {v:.1f} s" for k, v in torch_warm_s.items()) +
        f"; timing {args.repeats} x {n_steps} steps each", flush=True)

  def run_tsjax():
    nonlocal state, metrics
    for _ in range(n_steps):
      state, metrics = step(state, batch, None)
    return state

  def run_torch(layout):
    for _ in range(n_steps):
      tloss[layout] = tsteps[layout](x_u8[layout], y_t)
    return tloss[layout]

  t_j, t_t = [], {k: [] for k in tsteps}
  for r in range(args.repeats):   # interleaved
    t_j.append(_time(run_tsjax, jax.block_until_ready) / n_steps)
    for layout in tsteps:
      t_t[layout].append(_time(lambda: run_torch(layout),
                               lambda _: sync(torch_device)) / n_steps)
    print(f"  repeat {r + 1}/{args.repeats}: tsjax {1e3 * t_j[-1]:8.1f} "
          f"ms/step   torch " + "   ".join(
              f"{k} {1e3 * v[-1]:8.1f}" for k, v in t_t.items()) +
          " ms/step", flush=True)
  med_j = statistics.median(t_j)
  med_t = {k: statistics.median(v) for k, v in t_t.items()}
  ref = min(med_t, key=med_t.get)
  row = {
      "model": row_name,
      "architecture": name,
      "shape": shape,
      "image_shape": list(image_shape),
      "config_variant": SHAPES[shape][1],
      "tsjax_ms": 1e3 * med_j,
      "torch_ms": 1e3 * med_t[ref],
      "torch_layout": ref,
      "speedup": med_t[ref] / med_j,
      "torch_by_layout_ms": {k: 1e3 * v for k, v in med_t.items()},
      "speedup_vs_nchw": (med_t["nchw"] / med_j) if "nchw" in med_t else None,
      "tsjax_min_ms": 1e3 * min(t_j),
      "torch_min_ms": 1e3 * min(t_t[ref]),
      "tsjax_all_ms": [1e3 * t for t in t_j],
      "torch_all_ms": [1e3 * t for t in t_t[ref]],
      "torch_all_ms_by_layout": {k: [1e3 * t for t in v]
                                 for k, v in t_t.items()},
      "steps_per_repeat": n_steps,
      "params": n_params_j,
      "bn_statistics": n_stats_j,
      "check": checks.get(ref),
      "checks_by_layout": checks or None,
      "tsjax_compile_s": compile_s,
      "setup_s": setup_s,
      "final_loss_tsjax": float(metrics["loss"]),
      "final_loss_torch": float(tloss[ref]),
      "finite": bool(metrics["finite"]) and all(
          bool(torch.isfinite(v)) for v in tloss.values()),
      "tsjax_steps_run": int(state.step),
  }
  if args.breakdown:
    print(f"  breakdown (median of repeats; each piece timed alone; torch "
          f"{ref}):", flush=True)
    row["breakdown"] = breakdown(
        name, model, state.params, state.model_state, tsteps[ref],
        batch["image"], batch["label"], x_u8[ref], y_t, attack, torch_device,
        args.repeats)
  return row


# -------------------------------------------------------------- reporting
def print_table(result: dict) -> None:
  print(f"\nPGD-10 adversarial-training step, batch {result['batch']}, "
        f"{result['dtype']}, backend {result['backend']}, median of "
        f"{result['repeats']} repeats:")
  layouts = result["torch_layouts"]
  hdr = (f"{'model':<24} | {'tsjax ms/step':>13} | " + " | ".join(
      f"{'torch ' + k:>19}" for k in layouts) +
         f" | {'speed-up vs faster torch':>24}")
  print(hdr)
  print("-" * len(hdr))
  for r in result["rows"]:
    print(f"{r['model']:<24} | {r['tsjax_ms']:>13.1f} | " + " | ".join(
        f"{r['torch_by_layout_ms'][k]:>19.1f}" for k in layouts) +
          f" | {r['speedup']:>10.2f}x ({r['torch_layout']})")


def save(result: dict, machine: dict, args) -> pathlib.Path:
  path, data, command = open_results("adv_train_step", machine, args)
  run_key = result["dtype"]
  if result["torch_threads"] != os.cpu_count():
    run_key += f"_torch{result['torch_threads']}threads"
  merge_rows(data, run_key, result, machine, command, "model", ROW_ORDER)
  return write_results(path, data)


def main(argv=None) -> None:
  args = parse_args(argv)
  # The XLA flags and random-bit lowering experiments/train.py runs with
  # (before JAX starts).
  prepare_backend(IMAGE_XLA_FLAGS)
  torch.set_num_threads(args.torch_threads or os.cpu_count())
  torch_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  if torch_device.type == "cuda":
    torch.backends.cudnn.benchmark = True
  machine = machine_info(torch_device)
  machine["loadavg_before"] = loadavg()
  dtype = "bfloat16" if args.bf16 else "float32"
  print(f"jax {jax.__version__} ({jax.default_backend()}, "
        f"{jax.devices()[0].device_kind}), torch {torch.__version__} "
        f"({torch_device}, {torch.get_num_threads()} threads; os.cpu_count() "
        f"{os.cpu_count()}),"
        f" cpu: {machine['cpu_model']} x {os.cpu_count()}, dtype {dtype}, "
        f"batch {args.batch}, load average {machine['loadavg_before']}",
        flush=True)
  t0 = time.perf_counter()
  rows = [bench_model(name, args, torch_device, shape)
          for name, shape in args.cases]
  machine["loadavg_after"] = loadavg()
  result = {
      "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "dtype": dtype, "batch": args.batch,
      "shapes": {s: list(SHAPES[s][0]) for s in dict.fromkeys(
          s for _, s in args.cases)},
      "num_classes": NUM_CLASSES, "backend": jax.default_backend(),
      "repeats": args.repeats, "warmup": args.warmup,
      "step": "PGD-10 L-inf, uniform start, eval-mode attack, train-mode "
              "CE, SGD momentum 0.9 wd 5e-4; cifar shape: eps 8/255 step "
              "2/255 lr 0.1; fmnist shape: eps 0.1 step 0.025 lr 0.05",
      "timing": "median (and min) over repeats of per-step wall time; "
                "compilation and warm-up excluded; tsjax and every torch "
                "layout interleaved; speed-up against the faster layout",
      "torch_layouts": args.torch_layouts,
      "torch_threads": torch.get_num_threads(),
      "total_s": time.perf_counter() - t0,
      "rows": rows,
  }
  print_table(result)
  path = save(result, machine, args)
  print(f"\nsaved {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}"
        f" (total {result['total_s']:.0f} s; load average before/after "
        f"{machine['loadavg_before']} / {machine['loadavg_after']})")


if __name__ == "__main__":
  main()
