r"""Train an image classifier with any registered method (``tsjax.methods``):
from scratch (standard, PGD-AT, TRADES, CCAT) or distilled from a frozen
teacher (KD, ARD, RSLAD, IAD, FunMatch, AdvFunMatch) or a jointly trained
peer (PeerAiD).

  python -m experiments.train --config configs/adv_train.py:fashion_mnist,pgd_at
  python -m experiments.train --config configs/adv_train.py:fashion_mnist,ccat,smoke \
      --workdir /tmp/ccat --config.train.epochs=1
  python -m experiments.train --config configs/adv_train.py:fashion_mnist,rslad \
      --config.teacher.checkpoint=runs/fmnist_teacher

Trains on the training split minus a seeded validation split, selects the best
epoch by validation robust accuracy (``eval.select_on="test"``: on the test
set, as several references do), and reports the last and the best parameters
(and EMA / SWA when enabled) on the test set: clean accuracy, PGD-N accuracy,
AutoAttack and the method's own report (CCAT: confidence-thresholded robust
error). Writes ``results.json``, ``results.md``, ``metrics.jsonl``,
TensorBoard events (``tb/``) and Orbax checkpoints (``checkpoints/``,
``best/``; a killed run resumes) to the work dir. The work dir holds the
trained network only (PeerAiD: student and peer during training; ``best/``,
SWA and the results are the student's); a teacher is never checkpointed.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from . import common
from tsjax import config_checks as cc
from tsjax import methods, models
from tsjax.attacks import AttackSpec
from tsjax.attacks.autoattack import VERSIONS
from tsjax.data import augment, images
from tsjax.methods import offsubspace
from tsjax.methods.distill import teacher_ctx
from tsjax.train import TrainState
from tsjax.train import classifier as clf
from tsjax.train import distributed
from tsjax.train.fit import fit
from tsjax.train.teachers import load_teacher

SELECT_METRICS = ("pgd/acc", "clean/acc")
SELECT_ON = ("val", "test")
CANDIDATES = ("last", "best", "ema", "swa", "swa_best")


# ----------------------------------------------------------------- checking
def validate(config, *, teacher_trained: bool = True) -> None:
  """Every config check that needs no data and compiles nothing
  (``teacher_trained=False``: the teacher's work dir is made later, by the
  same program, so only its fields are checked, not its files)."""
  cc.check_number(config, "seed", low=0, integer=True)
  images.check_name(config)
  for f in ("data.num_val", "data.train_subset", "data.test_subset"):
    cc.check_number(config, f, low=0, integer=True)
  sub, nv = int(config.data.train_subset), int(config.data.num_val)
  if sub and nv >= sub:
    raise cc.ConfigError(f"config field 'data.num_val' ({nv}) must be below "
                         f"'data.train_subset' ({sub}): the validation split "
                         f"is carved from the training subset")
  check_model_kwargs(config, "model")
  method = methods.get(cc.get_field(config, "method.name"))
  method.build_options(config.method.options)
  if offsubspace_options(config) is not None and method.init_ctx:
    raise cc.ConfigError(f"config section 'offsubspace' adds off-subspace "
                         f"augmentation to another method; method "
                         f"{method.name!r} sets up its own ctx (for "
                         f"'offsubspace' use method.options)")
  att = attack_spec(config)
  cc.check_eps(config, "method.attack.eps", att.norm)
  spec = augment.parse_augment_spec(cc.get_field(config, "augment"), "augment")
  if method.name == "ccat" and any(n in ("mixup", "cutmix") for n, _ in spec):
    raise cc.ConfigError("config field 'augment': mixup / cutmix give soft "
                         "labels, which CCAT's targets do not take")
  if method.needs_teacher:
    _validate_teacher(config, teacher_trained)
  _validate_train(config)
  _validate_eval(config)


def check_model_kwargs(config, section: str) -> None:
  """``SECTION.name`` a registry name and ``SECTION.kwargs`` its options
  (the config file lists those of its variant's model: after changing the
  name on the command line the old model's options would not apply)."""
  name = cc.get_field(config, f"{section}.name")
  if name not in models.REGISTRY:
    raise cc.ConfigError(f"config field '{section}.name' must be one of "
                         f"{sorted(models.REGISTRY)}, got {name!r}")
  options = [o for o in models.model_options(name)
             if o not in ("num_classes", "mean", "std")]   # from the data
  bad = sorted(set(cc.get_field(config, f"{section}.kwargs")) - set(options))
  if bad:
    raise cc.ConfigError(
        f"config field '{section}.kwargs' has {bad}, which model {name!r} "
        f"does not take (its options: {options}); choose the architecture by "
        f"a config variant, or replace the options: "
        f"--config.{section}.kwargs=\"{{}}\"")


def _validate_teacher(config, trained: bool = True) -> None:
  ck = config.teacher.get("checkpoint")
  tk = config.teacher.get("torch_checkpoint")
  if bool(ck) == bool(tk):
    raise cc.ConfigError(
        f"method {config.method.name!r} needs a teacher: set exactly one of "
        f"config fields 'teacher.checkpoint' (work dir of an experiments.train"
        f" run) and 'teacher.torch_checkpoint' (a PyTorch state_dict file); "
        f"got {ck!r} and {tk!r}")
  if ck and trained and not os.path.isdir(ck):
    raise cc.ConfigError(f"config field 'teacher.checkpoint': no such "
                         f"directory {ck!r}")
  if ck and trained and not os.path.exists(os.path.join(ck, "config.json")):
    raise cc.ConfigError(f"config field 'teacher.checkpoint': {ck!r} is not "
                         f"a work dir of experiments.train (no config.json)")
  if tk and not os.path.exists(tk):
    raise cc.ConfigError(f"config field 'teacher.torch_checkpoint': no such "
                         f"file {tk!r}")
  cc.check_choice(config, "teacher.which", ("best", "last", "swa"))
  if tk and not config.teacher.get("robustbench"):
    check_model_kwargs(config, "teacher.model")


def _validate_train(config) -> None:
  t, p = config.train, "train."
  cc.check_number(config, "train.batch_size", low=1, integer=True)
  cc.check_number(config, "train.epochs", low=1, integer=True)
  cc.check_choice(config, "train.optimizer", clf.OPTIMIZERS)
  cc.check_number(config, "train.lr", low=0)
  cc.check_number(config, "train.momentum", low=0, high=1)
  cc.check_number(config, "train.weight_decay", low=0)
  cc.check_choice(config, "train.weight_decay_style", clf.WEIGHT_DECAY_STYLES)
  cc.check_choice(config, "train.weight_decay_on", clf.WEIGHT_DECAY_ON)
  if t.weight_decay_style == "decoupled" and t.weight_decay and not t.lr > 0:
    raise cc.ConfigError(f"config field '{p}lr' must be > 0 with decoupled "
                         f"weight decay (its rate follows schedule / lr)")
  cc.check_number(config, "train.grad_clip", low=0)
  cc.check_choice(config, "train.schedule", clf.SCHEDULES)
  cc.check_choice(config, "train.lr_at", clf.LR_AT)
  cc.check_number(config, "train.lr_factor", low=0)
  cc.check_number(config, "train.ema_decay", low=0, high=1)
  epochs = int(t.epochs)
  for i, b in enumerate(t.get("boundaries", ())):
    if isinstance(b, bool) or not isinstance(b, (int, float)) or not (
        0 < b < epochs):
      raise cc.ConfigError(
          f"config field '{p}boundaries' entry {i} is {b!r}; learning-rate "
          f"boundaries are epochs strictly between 0 and '{p}epochs' "
          f"({epochs}): a later one never applies")
  if t.get("warmup_epochs") is not None:
    cc.check_number(config, "train.warmup_epochs", low=0, high=epochs)
  if t.swa_start_epoch is not None:
    cc.check_number(config, "train.swa_start_epoch", low=0, high=epochs - 1,
                    integer=True)
  cc.check_number(config, "train.log_every", low=1, integer=True)
  cc.check_choice(config, "train.compute_dtype", tuple(models.COMPUTE_DTYPES))


def _validate_eval(config) -> None:
  ev = config.eval
  cc.check_number(config, "eval.batch_size", low=1, integer=True)
  cc.check_eps(config, "eval.eps", "linf")
  cc.check_number(config, "eval.pgd_steps", low=1, integer=True)
  for field in ("pgd_step_size", "val_pgd_step_size"):
    if ev.get(field) is not None:
      cc.check_number(config, f"eval.{field}", low=0)
  cc.check_number(config, "eval.val_pgd_steps", low=1, integer=True)
  if ev.val_subset is not None:
    cc.check_number(config, "eval.val_subset", low=0, integer=True)
  cc.check_choice(config, "eval.select_on", SELECT_ON)
  cc.check_choice(config, "eval.select_metric", SELECT_METRICS)
  cc.check_number(config, "eval.autoattack_subset", low=0, integer=True)
  cc.check_choice(config, "eval.autoattack_version", tuple(VERSIONS))
  if cc.check_choice(config, "eval.compute_dtype",
                     tuple(models.COMPUTE_DTYPES)) != "float32" and not (
                         ev.allow_low_precision is True):
    raise cc.ConfigError(
        f"config field 'eval.compute_dtype' is {ev.compute_dtype!r}: "
        f"evaluation attacks in low precision can mask gradients and "
        f"overstate robustness; set eval.allow_low_precision=True to accept")
  bad = [p for p in ev.autoattack_params if p not in CANDIDATES]
  if bad:
    raise cc.ConfigError(f"config field 'eval.autoattack_params' has unknown "
                         f"entries {bad}; expected entries from {CANDIDATES}")


def attack_spec(config) -> AttackSpec:
  """The method's inner maximisation: ``config.method.attack`` holds the
  fields of ``AttackSpec`` (checked, errors naming the field)."""
  return cc.build(AttackSpec, config.method.attack, "method.attack")


def _linf_pgd(eps: float, steps: int, step_size) -> AttackSpec:
  return AttackSpec(norm="linf", eps=eps, steps=int(steps),
                    step_size=(2.5 * eps / steps if step_size is None
                               else step_size))


def eval_attack(config) -> AttackSpec:
  """The test-set PGD: L-inf ``eval.eps``, ``eval.pgd_steps`` steps of
  ``eval.pgd_step_size`` (default ``2.5 eps / steps``), uniform start, the
  last iterate, the network in eval mode."""
  ev = config.eval
  return _linf_pgd(float(ev.eps), int(ev.pgd_steps), ev.pgd_step_size)


def select_attack(config) -> AttackSpec:
  """The model-selection PGD: as ``eval_attack`` with ``eval.val_pgd_steps``
  steps of ``eval.val_pgd_step_size`` (its own field: changing the test
  attack leaves the selection as it was)."""
  ev = config.eval
  return _linf_pgd(float(ev.eps), int(ev.val_pgd_steps), ev.val_pgd_step_size)


# ----------------------------------------------------------------- building
class Built(NamedTuple):
  """What a method hands the generic training run: its pure loss, the
  initial trainable variables, the step's ``ctx`` (frozen teachers, the
  off-subspace methods' data-subspace basis) and the
  ``view`` of the trained tree that is evaluated / averaged / selected."""
  loss_fn: Any
  params: Any
  model_state: Any
  ctx: Any = None
  view: Any = None


def offsubspace_options(config):
  """The optional ``offsubspace`` config section (any method: move
  ``fraction`` of each batch off the training images' PCA subspace before
  the method's loss; ``tsjax.methods.offsubspace.with_offsubspace``) as
  checked ``offsubspace.Options``; None when absent or ``fraction`` is 0."""
  section = config.get("offsubspace")
  if section is None:
    return None
  options = cc.build(offsubspace.Options, section, "offsubspace")
  return options if options.fraction > 0 else None


def method_loss(config, model, teacher=None):
  """The pure loss of ``config.method`` on ``model`` (uint8 batches are
  converted and augmented by ``with_augmentation``), wrapped by the
  ``offsubspace`` section when it is set."""
  method = methods.get(config.method.name)
  loss_fn = method.make_loss(
      model, teacher=teacher,
      attack=attack_spec(config) if method.uses_attack else None,
      options=method.build_options(config.method.options))
  aug = offsubspace_options(config)
  return loss_fn if aug is None else offsubspace.with_offsubspace(loss_fn, aug)


def method_teacher(config, data):
  """``(teacher model, teacher ctx)`` of a method that needs one, else
  ``(None, None)``: the file read, its checksum and architecture checked
  (before a run writes or compiles anything)."""
  if not methods.get(config.method.name).needs_teacher:
    return None, None
  normalize = bool(config.model.get("normalize", True))
  teacher, t_params, t_state = load_teacher(
      config.teacher, num_classes=data.num_classes,
      mean=data.mean if normalize else (0.0,),
      std=data.std if normalize else (1.0,), input_shape=data.image_shape)
  models.check_input_shape(teacher, data.image_shape)
  return teacher, teacher_ctx(t_params, t_state)


def build(config, model, data, key, teacher=None) -> Built:
  """The registered method of ``config.method.name`` on ``model``;
  ``teacher``: ``method_teacher``'s pair (loaded here when not given)."""
  method = methods.get(config.method.name)
  teacher, ctx = teacher or method_teacher(config, data)
  init_one = lambda k: clf.init_model(model, k, data.image_shape)
  params, model_state = (method.init(init_one, key) if method.init
                         else init_one(key))
  # Entries computed once from the training images (the off-subspace
  # methods' PCA basis), by the method's hook or the offsubspace section.
  aug = offsubspace_options(config)
  if method.init_ctx:
    ctx = {**(ctx or {}), **method.init_ctx(
        data.images, method.build_options(config.method.options))}
  elif aug is not None:
    ctx = {**(ctx or {}), **offsubspace.init_ctx(data.images, aug)}
  # The step (its attack included) computes in train.compute_dtype; the
  # parameters stay float32 and are shared with the float32 evaluation.
  dtype = config.train.get("compute_dtype", "float32")
  t_model = (None if teacher is None
             else models.with_compute_dtype(teacher, dtype))
  return Built(method_loss(config, models.with_compute_dtype(model, dtype),
                           t_model), params, model_state, ctx, method.view)


def with_augmentation(loss_fn, config, num_classes: int):
  """Wraps a method loss: uint8 -> [0, 1] floats, then on-device augmentation
  with a per-step key (the same view is used by everything inside the loss)."""
  spec = augment.parse_augment_spec(config.augment, "augment")
  aug = augment.make_augment(spec)
  mixing = any(name in augment.MIXING for name, _ in spec)

  def wrapped(params, model_state, batch, key, ctx):
    x, y = batch["image"], batch["label"]
    if x.dtype == jnp.uint8:
      x = x.astype(jnp.float32) / 255.0
    k_aug, k_loss = jax.random.split(key)
    if mixing:
      x, y = aug(k_aug, x, jax.nn.one_hot(y, num_classes, dtype=x.dtype))
    elif spec:
      x = aug(k_aug, x)
    return loss_fn(params, model_state, {**batch, "image": x, "label": y},
                   k_loss, ctx)
  return wrapped


@functools.lru_cache(maxsize=8)
def _jitted_augment(spec):
  return jax.jit(augment.make_augment(spec))


def swa_bn_batches(config, train, epoch: int):
  """The images over which SWA re-estimates batch-norm statistics after
  ``epoch``: one pass over the training split (its own fixed order),
  augmented as in training with a per-epoch key, label-mixing ops left out
  (PeerAiD main.py:432, ``bn_update(train_loader, student_swa_net)``,
  iterates the augmenting training loader)."""
  spec = tuple(op for op in augment.parse_augment_spec(config.augment,
                                                       "augment")
               if op[0] not in augment.MIXING)
  seed, bs = int(config.seed), int(config.train.batch_size)
  key = jax.random.fold_in(jax.random.key(seed + 1), epoch)
  batches = images.train_batches(train.images, train.labels, bs,
                                 seed=seed + 1, num_epochs=1)
  for i, b in enumerate(batches):
    x = b["image"].astype(jnp.float32) / 255.0
    yield _jitted_augment(spec)(jax.random.fold_in(key, i), x) if spec else x


def load_data(config):
  """``(train, val, test)``: ``val`` is the model-selection set (a seeded
  split of train, or the test set with ``eval.select_on="test"``)."""
  full_train = images.load_from_config(config, "train")
  test = images.load_from_config(config, "test")
  if config.data.train_subset:
    full_train = full_train.subset(np.arange(min(config.data.train_subset,
                                                 len(full_train))))
  if config.data.test_subset:
    test = test.subset(np.arange(min(config.data.test_subset, len(test))))
  train, val = images.split_dataset(full_train, int(config.data.num_val),
                                    int(config.seed))
  if config.eval.select_on == "test":
    val = test
  return train, val, test


def make_model(config, train):
  normalize = bool(config.model.get("normalize", True))
  model = models.get_model(config.model.name, num_classes=train.num_classes,
                           mean=train.mean if normalize else (0.0,),
                           std=train.std if normalize else (1.0,),
                           **config.model.kwargs.to_dict())
  models.check_input_shape(model, train.image_shape)   # before compiling
  return model


# ---------------------------------------------------------------- evaluation
def autoattack_row(model, params, model_state, test, ev, eps, key,
                   progress: bool) -> dict:
  """AutoAttack (``ev.autoattack_version``, L-inf ``eps``) on the first
  ``ev.autoattack_subset`` test examples."""
  n = min(int(ev.autoattack_subset), len(test))
  # The points are split between the processes; parameters as an argument:
  # the attacks compiled for the first parameter set evaluated (best, last,
  # EMA, SWA) serve the others.
  aa = clf.autoattack_split(model, params, model_state, test.images[:n],
                            test.labels[:n], key, norm="linf", eps=eps,
                            version=ev.autoattack_version,
                            batch_size=int(ev.batch_size), progress=progress)
  return {"aa_acc": float(aa["robust_acc"]), "aa_clean_acc": float(aa["clean_acc"]),
          "aa_num": n, "aa_after": aa["robust_acc_after"],
          "aa_warnings": aa["warnings"]}


def candidates(out, view) -> dict:
  """name -> (params, model_state) of the parameter sets to report."""
  final = out["state"]
  view = view or (lambda p, ms: (p, ms))
  last = view(final.params, final.model_state)
  res = {"last": last}
  if out["best"] is not None:
    res["best"] = (out["best"]["params"], out["best"]["model_state"])
  if out["ema"] is not None:
    res["ema"] = (out["ema"], last[1])
  if out["swa"] is not None and int(out["swa"]["count"]) > 0:
    res["swa"] = (out["swa"]["params"], out["swa"]["model_state"])
  if out.get("swa_best") is not None:
    res["swa_best"] = (out["swa_best"]["params"],
                       out["swa_best"]["model_state"])
  return res


def method_test_eval(config, model, method, options):
  """The method's own test attacks (``Method.test_attacks``): ``(jitted eval
  step, number of leading test examples)``, or ``(None, 0)``."""
  if not method.test_attacks:
    return None, 0
  attacks, n = method.test_attacks(eval_attack(config), attack_spec(config),
                                   options)
  return clf.make_eval_step(model, attacks), n


def test_rows(config, model, test, cands, key, progress) -> dict:
  """Clean, PGD, AutoAttack and the method's report for every candidate."""
  method = methods.get(config.method.name)
  options = method.build_options(config.method.options)
  ev, steps = config.eval, int(config.eval.pgd_steps)
  test_eval = clf.make_eval_step(
      model, {"pgd": ("ce", eval_attack(config))})
  extra_eval, n_extra = method_test_eval(config, model, method, options)
  batches = lambda n=None: images.eval_batches(
      test.images[:n], test.labels[:n], int(ev.batch_size))
  results = {}
  for name, (p, ms) in cands.items():
    r = clf.evaluate(test_eval, p, ms, batches(), jax.random.fold_in(key, 1))
    row = {"clean_acc": r["clean/acc"], "pgd_acc": r["pgd/acc"],
           "pgd_steps": steps, "num_test": r["num_examples"]}
    if ev.autoattack_subset and name in tuple(ev.autoattack_params):
      row.update(autoattack_row(model, p, ms, test, ev, float(ev.eps),
                                jax.random.fold_in(key, 2), progress))
    if method.report:
      per_example = dict(r["per_example"])
      if extra_eval is not None:
        extra = clf.evaluate(extra_eval, p, ms, batches(n_extra),
                             jax.random.fold_in(key, 3))
        per_example.update({k: v for k, v in extra["per_example"].items()
                            if not k.startswith("clean/")})
      row.update(method.report(per_example, options))
    results[name] = row
  return results


def results_markdown(config, summary: dict) -> str:
  ev, results = config.eval, summary["results"]
  steps = int(ev.pgd_steps)
  lines = [f"# {config.method.name} / {config.model.name} / {config.data.name}"
           f" (linf eps {float(ev.eps):g}, PGD-{steps})", "",
           f"| params | clean acc | PGD-{steps} acc | test examples | "
           f"AutoAttack acc |", "|---|---|---|---|---|"]
  for name, row in results.items():
    epoch = summary.get(f"{name}_epoch")
    extra = (f" (epoch {epoch}, selected on {ev.select_on})"
             if epoch is not None else "")
    aa = (f"{row['aa_acc']:.4f} (first {row['aa_num']})" if "aa_acc" in row
          else "–")
    lines.append(f"| {name}{extra} | {row['clean_acc']:.4f} | "
                 f"{row['pgd_acc']:.4f} | {row['num_test']} | {aa} |")
  for name, row in results.items():
    if "ccat_tau" in row:
      lines.append(f"\nCCAT {name}: tau={row['ccat_tau']:.3f} "
                   f"({config.method.options.tpr:.0%} TPR), thresholded robust "
                   f"error {row['ccat_robust_error']:.4f}, unthresholded "
                   f"{row['ccat_robust_error_unthresholded']:.4f}, adversarial "
                   f"rejected {row['ccat_adv_rejected']:.3f}")
  if config.get("reference"):
    lines.append(f"\nRecipe: {config.reference}.")
  return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- run
def epoch_batches(train, batch_size: int, seed: int, epoch: int,
                  steps_per_epoch: int, replicated):
  """Epoch ``epoch``'s device batches, each with the epoch number (put on
  the devices once, explicitly: the step loop allows no implicit transfer)."""
  e = distributed.to_global(np.int32(epoch), replicated)
  for b in images.train_batches(train.images, train.labels, batch_size,
                                seed=seed, start_step=epoch * steps_per_epoch):
    yield {**b, "epoch": e}


def check_data(config, train) -> int:
  """The checks that need the training set (before anything is written):
  at least one batch per epoch, the batch divisible by the device count,
  the L2 radii within the input box. Returns the steps per epoch."""
  bs = int(config.train.batch_size)
  if len(train) < bs:
    raise cc.ConfigError(
        f"config field 'train.batch_size' ({bs}) exceeds the {len(train)} "
        f"training examples (after 'data.train_subset' and 'data.num_val'): "
        f"lower it or use more examples")
  devices = images.data_mesh().size
  if bs % devices:
    raise cc.ConfigError(
        f"config field 'train.batch_size' ({bs}) must be divisible by the "
        f"{devices} devices the batch is sharded over")
  dim = int(np.prod(train.image_shape))
  cc.check_eps(config, "method.attack.eps", config.method.attack.norm, dim)
  return len(train) // bs


def run(config, workdir: str, *, progress: bool = True,
        stop_after_epochs: int | None = None) -> dict | None:
  """Trains, selects and evaluates (see the module docstring). Every check
  (config, data, teacher) runs before the work dir is touched, so a start
  that fails leaves it as it was."""
  validate(config)
  distributed.initialize(config.distributed)
  train, val, test = load_data(config)
  model = make_model(config, train)
  steps_per_epoch = check_data(config, train)
  teacher = method_teacher(config, train)
  common.prepare_workdir(workdir, config)

  bs = int(config.train.batch_size)
  optimizer, _ = clf.make_optimizer(config.train, steps_per_epoch)
  k_init, k_train, k_eval = jax.random.split(jax.random.key(int(config.seed)), 3)
  built = build(config, model, train, k_init, teacher)
  state = TrainState.create(built.params, optimizer, k_train,
                            built.model_state)
  step = clf.jit_train_step(with_augmentation(built.loss_fn, config,
                                              train.num_classes), optimizer)
  replicated = NamedSharding(images.data_mesh(), P())
  ctx = jax.device_put(built.ctx, replicated) if built.ctx is not None else None

  ev = config.eval
  eval_model = models.with_compute_dtype(model, ev.get("compute_dtype",
                                                       "float32"))
  val_eval = clf.make_eval_step(
      eval_model, {"pgd": ("ce", select_attack(config))})
  val_x, val_y = val.images[:ev.val_subset or None], val.labels[:ev.val_subset or None]

  def evaluate_val(params, model_state):
    r = clf.evaluate(val_eval, params, model_state, images.eval_batches(
        val_x, val_y, int(ev.batch_size)), k_eval)
    return {k: v for k, v in r.items() if k != "per_example"}

  seed = int(config.seed)
  out = fit(
      workdir=workdir, state=state, step_fn=step,
      train_batches=lambda epoch: epoch_batches(
          train, bs, seed, epoch, steps_per_epoch, replicated),
      ctx=ctx, view=built.view,
      epochs=int(config.train.epochs), steps_per_epoch=steps_per_epoch,
      evaluate_fn=evaluate_val if len(val_x) else None,
      select_metric=ev.select_metric if len(val_x) else None,
      ema_decay=float(config.train.ema_decay) or None,
      swa_start_epoch=config.train.swa_start_epoch,
      bn_batches=lambda epoch: swa_bn_batches(config, train, epoch),
      model=model, log_every=int(config.train.log_every), progress=progress,
      stop_after_epochs=stop_after_epochs, state_sharding=replicated)
  if out["stopped"]:
    return None

  results = test_rows(config, eval_model, test, candidates(out, built.view),
                      k_eval, progress)
  summary = {"method": config.method.name, "model": config.model.name,
             "data": config.data.name, "eps": float(ev.eps),
             "reference": config.get("reference", ""),
             "select_on": ev.select_on,
             "best_epoch": out["best"]["epoch"] if out["best"] else None,
             "swa_best_epoch": (out["swa_best"]["epoch"] if out["swa_best"]
                                else None),
             "results": results, "history": out["history"],
             "config": common.config_dict(config),
             "provenance": common.provenance()}
  text = results_markdown(config, summary)
  if distributed.is_main_process():   # the other processes write nothing
    common.atomic_write(os.path.join(workdir, "results.json"),
                        json.dumps(common.to_jsonable(summary), indent=2))
    common.atomic_write(os.path.join(workdir, "results.md"), text)
    if progress:
      print(text)
  return {"summary": summary, "fit": out}


if __name__ == "__main__":
  common.launch("train", run, "configs/adv_train.py",
                "Experiment config (ml_collections file with "
                "':dataset,method[,smoke]').",
                default_variant="fashion_mnist,pgd_at",
                xla_flags=common.IMAGE_XLA_FLAGS)
