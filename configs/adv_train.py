r"""Adversarial training of image classifiers: standard, PGD-AT, TRADES, CCAT.

  python -m experiments.train --config configs/adv_train.py:fashion_mnist,pgd_at
  python -m experiments.train --config configs/adv_train.py:fashion_mnist,trades,smoke
  python -m experiments.train --config configs/adv_train.py:cifar10,pgd_at \
      --config.data.data_dir=~/tensorflow_datasets --workdir runs/c10_pgdat

Variant string: one data set (fashion_mnist | cifar10 | cifar100 |
tiny_imagenet), one method (standard | pgd_at | trades | ccat), optionally
``smoke`` (a few steps on a data subset; what the tests run).

Fashion-MNIST runs on a 2-core CPU (small CNN, L-inf eps 0.1). The CIFAR and
TinyImageNet variants carry the papers' hyper-parameters (spec §4.1–4.3) for
users with the data and a GPU: PGD-AT with PreAct ResNet-18 (eps 8/255, step
2/255, 10 steps, lr 0.1, wd 5e-4, 110 epochs, decays at 100 and 105), TRADES
with WRN-34-10 (beta 6, eps 0.031, step 0.007, 10 steps, lr 0.1, wd 2e-4, 76
epochs, decay at 75), CCAT (rho 10, half clean / half adversarial, lr 0.075,
batch 100, per-epoch decay 0.95, 200 epochs; CIFAR eps 0.03).
"""

import ml_collections

DATASETS = ("fashion_mnist", "cifar10", "cifar100", "tiny_imagenet")
METHODS = ("standard", "pgd_at", "trades", "ccat")


def get_config(arg: str = "fashion_mnist,pgd_at") -> ml_collections.ConfigDict:
  parts = [p.strip() for p in arg.split(",") if p.strip()]
  unknown = [p for p in parts if p not in DATASETS + METHODS + ("smoke",)]
  if unknown:
    raise ValueError(f"unknown variant(s) {unknown} of configs/adv_train.py; "
                     f"data sets {DATASETS}, methods {METHODS}, and 'smoke'")
  dataset = next((p for p in parts if p in DATASETS), "fashion_mnist")
  method = next((p for p in parts if p in METHODS), "pgd_at")

  c = ml_collections.ConfigDict()
  c.seed = 0

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

  c.method = ml_collections.ConfigDict()
  c.method.name = method
  c.method.label_smoothing = 0.0
  c.method.attack = ml_collections.ConfigDict()
  c.method.attack.norm = "linf"
  c.method.attack.eps = 0.1
  c.method.attack.step_size = 0.025
  c.method.attack.steps = 10
  c.method.attack.bn_mode = "eval"   # batch-norm mode while attacking
  c.method.attack.start = "uniform"  # "uniform" in the ball or "normal" (std 0.001)
  c.method.attack.restarts = 1
  c.method.trades_beta = 6.0
  c.method.ccat_rho = 10.0
  c.method.ccat_clean_fraction = 0.5

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 128
  c.train.epochs = 4
  c.train.lr = 0.05
  c.train.momentum = 0.9
  c.train.nesterov = False
  c.train.weight_decay = 5e-4
  c.train.schedule = "piecewise"
  c.train.boundaries = (2, 3)    # epochs
  c.train.lr_factor = 0.1
  c.train.warmup_epochs = 0.0
  c.train.ema_decay = 0.0        # > 0: keep an EMA of the parameters
  c.train.swa_start_epoch = -1   # >= 0: SWA from this epoch, with BN re-estimation
  c.train.log_every = 50

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 500
  c.eval.eps = 0.1
  c.eval.pgd_steps = 20           # final evaluation: PGD-20
  c.eval.val_pgd_steps = 10       # model selection: PGD-10 on the validation split
  c.eval.val_subset = 1000        # validation examples used for model selection
  c.eval.select_metric = "pgd/acc"
  c.eval.ccat_tpr = 0.99
  c.eval.autoattack_subset = 0    # > 0: AutoAttack on the first N test examples
  c.eval.autoattack_version = "standard"
  c.eval.autoattack_params = ("last", "best", "ema", "swa")   # which to attack

  c.distributed = ml_collections.ConfigDict()
  c.distributed.coordinator_address = ml_collections.FieldReference(
      None, field_type=str)       # set (with the two below) for multi-host runs
  c.distributed.num_processes = 1
  c.distributed.process_id = 0

  if method == "trades":
    c.method.attack.start = "normal"
  if method == "ccat":
    c.method.attack.steps = 20
    c.method.attack.step_size = 0.01

  if dataset in ("cifar10", "cifar100", "tiny_imagenet"):
    c.data.num_val = 1000
    c.augment = "crop_flip"      # RandomCrop(pad 4) + horizontal flip
    c.eval.eps = 8 / 255
    c.eval.batch_size = 256
    c.eval.val_subset = 1000
    c.train.batch_size = 128
    att = c.method.attack
    att.eps, att.step_size, att.steps = 8 / 255, 2 / 255, 10
    c.model.name = "preact_resnet18"
    c.train.lr, c.train.weight_decay = 0.1, 5e-4
    c.train.epochs, c.train.boundaries = 110, (100, 105)
    if method == "trades":
      c.model.name = "wrn34_10"
      att.eps, att.step_size = 0.031, 0.007
      c.train.weight_decay = 2e-4
      c.train.epochs, c.train.boundaries = 76, (75,)
    if method == "ccat":
      att.eps, att.steps, att.step_size = 0.03, 40, 0.005
      c.train.lr, c.train.batch_size = 0.075, 100
      c.train.schedule, c.train.lr_factor, c.train.epochs = "exponential", 0.95, 200

  if "smoke" in parts:
    c.data.train_subset = 512
    c.data.test_subset = 200
    c.data.num_val = 100
    c.train.batch_size = 64
    c.train.epochs = 2
    c.train.boundaries = (1,)
    c.train.log_every = 4
    c.method.attack.steps = 2
    c.eval.pgd_steps = 3
    c.eval.val_pgd_steps = 2
    c.eval.val_subset = 100
    c.eval.batch_size = 64
    if dataset != "fashion_mnist":
      c.model.name = "small_cnn"
  return c
