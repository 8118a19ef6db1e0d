"""One training step of AdvFunMatch and one of PeerAiD, built as the library
builds them.

What it shows: every training method is a pure loss
``loss_fn(params, model_state, batch, key, ctx) -> (loss, (metrics,
model_state))`` from its registry entry (``tsjax.methods.REGISTRY[name]``),
turned into a jitted step by ``tsjax.train.classifier.jit_train_step``
together with an optax optimizer; the state is a ``tsjax.train.TrainState``.
Settings come from the installed configs
(``tsjax.configs.get_config("distill", "METHOD,fashion_mnist,smoke")``): the
model, the attack (``AttackSpec``), the method's options and the optimizer,
exactly what ``python -m experiments.distill`` would use.

* AdvFunMatch distils a frozen teacher, handed to the step in ``ctx``
  (``teacher_ctx``) so it never gets gradient. The teacher here is a small
  CNN trained for 150 steps of the ``standard`` method in this script (in a real run:
  ``tsjax.train.teachers.load_run(WORKDIR)`` of an ``experiments.train``
  run).
* PeerAiD has no fixed teacher: the student and its peer are one parameter
  tree ``{"student": ..., "peer": ...}`` (``methods.peeraid.init_pair``,
  the method's ``init``) trained jointly by the same step.

For each, the loss on one real Fashion-MNIST batch (64 images) is printed
before the step and after it (the same batch and the same attack key), plus
the step's other metrics.

Needs Fashion-MNIST from the Debian package (``apt-get install
dataset-fashion-mnist``). Nothing is downloaded or written. Run from the
repository root:

  python examples/distill_one_step.py      # ~20 s on a 2-core CPU
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

from tsjax import config_checks as cc
from tsjax import configs, methods, models
from tsjax.attacks import AttackSpec
from tsjax.data import images
from tsjax.methods.distill import teacher_ctx
from tsjax.train import TrainState
from tsjax.train.classifier import init_model, jit_train_step, make_optimizer

STEPS_PER_EPOCH = 100     # only sets the learning-rate schedule's epochs


def build_model(config, data):
  """``config.model`` from the registry, the data set's normalisation inside."""
  return models.get_model(config.model.name, num_classes=data.num_classes,
                          mean=data.mean, std=data.std,
                          **config.model.kwargs.to_dict())


def train_teacher(data, steps=150, batch=128):
  """A small CNN trained briefly with the ``standard`` method: the frozen
  teacher of AdvFunMatch (``(model, params, model_state)``)."""
  config = configs.get_config("adv_train", "fashion_mnist,standard,smoke")
  config.model.kwargs = {"features": (8, 16), "hidden": 32}   # as the students
  model = build_model(config, data)
  params, model_state = init_model(model, jax.random.key(10), data.image_shape)
  optimizer, _ = make_optimizer(config.train, STEPS_PER_EPOCH)
  step = jit_train_step(methods.REGISTRY["standard"].make_loss(model),
                        optimizer)
  state = TrainState.create(params, optimizer, jax.random.key(11), model_state)
  rng = np.random.default_rng(0)
  for _ in range(steps):
    idx = rng.integers(0, len(data), batch)
    state, metrics = step(state, {"image": images.to_float(data.images[idx]),
                                  "label": data.labels[idx]}, None)
  print(f"teacher: small CNN, {steps} standard steps, last batch accuracy "
        f"{float(metrics['acc']):.3f}")
  return model, state.params, state.model_state


def one_step(name, config, student, params, model_state, batch, ctx,
             teacher=None):
  """Builds method ``name`` from ``config`` and runs one step on ``batch``;
  prints the loss before and after the update."""
  method = methods.REGISTRY[name]
  attack = cc.build(AttackSpec, config.method.attack, "method.attack")
  options = method.build_options(config.method.options)
  loss_fn = method.make_loss(student, teacher=teacher, attack=attack,
                             options=options)
  optimizer, _ = make_optimizer(config.train, STEPS_PER_EPOCH)
  state = TrainState.create(params, optimizer, jax.random.key(1), model_state)
  key = jax.random.fold_in(state.key, state.step)   # the step's attack key
  step = jit_train_step(loss_fn, optimizer)
  state, metrics = step(state, batch, ctx)          # (the old state is donated)
  loss_after, _ = jax.jit(loss_fn)(state.params, state.model_state, batch,
                                   key, ctx)
  extra = ", ".join(f"{k} {float(v):.3f}" for k, v in sorted(metrics.items())
                    if k not in ("loss", "finite"))
  print(f"{name}: loss before the step {float(metrics['loss']):.4f}, after "
        f"{float(loss_after):.4f} (same batch and key); {extra}")
  return state


def main():
  t0 = time.time()
  data = images.load_fashion_mnist("train").subset(np.arange(5000))
  rng = np.random.default_rng(1)
  idx = rng.choice(len(data), 64, replace=False)
  batch = {"image": images.to_float(data.images[idx]),
           "label": jnp.asarray(data.labels[idx])}

  # AdvFunMatch: a student distilled from a frozen teacher passed in ctx.
  teacher, t_params, t_state = train_teacher(data)
  config = configs.get_config("distill", "advfunmatch,fashion_mnist,smoke")
  student = build_model(config, data)
  params, model_state = init_model(student, jax.random.key(0),
                                   data.image_shape)
  one_step("advfunmatch", config, student, params, model_state, batch,
           teacher_ctx(t_params, t_state), teacher=teacher)

  # PeerAiD: student and peer in one tree, trained together (no teacher).
  config = configs.get_config("distill", "peeraid,fashion_mnist,smoke")
  student = build_model(config, data)
  init_one = lambda k: init_model(student, k, data.image_shape)
  params, model_state = methods.peeraid.init_pair(init_one, jax.random.key(0))
  print(f"peeraid: parameter tree {sorted(params)}")
  one_step("peeraid", config, student, params, model_state, batch, None)
  print(f"done in {time.time() - t0:.1f} s")


if __name__ == "__main__":
  main()
