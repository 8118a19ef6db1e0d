r"""Image classifiers, every registered method: from scratch (standard, PGD-AT,
TRADES, CCAT) or distilled (KD, ARD, RSLAD, IAD, FunMatch, AdvFunMatch,
PeerAiD).

  python -m experiments.train --config configs/adv_train.py:fashion_mnist,pgd_at
  python -m experiments.train --config configs/adv_train.py:fashion_mnist,trades,smoke
  python -m experiments.train --config configs/adv_train.py:cifar10,ard \
      --config.data.data_dir=~/tensorflow_datasets \
      --config.teacher.torch_checkpoint=teacher.pt --workdir runs/c10_ard

Variant string (any order): one data set (fashion_mnist | cifar10 | cifar100 |
tiny_imagenet), one method of ``tsjax.methods.REGISTRY``, optionally
``smoke`` (a few steps on a data subset; what the tests run) and
``offsubspace_aug`` (an ``offsubspace`` section: half of each batch moved off
the training images' PCA subspace before the method's loss, e.g.
``fashion_mnist,rslad,offsubspace_aug``; ``tsjax.methods.offsubspace``) and,
with ``advfunmatch``, ``adaad`` (every choice of AdaAD, the closest public
code, instead of tsjax's documented defaults: ``_adaad``).

``method.options`` starts from the method's ``Options`` defaults;
``RECIPES[method]`` then sets what the paper's code runs. Fashion-MNIST
variants are CPU budgets (small CNN, L-inf eps 0.1). CIFAR / TinyImageNet
variants reproduce each reference *as executed* (``reference`` in the results
file; the recipe table of docs/training.md), with two deliberate differences kept as
defaults: model selection on a validation split carved from train
(``eval.select_on="test"`` reproduces the references' test-set selection;
``data.num_val=0`` their full training set).

Teachers (methods with ``needs_teacher``): ``teacher.checkpoint`` = the work
dir of an ``experiments.train`` run (``teacher.which``: best | last | swa), or
``teacher.torch_checkpoint`` = a PyTorch state_dict (RobustBench key names;
``teacher.model`` or ``teacher.robustbench`` (a RobustBench entry name) gives
the architecture, ``teacher.mean`` / ``teacher.std`` the input normalisation,
``teacher.sha256`` the checksum).
"""

import dataclasses

import ml_collections

from tsjax import methods, models
from tsjax.attacks import AttackSpec

DATASETS = ("fashion_mnist", "cifar10", "cifar100", "tiny_imagenet")
PAPER_DATASETS = DATASETS[1:]


def _base(dataset: str, method: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.reference = ""               # the code a paper variant reproduces

  c.data = ml_collections.ConfigDict()
  c.data.name = dataset
  c.data.data_dir = ml_collections.FieldReference(None, field_type=str)
  c.data.num_val = 5000          # validation split carved from train (seeded)
  c.data.train_subset = 0        # > 0: use only this many training examples
  c.data.test_subset = 0         # > 0: evaluate on the first N test examples

  c.model = ml_collections.ConfigDict()
  c.model.name = "small_cnn"
  c.model.kwargs = ml_collections.ConfigDict()
  c.model.normalize = True       # (x - mean) / std of the data set inside the model

  # On-device augmentation spec (tsjax.data.augment.parse_augment_spec), e.g.
  # "crop_flip", "crop_flip,autoaugment_cifar10", "crop_flip,mixup".
  c.augment = ""

  m = methods.get(method, "config variant")
  c.method = ml_collections.ConfigDict()
  c.method.name = method
  c.method.options = ml_collections.ConfigDict(m.default_options())
  # The inner maximisation: the fields of tsjax.attacks.AttackSpec.
  att = {f.name: f.default for f in dataclasses.fields(AttackSpec)
         if f.name not in ("bounds", "restrict")}
  c.method.attack = ml_collections.ConfigDict(att)
  c.method.attack.eps, c.method.attack.step_size = 0.1, 0.025

  c.teacher = ml_collections.ConfigDict()
  c.teacher.checkpoint = ml_collections.FieldReference(None, field_type=str)
  c.teacher.which = "best"
  c.teacher.torch_checkpoint = ml_collections.FieldReference(None, field_type=str)
  c.teacher.sha256 = ""
  # A RobustBench CIFAR-10 entry name (tsjax.models.torch_convert.ROBUSTBENCH)
  # picks the PyTorch teacher's architecture, block variant and normalisation
  # (teacher.model is then not read).
  c.teacher.robustbench = ml_collections.FieldReference(None, field_type=str)
  # The PyTorch teacher's input normalisation; None: the RobustBench entry's,
  # a DeepMind checkpoint's buffers, or the student's.
  c.teacher.mean = ml_collections.FieldReference(None, field_type=tuple)
  c.teacher.std = ml_collections.FieldReference(None, field_type=tuple)
  c.teacher.model = ml_collections.ConfigDict()
  c.teacher.model.name = "small_cnn"
  c.teacher.model.kwargs = ml_collections.ConfigDict()

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 128
  c.train.epochs = 4
  c.train.optimizer = "sgd"
  c.train.lr = 0.05
  c.train.momentum = 0.9
  c.train.nesterov = False
  c.train.weight_decay = 5e-4
  c.train.weight_decay_style = "l2"    # or "decoupled" (big_vision)
  c.train.weight_decay_on = "all"      # or "kernels"
  c.train.grad_clip = 0.0
  c.train.schedule = "piecewise"
  c.train.boundaries = (2, 3)    # 0-based epochs that start at the next rate
  c.train.lr_factor = 0.1
  c.train.lr_at = "step_start"   # or "step_end" (Rice et al.'s per-step lr)
  c.train.warmup_epochs = 0.0
  c.train.ema_decay = 0.0        # > 0: keep an EMA of the parameters
  c.train.swa_start_epoch = ml_collections.FieldReference(None, field_type=int)
  c.train.log_every = 50
  # Precision of the training step's activations, matmuls and convolutions
  # (its attack included): "float32" or "bfloat16". Parameters, optimizer
  # state, batch-norm statistics, losses and softmax / KL stay float32.
  c.train.compute_dtype = "float32"

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 500
  # Evaluation (selection, PGD, AutoAttack) runs the model in float32:
  # low-precision gradients can mask an attack. "bfloat16" is refused unless
  # eval.allow_low_precision is True.
  c.eval.compute_dtype = "float32"
  c.eval.allow_low_precision = False
  c.eval.eps = 0.1
  c.eval.pgd_steps = 20           # final evaluation: PGD-20
  c.eval.pgd_step_size = ml_collections.FieldReference(None, field_type=float)
  c.eval.val_pgd_steps = 10       # model selection: PGD-10
  # The selection attack's step (None: 2.5 eps / val_pgd_steps); independent
  # of eval.pgd_step_size, so changing the test attack keeps the selection.
  c.eval.val_pgd_step_size = ml_collections.FieldReference(None,
                                                           field_type=float)
  # Examples used for model selection (None: the whole selection set).
  c.eval.val_subset = ml_collections.FieldReference(1000, field_type=int)
  c.eval.select_on = "val"        # or "test": the references' protocol
  c.eval.select_metric = "pgd/acc"
  c.eval.autoattack_subset = 0    # > 0: AutoAttack on the first N test examples
  c.eval.autoattack_version = "standard"
  # Which parameter sets AutoAttack evaluates (swa_best: the SWA average of
  # the epoch with the best validation metric of the average itself).
  c.eval.autoattack_params = ("last", "best", "ema", "swa", "swa_best")

  # Several processes (jax.distributed; tsjax.train.distributed.settings):
  # auto=True joins the cluster JAX detects (SLURM srun, Open MPI, TPU pods);
  # or an explicit coordinator "host:port" with the two fields below.
  c.distributed = ml_collections.ConfigDict()
  c.distributed.auto = False
  c.distributed.coordinator_address = ml_collections.FieldReference(
      None, field_type=str)       # set (with the two below) for multi-host runs
  c.distributed.num_processes = 1
  c.distributed.process_id = 0
  return c


def _paper_base(c, dataset):
  """What every CIFAR / TinyImageNet reference shares."""
  c.data.num_val = 1000
  c.augment = "crop_flip"        # RandomCrop(pad 4) + horizontal flip
  c.eval.eps = 8 / 255
  c.eval.batch_size = 256
  att = c.method.attack
  att.eps, att.step_size, att.steps = 8 / 255, 2 / 255, 10
  c.train.batch_size = 128
  c.teacher.model.name = "wrn34_10"
  c.eval.autoattack_subset = 10000
  # The whole selection set: 1000 held-out training images, or with
  # select_on="test" all 10k test images, as PeerAiD (main.py test()), IAD
  # (IAD-I.py:243-252) and AdaAD (main.py test(), batches of 400) select.
  c.eval.val_subset = None
  del dataset


def _distill_paper(c, dataset, epochs=200, boundaries=(100,)):
  """The distillation references' common setting: ResNet-18 student on raw
  [0, 1] inputs, SGD 0.1 / 0.9 / 2e-4, batch 128."""
  c.model.name, c.model.normalize = "resnet18", False
  c.train.lr, c.train.momentum, c.train.weight_decay = 0.1, 0.9, 2e-4
  c.train.epochs, c.train.boundaries = epochs, boundaries


# ----------------------------------------------------------------- recipes
# RECIPES[method](config, dataset): what the method's reference runs. A
# method without an entry trains with its Options defaults and the generic
# attack. Fashion-MNIST entries only adapt the CPU budget.

def _pgd_at(c, dataset):
  if dataset in PAPER_DATASETS:
    # locuslab/robust_overfitting train_cifar.py as executed (its defaults):
    # PreActResNet18 on normalised inputs (:23, :90), SGD 0.1 / 0.9 / 5e-4
    # on every parameter (:230), 200 epochs, piecewise 0.1 / 0.01 / 0.001 at
    # t / epochs = 0.5 / 0.75 with t = epoch + (i + 1) / batches (:248-255,
    # :306: the rate at the end of each step), reflect-padded crop + flip
    # (utils.py:26-27, :182), PGD-10 2/255 from a uniform start with the
    # model in train mode (:294, :316, :70-96), then a train-mode clean pass
    # after the step (:339); test-time PGD-10 2/255, 1 restart, eval mode
    # (:353-366), the best epoch by that PGD-10 accuracy (:441).
    c.reference = "locuslab/robust_overfitting train_cifar.py (Rice et al.)"
    c.model.name = "preact_resnet18"
    c.augment = "crop_flip_reflect"
    c.method.attack.bn_mode = "train"
    c.method.options.clean_bn_pass = True
    c.train.lr, c.train.weight_decay = 0.1, 5e-4
    c.train.epochs, c.train.boundaries = 200, (100, 150)
    c.train.lr_at = "step_end"
    c.eval.pgd_steps, c.eval.pgd_step_size = 10, 2 / 255
    c.eval.val_pgd_step_size = 2 / 255
    c.eval.autoattack_subset = 0


def _trades(c, dataset):
  c.method.attack.start = "normal"
  if dataset in PAPER_DATASETS:
    # train_trades_cifar10.py:140-155: epochs 1..76, lr x0.1 when epoch >= 75,
    # i.e. 0-based epochs 74 and 75; raw [0, 1] inputs (no normalisation).
    c.reference = "yaodongyu/TRADES train_trades_cifar10.py"
    c.model.name, c.model.normalize = "wrn34_10", False
    att = c.method.attack
    att.eps, att.step_size = 0.031, 0.007
    c.train.lr, c.train.weight_decay = 0.1, 2e-4
    c.train.epochs, c.train.boundaries = 76, (74,)
    c.eval.eps, c.eval.pgd_step_size = 0.031, 0.003   # pgd_attack_cifar10.py
    c.eval.autoattack_subset = 0


def _ccat(c, dataset):
  att = c.method.attack
  att.optimizer, att.start, att.keep_best = "backtrack", "mixed", True
  att.momentum, att.lr_factor = 0.9, 1.5
  att.steps, att.step_size = 20, 0.01
  if dataset in PAPER_DATASETS:
    # experiments/config/common.py: SGD without weight decay, lr 0.075,
    # batch 100, LambdaLR(0.95 ** floor(epoch)), F7P with momentum and
    # backtracking, 2 x 20 iterations, base lr 0.005, mixed initialisation.
    c.reference = ("davidstutz/confidence-calibrated-adversarial-training "
                   "experiments/config/common.py, cifar10.py")
    c.model.name = "preact_resnet18"
    att.eps, att.steps, att.step_size = 0.03, 40, 0.005
    c.train.lr, c.train.batch_size, c.train.weight_decay = 0.075, 100, 0.0
    c.train.schedule, c.train.lr_factor, c.train.epochs = (
        "step_exponential", 0.95, 200)
    c.eval.eps = 0.03
    c.eval.autoattack_subset = 0
  else:
    # The paper's evaluation rows at a CPU budget: 100 iterations, fewer
    # attempts (the reference's iteration / lr-factor pairing kept).
    c.method.options.eval_attacks = (("conf", "zero", 100, 0.005, 1.25, 1),
                                     ("conf", "uniform", 100, 0.005, 1.25, 3),
                                     ("ce", "uniform", 100, 0.005, 1.25, 3))
  # Raw [0, 1] inputs (models/classifier.py:43, whiten=False by default).
  c.model.normalize = False
  if dataset in PAPER_DATASETS:
    # One of {crop, flip, contrast} per image (config/cifar10.py:24-26,
    # tsjax.data.augment.ccat_augment); MNIST runs none (config/mnist.py:25-27)
    # and so does the Fashion-MNIST budget.
    c.augment = "ccat"


def _kd(c, dataset):
  if dataset in PAPER_DATASETS:
    c.reference = "Hinton et al. 2015 (a clean-input reference point)"
    _distill_paper(c, dataset, 200, (100, 150))


def _ard(c, dataset):
  c.method.attack.bn_mode = "train"      # AttackPGD on a train-mode student
  if dataset in PAPER_DATASETS:
    # main.py:32-36, 167-170: adjust_learning_rate scales a local copy of
    # the base lr, so "x0.1 at 100 and 150" runs as 0.1 until 0-based epoch
    # 99 and 0.01 from epoch 100 on.
    c.reference = "goldblum/AdversariallyRobustDistillation main.py"
    _distill_paper(c, dataset, 200, (100,))
    if dataset == "cifar100":
      c.train.batch_size = 256


def _iad(c, dataset):
  c.method.attack.bn_mode = "train"
  if dataset in PAPER_DATASETS:
    c.reference = "ZFancy/IAD IAD-I.py"      # lr as ARD's (IAD-I.py:49-53)
    _distill_paper(c, dataset, 200, (100,))
    c.eval.pgd_step_size = 2 / 255         # basic_eval.py:51, PGD-20 2/255
  else:
    c.method.options.begin_epoch = 1


def _rslad(c, dataset):
  c.method.attack.start = "normal"
  if dataset in PAPER_DATASETS:
    # resnet18_rslad_cifar10.py:47, 81-83: epochs 1..300, lr x0.1 after
    # 1-based epochs 215, 260, 285 = from 0-based epochs 215, 260, 285.
    c.reference = "zibojia/RSLAD resnet18_rslad_cifar10.py"
    _distill_paper(c, dataset, 300, (215, 260, 285))
    c.eval.pgd_step_size = 0.003
    if dataset == "cifar100":
      c.method.options.kl_scale = 10.0


def _funmatch(c, dataset):
  c.augment = "crop_flip"
  if dataset in PAPER_DATASETS:
    # big_vision: Adam, weight decay wd * schedule multiplier on kernels after
    # the lr scaling (optax.py:133-145), grad clip 1, cosine with warm-up.
    c.reference = "google-research/big_vision configs/proj/distill"
    _distill_paper(c, dataset)
    c.train.optimizer, c.train.lr, c.train.weight_decay = "adam", 1e-3, 3e-4
    c.train.weight_decay_style, c.train.weight_decay_on = "decoupled", "kernels"
    c.train.grad_clip = 1.0
    c.train.schedule, c.train.epochs, c.train.warmup_epochs = "cosine", 1000, 5


def _advfunmatch(c, dataset):
  c.method.attack.start = "normal"
  c.method.attack.keep_best = True       # the worst case of the ball
  if dataset in PAPER_DATASETS:
    c.reference = ("Wu et al. 2023 (code not public); AdaAD main.py, "
                   "AT_helper.py for the inner loop")
    _distill_paper(c, dataset, 200, (100, 150))
    c.augment = "crop_flip,autoaugment_cifar10"


def _peeraid(c, dataset):
  c.method.attack.start = "normal"
  table = dataset if dataset in PAPER_DATASETS else "cifar10"
  for k, v in dataclasses.asdict(
      methods.peeraid.Options.for_dataset(table)).items():
    c.method.options[k] = v
  if dataset in PAPER_DATASETS:
    c.reference = "jaewonalive/PeerAiD main.py, configs/*.json"
    epochs, bounds = ((200, (99, 149)) if dataset == "tiny_imagenet"
                      else (300, (214, 259, 284)))
    _distill_paper(c, dataset, epochs, bounds)
    c.eval.pgd_step_size = 2 / 255         # main.py:134
  c.train.swa_start_epoch = int(c.train.boundaries[0])


def _offsubspace(c, dataset):
  # The moved points lie on the surface of the evaluation attack's ball
  # (radius follows eval.eps unless set; L-inf like the attack).
  c.method.options.norm = "linf"
  c.method.options.radius = c.eval.get_ref("eps")
  if dataset in PAPER_DATASETS:
    c.reference = ("Yang et al. 2021 (off-subspace augmentation, the remedy "
                   "their analysis suggests), image form; training recipe "
                   "of PGD-AT (Rice et al. / Pang et al.)")
    c.model.name = "preact_resnet18"
    c.train.lr, c.train.weight_decay = 0.1, 5e-4
    c.train.epochs, c.train.boundaries = 110, (100, 105)
    c.eval.autoattack_subset = 0


def offsubspace_section(c) -> ml_collections.ConfigDict:
  """The ``offsubspace`` section (``experiments.train``) for any method:
  ``tsjax.methods.offsubspace.Options`` with the radius tied to eval.eps."""
  s = ml_collections.ConfigDict(dataclasses.asdict(
      methods.offsubspace.Options()))
  s.norm = "linf"
  s.radius = c.eval.get_ref("eps")
  return s


def _adaad(c, dataset):
  """The ``adaad`` modifier of ``advfunmatch``: boyellow/AdaAD main.py's
  choices where tsjax's defaults differ: weight decay 5e-4 (main.py:64),
  a train-mode clean pass before the adversarial one (main.py:333-334), the
  KL reduced by B * C on CIFAR-10 (main.py:342-345, ``nn.KLDivLoss()``) and
  by B on CIFAR-100 (main.py:347-351), the last attack iterate
  (AT_helper.py:22-48)."""
  c.reference = "boyellow/AdaAD main.py, AT_helper.py (alpha = 1)"
  c.train.weight_decay = 5e-4
  c.method.options.clean_pass = True
  c.method.options.reduction = "batchmean" if dataset == "cifar100" else "mean"
  c.method.attack.keep_best = False


RECIPES = {"pgd_at": _pgd_at, "trades": _trades, "ccat": _ccat,
           "offsubspace": _offsubspace, "kd": _kd, "ard": _ard, "iad": _iad,
           "rslad": _rslad, "funmatch": _funmatch,
           "advfunmatch": _advfunmatch, "peeraid": _peeraid}

# The Fashion-MNIST students of the distillation comparison: a smaller CNN
# than the teacher (the image stack's small CNN 32-64-128).
STUDENT_KWARGS = {"features": (16, 32), "hidden": 64}


def _smoke(c, dataset):
  c.data.train_subset = 512
  c.data.test_subset = 200
  c.data.num_val = 100
  c.train.batch_size = 64
  c.train.epochs = 2
  c.train.boundaries = (1,)
  c.train.log_every = 4
  c.train.schedule, c.train.lr, c.train.weight_decay = "piecewise", 0.05, 5e-4
  c.train.optimizer, c.train.grad_clip = "sgd", 0.0
  c.train.weight_decay_style, c.train.weight_decay_on = "l2", "all"
  c.method.attack.steps = 2
  c.eval.pgd_steps = 3
  c.eval.val_pgd_steps = 2
  c.eval.val_subset = 100
  c.eval.batch_size = 64
  c.eval.autoattack_subset = 0
  c.augment = ""
  if c.train.swa_start_epoch is not None:
    c.train.swa_start_epoch = 1
  if "begin_epoch" in c.method.options:
    c.method.options.begin_epoch = 1
  if "eval_attacks" in c.method.options:
    c.method.options.eval_attacks = (("conf", "zero", 3, 0.01, 1.5, 1),
                                     ("ce", "uniform", 3, 0.01, 1.5, 2))
  c.teacher.model.name = "small_cnn"
  if dataset != "fashion_mnist" or methods.get(c.method.name).needs_teacher:
    c.model.name, c.model.normalize = "small_cnn", True
    c.model.kwargs = ml_collections.ConfigDict({"features": (8, 16),
                                                "hidden": 32})


MODIFIERS = ("smoke", "offsubspace_aug", "adaad")


def parse_variant(arg: str, default_method: str = "pgd_at"):
  parts = [p.strip() for p in arg.split(",") if p.strip()]
  known = DATASETS + tuple(methods.REGISTRY) + MODIFIERS
  unknown = [p for p in parts if p not in known]
  if unknown:
    raise ValueError(f"unknown variant(s) {unknown} of configs/adv_train.py; "
                     f"data sets {DATASETS}, methods "
                     f"{tuple(methods.REGISTRY)}, modifiers {MODIFIERS}")
  named = [p for p in parts if p in methods.REGISTRY]
  if len(set(named)) > 1:
    raise ValueError(f"configs/adv_train.py variant names several methods "
                     f"{named}; name one (off-subspace augmentation for "
                     f"another method: 'offsubspace_aug')")
  dataset = next((p for p in parts if p in DATASETS), "fashion_mnist")
  method = named[0] if named else default_method
  if "adaad" in parts and method != "advfunmatch":
    raise ValueError(f"variant 'adaad' sets AdaAD's choices for "
                     f"'advfunmatch', not for {method!r}")
  return dataset, method, "smoke" in parts, "offsubspace_aug" in parts, \
      "adaad" in parts


def get_config(arg: str = "fashion_mnist,pgd_at",
               default_method: str = "pgd_at") -> ml_collections.ConfigDict:
  dataset, method, smoke, offsub, adaad = parse_variant(arg, default_method)
  c = _base(dataset, method)
  if dataset in PAPER_DATASETS:
    _paper_base(c, dataset)
    c.model.name = "preact_resnet18"
  elif methods.get(method).needs_teacher or method == "peeraid":
    c.model.kwargs = ml_collections.ConfigDict(STUDENT_KWARGS)
  if method in RECIPES:
    RECIPES[method](c, dataset)
  if adaad:
    _adaad(c, dataset)
  if offsub:
    if method == "offsubspace":
      raise ValueError("'offsubspace_aug' adds off-subspace augmentation to "
                       "another method; the 'offsubspace' method has it")
    c.offsubspace = offsubspace_section(c)
  if smoke:
    _smoke(c, dataset)
  for section in (c.model, c.teacher.model):
    complete_model_kwargs(section)
  return c


def complete_model_kwargs(section) -> None:
  """Lists every architecture option of ``section.name`` in
  ``section.kwargs`` (the variant's values kept, the rest at the model's
  defaults), so each one is in config.json and overridable from the command
  line: ``--config.model.kwargs.features=16,32``."""
  section.kwargs = ml_collections.ConfigDict(
      {**models.default_options(section.name), **section.kwargs.to_dict()})
