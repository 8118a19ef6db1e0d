r"""Train an image classifier with any method: standard, PGD-AT, TRADES, CCAT.

  python -m experiments.train --config configs/adv_train.py:fashion_mnist,pgd_at
  python -m experiments.train --config configs/adv_train.py:fashion_mnist,ccat,smoke \
      --workdir /tmp/ccat --config.train.epochs=1

Trains on the training split minus a seeded validation split, selects the best
epoch by validation robust accuracy (PGD, never the test set), and reports the
last and the best parameters (and EMA / SWA when enabled) on the test set:
clean accuracy, PGD-20 accuracy and, for CCAT, the confidence-thresholded
robust error at 99% TPR. Writes ``results.json``, ``results.md``,
``metrics.jsonl``, TensorBoard events (``tb/``) and Orbax checkpoints
(``checkpoints/``, ``best/``; a killed run resumes) to the work dir.
"""

from __future__ import annotations

import json
import os

from typing import Any, NamedTuple


METHODS = ("standard", "pgd_at", "trades", "ccat")


def validate(config, methods=METHODS) -> None:
  """Config checks that need no data and compile nothing."""
  from tsjax import config_checks as cc
  from tsjax import models
  from tsjax.attacks import NORMS
  from tsjax.data import images
  from tsjax.methods.common import BN_MODES
  from tsjax.train.classifier import SCHEDULES

  cc.check_number(config, "seed", low=0, integer=True)
  cc.check_choice(config, "data.name", tuple(images.DATASETS))
  cc.check_number(config, "data.num_val", low=0, integer=True)
  cc.check_number(config, "data.train_subset", low=0, integer=True)
  cc.check_number(config, "data.test_subset", low=0, integer=True)
  name = cc.get_field(config, "model.name")
  if name not in models.REGISTRY:
    raise cc.ConfigError(f"config field 'model.name' must be one of "
                         f"{sorted(models.REGISTRY)}, got {name!r}")
  cc.check_choice(config, "method.name", methods)
  cc.check_choice(config, "method.attack.norm", NORMS)
  cc.check_number(config, "method.attack.eps", low=0)
  cc.check_number(config, "method.attack.step_size", low=0)
  cc.check_number(config, "method.attack.steps", low=1, integer=True)
  cc.check_choice(config, "method.attack.bn_mode", BN_MODES)
  cc.check_choice(config, "method.attack.start", ("uniform", "normal"))
  cc.check_number(config, "method.attack.restarts", low=1, integer=True)
  if config.method.name in METHODS:
    cc.check_number(config, "method.label_smoothing", low=0, high=1)
    cc.check_number(config, "method.trades_beta", low=0)
    cc.check_number(config, "method.ccat_rho", low=0, low_open=True)
    cc.check_number(config, "method.ccat_clean_fraction", low=0, high=1)
  from tsjax.data import augment
  spec = augment.parse_augment_spec(cc.get_field(config, "augment"), "augment")
  if config.method.name == "ccat" and any(n in ("mixup", "cutmix")
                                          for n, _ in spec):
    raise cc.ConfigError("config field 'augment': mixup / cutmix give soft "
                         "labels, which CCAT's targets do not take")
  cc.check_number(config, "train.batch_size", low=1, integer=True)
  cc.check_number(config, "train.epochs", low=1, integer=True)
  cc.check_number(config, "train.lr", low=0)
  cc.check_number(config, "train.momentum", low=0, high=1)
  cc.check_number(config, "train.weight_decay", low=0)
  cc.check_choice(config, "train.schedule", SCHEDULES)
  cc.check_number(config, "train.lr_factor", low=0)
  cc.check_number(config, "train.ema_decay", low=0, high=1)
  cc.check_number(config, "train.swa_start_epoch", integer=True)
  cc.check_number(config, "train.log_every", low=1, integer=True)
  cc.check_number(config, "eval.batch_size", low=1, integer=True)
  cc.check_number(config, "eval.eps", low=0)
  cc.check_number(config, "eval.pgd_steps", low=1, integer=True)
  cc.check_number(config, "eval.val_pgd_steps", low=1, integer=True)
  cc.check_number(config, "eval.val_subset", low=0, integer=True)
  cc.check_number(config, "eval.ccat_tpr", low=0, high=1, low_open=True)
  cc.check_number(config, "eval.autoattack_subset", low=0, integer=True)
  from tsjax.attacks.autoattack import VERSIONS
  cc.check_choice(config, "eval.autoattack_version", tuple(VERSIONS))
  cc.get_field(config, "eval.select_metric")


def build_attack(config):
  """The method's inner maximisation from ``config.method.attack``."""
  from tsjax.methods.common import ImageAttack
  a = config.method.attack
  return ImageAttack(norm=a.norm, eps=a.eps, step_size=a.step_size,
                     steps=int(a.steps), bn_mode=a.bn_mode,
                     start_std=0.001 if a.start == "normal" else None,
                     restarts=int(a.get("restarts", 1)))


class Built(NamedTuple):
  """What a method hands the generic training run: its pure loss, the
  initial trainable variables, the step's ``ctx`` (frozen teachers) and the
  ``view`` of the trained tree that is evaluated / averaged / selected."""
  loss_fn: Any
  params: Any
  model_state: Any
  ctx: Any = None
  view: Any = None


def build_classifier(config, model, data, key) -> Built:
  """experiments.train's methods: one network trained from scratch."""
  from tsjax.train import classifier as clf
  params, model_state = clf.init_model(model, key, data.image_shape)
  return Built(build_method(config, model), params, model_state)


def build_method(config, model):
  """The method's pure loss (uint8 batches are converted and augmented inside)."""
  from tsjax.methods import ccat, pgd_at, standard, trades

  attack = build_attack(config)
  m = config.method
  if m.name == "standard":
    return standard.make_loss(model, label_smoothing=m.label_smoothing)
  if m.name == "pgd_at":
    return pgd_at.make_loss(model, attack)
  if m.name == "trades":
    return trades.make_loss(model, attack, beta=m.trades_beta)
  if m.name == "ccat":
    return ccat.make_loss(model, attack, rho=m.ccat_rho,
                          clean_fraction=m.ccat_clean_fraction)
  raise ValueError(f"unknown method {m.name!r}; expected one of {METHODS}")


def with_augmentation(loss_fn, config, num_classes: int):
  """Wraps a method loss: uint8 -> [0, 1] floats, then on-device augmentation
  with a per-step key (the same view is used by everything inside the loss)."""
  import jax
  import jax.numpy as jnp
  from tsjax.data import augment

  spec = augment.parse_augment_spec(config.augment, "augment")
  aug = augment.make_augment(spec)
  mixing = any(name in ("mixup", "cutmix") for name, _ in spec)

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


def autoattack_row(model, params, model_state, test, ev, eps, key,
                   progress: bool) -> dict:
  """AutoAttack (``ev.autoattack_version``, L-inf ``eps``) on the first
  ``ev.autoattack_subset`` test examples."""
  import numpy as np
  from tsjax.attacks.autoattack import autoattack
  from tsjax.methods.common import ModelLogits
  n = min(int(ev.autoattack_subset), len(test))
  # Parameters as an argument: the attacks compiled for the first parameter
  # set evaluated (best, last, EMA, SWA) serve the others.
  aa = autoattack(ModelLogits(model, "eval"),
                  test.images[:n].astype(np.float32) / 255.0, test.labels[:n],
                  key, norm="linf", eps=eps, version=ev.autoattack_version,
                  batch_size=int(ev.batch_size), progress=progress,
                  params=(params, model_state))
  return {"aa_acc": float(aa["robust_acc"]), "aa_clean_acc": float(aa["clean_acc"]),
          "aa_num": n, "aa_after": aa["robust_acc_after"],
          "aa_warnings": aa["warnings"]}


def run(config, workdir: str, *, progress: bool = True,
        stop_after_epochs: int | None = None, build=None,
        methods=METHODS) -> dict | None:
  """Trains, selects and evaluates; ``build(config, model, train_set, key)
  -> Built`` supplies the method (default: ``build_classifier``; the
  distillation experiment passes its own)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P

  from experiments import common
  from tsjax import models
  from tsjax.data import images
  from tsjax.methods.ccat import confidence_threshold, thresholded_errors
  from tsjax.methods.common import ImageAttack
  from tsjax.train import TrainState
  from tsjax.train import classifier as clf
  from tsjax.train.fit import fit

  validate(config, methods)
  if config.distributed.coordinator_address:
    jax.distributed.initialize(config.distributed.coordinator_address,
                               int(config.distributed.num_processes),
                               int(config.distributed.process_id))
  full_train = images.load_from_config(config, "train")
  test = images.load_from_config(config, "test")
  if config.data.train_subset:
    full_train = full_train.subset(np.arange(min(config.data.train_subset,
                                                 len(full_train))))
  if config.data.test_subset:
    test = test.subset(np.arange(min(config.data.test_subset, len(test))))
  train, val = images.split_dataset(full_train, int(config.data.num_val),
                                    int(config.seed))
  normalize = bool(config.model.get("normalize", True))
  model = models.get_model(config.model.name, num_classes=train.num_classes,
                           mean=train.mean if normalize else (0.0,),
                           std=train.std if normalize else (1.0,),
                           **config.model.kwargs.to_dict())
  models.check_input_shape(model, train.image_shape)   # before compiling
  common.prepare_workdir(workdir, config)

  bs = int(config.train.batch_size)
  steps_per_epoch = len(train) // bs
  if steps_per_epoch < 1:
    raise ValueError(f"config field 'train.batch_size' ({bs}) exceeds the "
                     f"{len(train)} training examples")
  optimizer, _ = clf.make_optimizer(config.train, steps_per_epoch)
  key = jax.random.key(int(config.seed))
  k_init, k_train, k_eval = jax.random.split(key, 3)
  built = (build or build_classifier)(config, model, train, k_init)
  state = TrainState.create(built.params, optimizer, k_train,
                            built.model_state)
  step = clf.jit_train_step(with_augmentation(built.loss_fn, config,
                                              train.num_classes), optimizer)
  replicated = NamedSharding(images.data_mesh(), P())
  ctx = jax.device_put(built.ctx, replicated) if built.ctx is not None else None

  eps, ev = config.eval.eps, config.eval
  pgd = lambda steps: ImageAttack(norm="linf", eps=eps,
                                  step_size=2.5 * eps / steps, steps=steps)
  val_eval = clf.make_eval_step(model, {"pgd": ("ce", pgd(ev.val_pgd_steps))})
  test_attacks = {"pgd": ("ce", pgd(ev.pgd_steps))}
  if config.method.name == "ccat":
    test_attacks["pgd_conf"] = ("conf", pgd(ev.pgd_steps))
  test_eval = clf.make_eval_step(model, test_attacks)
  val_x = val.images[:ev.val_subset or None]
  val_y = val.labels[:ev.val_subset or None]
  ebs = int(ev.batch_size)

  def evaluate_val(params, model_state):
    r = clf.evaluate(val_eval, params, model_state,
                     images.eval_batches(val_x, val_y, ebs), k_eval)
    return {k: v for k, v in r.items() if k != "per_example"}

  swa_start = int(config.train.swa_start_epoch)
  out = fit(
      workdir=workdir, state=state, step_fn=step,
      train_batches=lambda epoch: ({**b, "epoch": np.int32(epoch)}
                                   for b in images.train_batches(
          train.images, train.labels, bs, seed=int(config.seed),
          start_step=epoch * steps_per_epoch)),
      ctx=ctx, view=built.view,
      epochs=int(config.train.epochs), steps_per_epoch=steps_per_epoch,
      evaluate_fn=evaluate_val if len(val_x) else None,
      select_metric=ev.select_metric if len(val_x) else None,
      ema_decay=float(config.train.ema_decay) or None,
      swa_start_epoch=swa_start if swa_start >= 0 else None,
      bn_batches=lambda: (b["image"].astype(jnp.float32) / 255.0 for b in
                          images.train_batches(train.images, train.labels, bs,
                                               seed=int(config.seed) + 1,
                                               num_epochs=1)),
      model=model, log_every=int(config.train.log_every), progress=progress,
      stop_after_epochs=stop_after_epochs,
      state_sharding=replicated)
  if out["stopped"]:
    return None

  final = out["state"]
  view = built.view or (lambda p, ms: (p, ms))
  candidates = {"last": view(final.params, final.model_state)}
  if out["best"] is not None:
    candidates["best"] = (out["best"]["params"], out["best"]["model_state"])
  if out["ema"] is not None:
    candidates["ema"] = (out["ema"], view(final.params, final.model_state)[1])
  if out["swa"] is not None and int(out["swa"]["count"]) > 0:
    candidates["swa"] = (out["swa"]["params"], out["swa"]["model_state"])
  results = {}
  for name, (p, ms) in candidates.items():
    r = clf.evaluate(test_eval, p, ms, images.eval_batches(
        test.images, test.labels, ebs), jax.random.fold_in(k_eval, 1))
    row = {"clean_acc": r["clean/acc"], "pgd20_acc": r["pgd/acc"],
           "num_test": r["num_examples"]}
    aa_on = tuple(ev.get("autoattack_params", ("last", "best", "ema", "swa")))
    if ev.autoattack_subset and name in aa_on:
      row.update(autoattack_row(model, p, ms, test, ev, eps,
                                jax.random.fold_in(k_eval, 2), progress))
    if config.method.name == "ccat":
      pe = r["per_example"]
      tau = confidence_threshold(pe["clean/conf"], pe["clean/correct"],
                                 ev.ccat_tpr)
      th = thresholded_errors(tau, pe["clean/correct"], pe["pgd_conf/conf"],
                              pe["pgd_conf/correct"])
      row.update({f"ccat_{k}": v for k, v in th.items()})
      row["ccat_conf_attack_acc"] = r["pgd_conf/acc"]
    results[name] = row
  summary = {"method": config.method.name, "model": config.model.name,
             "data": config.data.name, "eps": eps,
             "best_epoch": out["best"]["epoch"] if out["best"] else None,
             "results": results, "history": out["history"],
             "config": common.config_dict(config)}
  common.atomic_write(os.path.join(workdir, "results.json"),
                      json.dumps(common.to_jsonable(summary), indent=2))
  lines = [f"# {config.method.name} / {config.model.name} / {config.data.name}"
           f" (linf eps {eps:g}, PGD-{ev.pgd_steps})", "",
           "| params | clean acc | PGD-20 acc | test examples | AutoAttack acc |",
           "|---|---|---|---|---|"]
  for name, row in results.items():
    extra = (f" (best epoch {out['best']['epoch']})"
             if name == "best" and out["best"] else "")
    aa = (f"{row['aa_acc']:.4f} (first {row['aa_num']})" if "aa_acc" in row
          else "–")
    lines.append(f"| {name}{extra} | {row['clean_acc']:.4f} | "
                 f"{row['pgd20_acc']:.4f} | {row['num_test']} | {aa} |")
  if config.method.name == "ccat":
    for name, row in results.items():
      lines.append(f"\nCCAT {name}: tau={row['ccat_tau']:.3f} (99% TPR), "
                   f"thresholded robust error {row['ccat_robust_error']:.4f}, "
                   f"unthresholded {row['ccat_robust_error_unthresholded']:.4f},"
                   f" adversarial rejected {row['ccat_adv_rejected']:.3f}")
  text = "\n".join(lines) + "\n"
  common.atomic_write(os.path.join(workdir, "results.md"), text)
  if progress:
    print(text)
  return {"summary": summary, "fit": out}


if __name__ == "__main__":
  from experiments import common
  common.launch("train", run, "configs/adv_train.py",
                "Experiment config (ml_collections file with "
                "':dataset,method[,smoke]').",
                default_variant="fashion_mnist,pgd_at")
