"""Image-classifier training pieces: init, optimizers, jitted steps, averages,
batch-norm re-estimation and masked evaluation.

All functions are independent of any experiment; ``tsjax.train.fit`` strings
them into a loop and ``experiments/train.py`` configures that loop.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import jax
import jax.numpy as jnp
import optax

from tsjax import config_checks as cc
from tsjax import losses
from tsjax.attacks import pgd
from tsjax.methods.common import ImageAttack, logits_fn
from tsjax.train.state import make_train_step

SCHEDULES = ("piecewise", "cosine", "exponential", "constant")


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
  ``config.boundaries`` in epochs (PyTorch MultiStepLR); exponential:
  ``lr * lr_factor ** (step / steps_per_epoch)`` (CCAT); cosine: linear warm-up
  over ``config.warmup_epochs`` then cosine decay to 0 at ``config.epochs``.
  """
  lr = config.lr
  name = cc.check_choice(config, "schedule", SCHEDULES)
  if name == "constant":
    return optax.constant_schedule(lr)
  if name == "exponential":   # per-epoch factor, applied smoothly per step
    return optax.exponential_decay(lr, steps_per_epoch, config.lr_factor)
  if name == "piecewise":
    bounds = {int(round(b * steps_per_epoch)): config.lr_factor
              for b in config.boundaries}
    return optax.piecewise_constant_schedule(lr, bounds)
  total = int(config.epochs * steps_per_epoch)
  warm = int(config.get("warmup_epochs", 0) * steps_per_epoch)
  return optax.warmup_cosine_decay_schedule(0.0 if warm else lr, lr, warm,
                                            max(total, warm + 1), 0.0)


OPTIMIZERS = ("sgd", "adam")


def make_optimizer(config, steps_per_epoch: int):
  """``config.optimizer`` (default ``"sgd"``): SGD with momentum and
  (PyTorch-style, coupled) weight decay; or ``"adam"``: Adam with decoupled
  weight decay scaled by the schedule (big_vision / FunMatch style). Either
  with optional global-norm gradient clipping ``config.grad_clip`` (> 0)."""
  sched = make_schedule(config, steps_per_epoch)
  name = config.get("optimizer", "sgd")
  if name not in OPTIMIZERS:
    raise cc.ConfigError(f"config field 'train.optimizer' must be one of "
                         f"{OPTIMIZERS}, got {name!r}")
  clip = float(config.get("grad_clip", 0.0) or 0.0)
  pre = [optax.clip_by_global_norm(clip)] if clip > 0 else []
  if name == "adam":
    return optax.chain(*pre, optax.adamw(sched, weight_decay=config.weight_decay)), sched
  return optax.chain(
      *pre, optax.add_decayed_weights(config.weight_decay),
      optax.sgd(sched, momentum=config.momentum or None,
                nesterov=bool(config.get("nesterov", False)))), sched


def jit_train_step(loss_fn, optimizer):
  """The jitted ``step(state, batch, ctx) -> (state, metrics)``. Batches that
  arrive sharded over devices give a data-parallel step (XLA inserts the
  gradient all-reduce); the state is donated."""
  return jax.jit(make_train_step(loss_fn, optimizer), donate_argnums=0)


@jax.jit
def ema_update(ema, params, decay):
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
def make_eval_step(model, attacks: Mapping[str, tuple[str, ImageAttack]]):
  """Jitted ``eval(params, model_state, images, labels, key) -> dict`` of
  per-example arrays (images uint8 or float in [0, 1]): ``clean/correct``, ``clean/conf`` and, per attack name,
  ``NAME/correct`` and ``NAME/conf`` (eval-mode batch norm throughout).

  ``attacks``: name -> (objective, ImageAttack) with objective one of
  ``"ce"`` (PGD / FGSM on cross-entropy), ``"cw"`` (margin, CW-inf) or
  ``"conf"`` (largest wrong-class probability, CCAT's evaluation).
  """
  from tsjax.methods.ccat import max_other_prob

  objectives = {
      "ce": lambda z, y: losses.cross_entropy(z, y),
      "cw": lambda z, y: losses.margin(z, y),
      "conf": lambda z, y: max_other_prob(z, y),
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

    record("clean", f(images))
    for i, (name, (obj, att)) in enumerate(sorted(attacks.items())):
      loss = objectives[obj]
      x_adv = pgd(lambda xa: loss(f(xa), labels), images,
                  jax.random.fold_in(key, i), eps=att.eps,
                  step_size=att.step_size, steps=att.steps, norm=att.norm,
                  restarts=att.restarts, random_start=att.random_start,
                  bounds=att.bounds, keep_best=att.restarts > 1)
      record(name, f(x_adv))
    return out

  return step


def evaluate(eval_step, params, model_state, batches, key) -> dict:
  """Runs ``eval_step`` over ``{"image", "label", "mask"}`` batches (see
  ``tsjax.data.images.eval_batches``); returns the per-example arrays of the
  real (mask True) examples, each counted exactly once, and accuracies
  ``NAME/acc``."""
  import numpy as np
  acc: dict[str, list] = {}
  for i, batch in enumerate(batches):
    out = eval_step(params, model_state, batch["image"], batch["label"],
                    jax.random.fold_in(key, i))
    keep = np.asarray(batch["mask"], bool)
    for k, v in out.items():
      acc.setdefault(k, []).append(np.asarray(v)[keep])
  res = {k: np.concatenate(v) for k, v in acc.items()}
  summary = {k.replace("/correct", "/acc"): float(np.mean(v))
             for k, v in res.items() if k.endswith("/correct")}
  summary["num_examples"] = int(len(res["clean/correct"])) if res else 0
  return {"per_example": res, **summary}
