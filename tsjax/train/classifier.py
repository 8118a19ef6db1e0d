"""Image-classifier training pieces: init, optimizers, jitted steps, averages,
batch-norm re-estimation and masked evaluation.

All functions are independent of any experiment; ``tsjax.train.fit`` strings
them into a loop and ``experiments/train.py`` configures that loop.
"""

from __future__ import annotations

import functools
from typing import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from tsjax import config_checks as cc
from tsjax import losses
from tsjax.attacks import AttackSpec
from tsjax.attacks.autoattack import VERSIONS, autoattack
from tsjax.methods.common import ModelLogits, logits_fn
from tsjax.train.distributed import (is_main_process, split_points, sum_hosts,
                                    to_global, to_host)
from tsjax.train.state import make_train_step

SCHEDULES = ("piecewise", "cosine", "exponential", "step_exponential",
             "constant")
OPTIMIZERS = ("sgd", "adam")
LR_AT = ("step_start", "step_end")
WEIGHT_DECAY_STYLES = ("l2", "decoupled")
WEIGHT_DECAY_ON = ("all", "kernels")


def init_model(model, key, input_shape, dtype=jnp.float32):
  """``(params, model_state)`` for inputs of shape ``input_shape`` (HWC).

  The init is jitted: one compilation instead of one per parameter shape,
  which takes tens of seconds for a ResNet on a CPU."""
  init = jax.jit(lambda k: model.init(k, jnp.zeros((1, *input_shape), dtype),
                                      train=False))
  variables = init(key)
  variables = dict(variables)
  params = variables.pop("params")
  return params, variables


def make_schedule(config, steps_per_epoch: int) -> optax.Schedule:
  """``config.schedule`` in SCHEDULES; epochs -> steps.

  piecewise: ``lr * lr_factor ** (number of boundaries passed)`` with
  ``config.boundaries`` in 0-based epochs (the first epoch at the new rate;
  PyTorch MultiStepLR); exponential: ``lr * lr_factor ** (step /
  steps_per_epoch)``; step_exponential: ``lr * lr_factor ** floor(epoch)``
  (CCAT's ``LambdaLR(gamma ** floor(step / batches_per_epoch))``); cosine:
  linear warm-up over ``config.warmup_epochs`` then cosine decay to 0 at
  ``config.epochs``. ``config.lr_at``: ``"step_start"`` (step ``s`` uses
  the rate at ``s``) or ``"step_end"`` (at ``s + 1``: Rice et al.'s
  train_cifar.py:306 ``lr_schedule(epoch + (i + 1) / len(train_batches))``,
  so the last step of an epoch before a boundary already runs at the new
  rate).
  """
  base = _base_schedule(config, steps_per_epoch)
  if "lr_at" in config and cc.check_choice(config, "lr_at", LR_AT) == "step_end":
    return lambda step: base(step + 1)
  return base


def _base_schedule(config, steps_per_epoch: int) -> optax.Schedule:
  lr = config.lr
  name = cc.check_choice(config, "schedule", SCHEDULES)
  if name == "constant":
    return optax.constant_schedule(lr)
  if name in ("exponential", "step_exponential"):
    return optax.exponential_decay(lr, steps_per_epoch, config.lr_factor,
                                   staircase=name == "step_exponential")
  if name == "piecewise":
    bounds = {int(round(b * steps_per_epoch)): config.lr_factor
              for b in config.boundaries}
    return optax.piecewise_constant_schedule(lr, bounds)
  total = int(config.epochs * steps_per_epoch)
  warm = int(config.get("warmup_epochs", 0) * steps_per_epoch)
  return optax.warmup_cosine_decay_schedule(0.0 if warm else lr, lr, warm,
                                            max(total, warm + 1), 0.0)


def kernel_mask(params):
  """True for the leaves named ``kernel`` (Dense / Conv weights): big_vision's
  default ``wd_mults = [('.*/kernel$', 1.0)]``."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


def decoupled_weight_decay(rate: optax.Schedule) -> optax.GradientTransformation:
  """``u <- u - rate(t) * theta`` after the learning-rate scaling
  (big_vision's ``add_decayed_weights(wd * schedule_multiplier)``,
  big_vision/optax.py:133-145)."""
  def init(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update(updates, state, params):
    r = rate(state.count)
    updates = jax.tree.map(lambda u, p: u - r * p, updates, params)
    return updates, optax.ScaleByScheduleState(
        count=optax.safe_int32_increment(state.count))
  return optax.GradientTransformation(init, update)


def make_optimizer(config, steps_per_epoch: int):
  """``(optimizer, schedule)`` from the ``train`` config section.

  ``optimizer``: ``"sgd"`` (momentum, optional Nesterov) or ``"adam"``.
  Weight decay ``weight_decay`` in ``weight_decay_style``: ``"l2"`` adds
  ``wd * theta`` to the gradient before the optimizer (PyTorch's SGD / Adam
  ``weight_decay``); ``"decoupled"`` subtracts ``wd * (schedule(t) / lr) *
  theta`` after the learning-rate scaling (big_vision / FunMatch). It applies
  to ``weight_decay_on``: ``"all"`` parameters or ``"kernels"`` only (no
  biases, no batch-norm scales). Optional global-norm gradient clipping
  ``grad_clip`` (> 0) comes first.
  """
  sched = make_schedule(config, steps_per_epoch)
  name = config.get("optimizer", "sgd")
  if name not in OPTIMIZERS:
    raise cc.ConfigError(f"config field 'train.optimizer' must be one of "
                         f"{OPTIMIZERS}, got {name!r}")
  style = config.get("weight_decay_style", "l2")
  on = config.get("weight_decay_on", "all")
  for field, value, choices in (("weight_decay_style", style,
                                 WEIGHT_DECAY_STYLES),
                                ("weight_decay_on", on, WEIGHT_DECAY_ON)):
    if value not in choices:
      raise cc.ConfigError(f"config field 'train.{field}' must be one of "
                           f"{choices}, got {value!r}")
  wd = float(config.weight_decay)
  mask = kernel_mask if on == "kernels" else None
  clip = float(config.get("grad_clip", 0.0) or 0.0)
  parts = [optax.clip_by_global_norm(clip)] if clip > 0 else []
  if wd and style == "l2":
    parts.append(optax.add_decayed_weights(wd, mask))
  if name == "adam":
    parts.append(optax.adam(sched))
  else:
    parts.append(optax.sgd(sched, momentum=config.momentum or None,
                           nesterov=bool(config.get("nesterov", False))))
  if wd and style == "decoupled":
    lr = float(config.lr)
    rate = lambda t: wd * sched(t) / lr
    dec = decoupled_weight_decay(rate)
    parts.append(optax.masked(dec, mask) if mask else dec)
  return optax.chain(*parts), sched


def jit_train_step(loss_fn, optimizer):
  """The jitted ``step(state, batch, ctx) -> (state, metrics)``. Batches that
  arrive sharded over devices give a data-parallel step (XLA inserts the
  gradient all-reduce); the state is donated."""
  return jax.jit(make_train_step(loss_fn, optimizer), donate_argnums=0)


@functools.partial(jax.jit, static_argnames="decay")
def ema_update(ema, params, decay: float):
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


@jax.jit
def swa_update(swa, params, count):
  """Equal-weight running average: ``count`` models already averaged."""
  return jax.tree.map(lambda s, p: s + (p - s) / (count + 1.0), swa, params)


def bn_reestimate(model, params, model_state, batches: Iterable,
                  momentum: float = 0.9):
  """Recomputes batch-norm running statistics for ``params`` as the
  cumulative (equal-weight) average of per-batch statistics over ``batches``
  (images in [0, 1]), like ``torch.optim.swa_utils.update_bn``.

  A train-mode pass from zero statistics returns ``(1 - momentum) * batch
  statistic``, so ``momentum`` must be the models' BatchNorm momentum (0.9
  for tsjax models). Flax keeps the biased batch variance.
  """
  if "batch_stats" not in model_state:
    return model_state
  zeros = jax.tree.map(jnp.zeros_like, model_state["batch_stats"])

  @jax.jit
  def batch_stats(x):
    _, upd = model.apply({"params": params, "batch_stats": zeros}, x,
                         train=True, mutable=["batch_stats"])
    return jax.tree.map(lambda s: s / (1.0 - momentum), upd["batch_stats"])

  avg, n = None, 0
  for x in batches:
    b = batch_stats(x)
    avg = b if avg is None else jax.tree.map(
        lambda a, s: a + (s - a) / (n + 1.0), avg, b)
    n += 1
  if avg is None:
    raise ValueError("bn_reestimate needs at least one batch")
  return {**model_state, "batch_stats": avg}


# ------------------------------------------------------------------ evaluation
def make_eval_step(model, attacks: Mapping[str, tuple[str, AttackSpec]]):
  """Jitted ``eval(params, model_state, images, labels, key) -> dict`` of
  per-example arrays (images uint8 or float in [0, 1]): ``clean/correct``,
  ``clean/conf`` (largest probability), ``clean/other`` (largest wrong-class
  probability) and, per attack name, ``NAME/correct``, ``NAME/conf`` and
  ``NAME/other`` (eval-mode batch norm throughout).

  ``attacks``: name -> (objective, AttackSpec) with objective one of
  ``"ce"`` (PGD / FGSM on cross-entropy), ``"cw"`` (margin, CW-inf) or
  ``"conf"`` (largest wrong-class probability, CCAT's evaluation).
  """
  objectives = {
      "ce": lambda z, y: losses.cross_entropy(z, y),
      "cw": lambda z, y: losses.margin(z, y),
      "conf": lambda z, y: losses.max_other_prob(z, y),
  }
  for name, (obj, _) in attacks.items():
    if obj not in objectives:
      raise ValueError(f"attack {name!r}: unknown objective {obj!r}; expected "
                       f"one of {sorted(objectives)}")

  @jax.jit
  def step(params, model_state, images, labels, key):
    if images.dtype == jnp.uint8:
      images = images.astype(jnp.float32) / 255.0
    f = logits_fn(model, params, model_state, "eval")
    out = {}

    def record(prefix, logits):
      p = jax.nn.softmax(logits, -1)
      out[f"{prefix}/correct"] = jnp.argmax(logits, -1) == labels
      out[f"{prefix}/conf"] = jnp.max(p, -1)
      out[f"{prefix}/other"] = losses.max_other_prob(logits, labels)

    record("clean", f(images))
    for i, (name, (obj, att)) in enumerate(sorted(attacks.items())):
      loss = objectives[obj]
      x_adv = att.run(lambda xa: loss(f(xa), labels), images,
                      jax.random.fold_in(key, i))
      record(name, f(x_adv))
    return out

  return step


@jax.jit
def _masked_counts(out, mask):
  """Per-batch counts of real examples: ``num`` and, per ``NAME/correct``,
  the number correct. Integer sums over the global batch, reduced on device
  (replicated result), so they are exact and each example counts once."""
  mask = mask.astype(bool)
  counts = {k: jnp.sum(v & mask, dtype=jnp.int32)
            for k, v in out.items() if k.endswith("/correct")}
  counts["num"] = jnp.sum(mask, dtype=jnp.int32)
  return counts


@jax.jit
def _add_counts(a, b):
  return jax.tree.map(jnp.add, a, b)


def _replicated_like(images, tree):
  """``tree`` placed (explicitly) replicated over the mesh ``images`` is
  sharded on; unchanged for unsharded images or a tree already there."""
  sharding = getattr(images, "sharding", None)
  if not isinstance(sharding, NamedSharding):
    return tree
  rep = NamedSharding(sharding.mesh, PartitionSpec())
  if all(getattr(x, "sharding", None) == rep for x in jax.tree.leaves(tree)):
    return tree
  return to_global(tree, rep)


def _batch_key(key, i: int, images):
  """``fold_in(key, i)`` where the batch's devices can read it."""
  return _replicated_like(images, jax.random.fold_in(key, i))


def evaluate(eval_step, params, model_state, batches, key, *,
             per_example: bool = True) -> dict:
  """Runs ``eval_step`` over ``{"image", "label", "mask"}`` batches (see
  ``tsjax.data.images.eval_batches``); returns accuracies ``NAME/acc`` and
  ``num_examples`` over the real (mask True) examples, each counted exactly
  once, and (``per_example``) the per-example arrays of those examples.

  The counts are summed on device over each global (padded, masked) batch,
  so batches sharded over several processes give the numbers of the whole
  set on every process; the per-example arrays are all-gathered on device
  (``tsjax.train.distributed.to_host``), never read from other processes'
  memory. Every process must call this together with the same batches.
  """
  counts, kept = None, []
  # No implicit transfer per batch: the batch and its key are explicit
  # device puts; the counts come back once, at the end.
  for i, batch in enumerate(batches):
    if i == 0:   # once, explicitly: where the batches' devices read them
      params, model_state = _replicated_like(batch["image"],
                                             (params, model_state))
    k = _batch_key(key, i, batch["image"])
    with jax.transfer_guard("disallow"):
      out = eval_step(params, model_state, batch["image"], batch["label"], k)
      c = _masked_counts(out, batch["mask"])
      counts = c if counts is None else _add_counts(counts, c)
      if per_example:
        kept.append((out, batch["mask"]))
  if counts is None:
    return {"per_example": {}, "num_examples": 0} if per_example else {
        "num_examples": 0}
  counts = to_host(counts)
  n = int(counts.pop("num"))
  summary = {k.replace("/correct", "/acc"): int(v) / n if n else float("nan")
             for k, v in counts.items()}
  summary["num_examples"] = n
  if not per_example:
    return summary
  host = to_host(kept)
  res = {k: np.concatenate([o[k][np.asarray(m, bool)] for o, m in host])
         for k in host[0][0]}
  return {"per_example": res, **summary}


def autoattack_split(model, params, model_state, x, y, key, *, progress=False,
                     **kwargs) -> dict:
  """AutoAttack (``tsjax.attacks.autoattack.autoattack`` with ``kwargs``) on
  images ``x`` (uint8 or float in [0, 1]) and labels ``y``, the points split
  between the processes.

  Each process attacks its contiguous share of the points
  (``split_points``) on its own devices; the clean, final and
  per-attack robust counts are summed over the processes (a device
  all-gather), so every process returns the numbers of all the points. With
  one process this is ``autoattack`` on every point. ``warnings`` are the
  sanity-check messages of this process's share. Every process must call it.
  """
  x, y = np.asarray(x), np.asarray(y, np.int32)
  if x.dtype == np.uint8:
    x = x.astype(np.float32) / 255.0
  names = tuple(kwargs.get("attacks") or
                VERSIONS[kwargs.get("version", "standard")])
  lo, hi = split_points(len(x))
  n_local = hi - lo
  counts = np.zeros(2 + len(names), np.int64)   # clean, robust, after each
  warnings = []
  p_ms = (params, model_state)
  if jax.process_count() > 1:   # process-local copies: each attacks alone
    p_ms = jax.tree.map(jnp.asarray, to_host(p_ms))
  if n_local:
    aa = autoattack(ModelLogits(model, "eval"), x[lo:hi], y[lo:hi], key,
                    progress=progress and is_main_process(),
                    params=p_ms, **kwargs)
    after = aa["robust_acc_after"]
    counts[:] = [round(aa["clean_acc"] * n_local),
                 int(np.sum(aa["robust"]))] + [
                     round(after.get(a, aa["robust_acc"]) * n_local)
                     for a in names]
    warnings = list(aa["warnings"])
  total = sum_hosts(counts)
  n = max(len(x), 1)
  return {"clean_acc": float(total[0]) / n, "robust_acc": float(total[1]) / n,
          "robust_acc_after": {a: float(c) / n
                               for a, c in zip(names, total[2:])},
          "warnings": warnings, "num_examples": len(x)}
