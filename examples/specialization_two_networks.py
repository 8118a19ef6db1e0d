"""Per-neuron correlation between the hidden units of two networks.

What it shows: ``tsjax.metrics``' specialization statistics (the metric of
the teacher–student study) work for any two networks. For each hidden unit j
of network A, the Pearson correlation with every unit k of network B over a
data set, ``C[j, k]``, is accumulated batch by batch
(``corr_init`` / ``corr_update``: running means and centred second moments,
so no activation matrix is ever held in memory), turned into the matrix by
``corr_finalize``, and summarised per unit of A by its best match in B
(``specialization_summary``: mean best correlation, number of units whose
best match exceeds each threshold), counting only units of A that are not
dead on the data (``active_nodes``).

The networks: small CNNs from the ``tsjax.models`` registry trained briefly on
real Fashion-MNIST with the library's ``standard`` method (two seeds), and an
untrained one. Compared on their 32-unit penultimate layer (``fc1``), over
2 000 test images streamed in batches of 250: a network against itself
(every best correlation 1), against the same architecture trained from
another seed, and against the untrained network.

Needs Fashion-MNIST from the Debian package (``apt-get install
dataset-fashion-mnist``). Nothing is downloaded or written. Run from the
repository root:

  python examples/specialization_two_networks.py      # ~15 s on a 2-core CPU
"""

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tsjax import methods, models
from tsjax.data import images
from tsjax.metrics import (active_nodes, corr_finalize, corr_init, corr_update,
                           specialization_summary)
from tsjax.train import TrainState
from tsjax.train.classifier import init_model, jit_train_step

N_TRAIN, N_EVAL, BATCH = 10_000, 2_000, 250
THRESHOLDS = (0.5, 0.7, 0.9)


def train_cnns(model, x, y, seeds, steps=200, batch=128):
  """``(params, model_state)`` of ``model`` after ``steps`` SGD steps of
  cross-entropy, one network per seed (the seed picks the initialisation
  and the batches); one jitted step serves every network."""
  optimizer = optax.sgd(0.05, momentum=0.9)
  step = jit_train_step(methods.REGISTRY["standard"].make_loss(model),
                        optimizer)
  nets = []
  for seed in seeds:
    params, model_state = init_model(model, jax.random.key(seed), x.shape[1:])
    state = TrainState.create(params, optimizer, jax.random.key(seed),
                              model_state)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
      idx = rng.integers(0, len(x), batch)
      state, _ = step(state, {"image": x[idx], "label": y[idx]}, None)
    nets.append((state.params, state.model_state))
  return nets


def penultimate(model, variables, x):
  """``[B, 32]`` activations of the last hidden layer (fc1, post-ReLU)."""
  params, model_state = variables
  return model.apply({"params": params, **model_state}, x,
                     return_hidden=True)[1][-1]


def streamed_summary(model, vars_a, vars_b, x):
  """Best-match correlations of A's units in B, streamed over batches."""
  m = penultimate(model, vars_a, x[:1]).shape[-1]
  n = penultimate(model, vars_b, x[:1]).shape[-1]
  stats = corr_init(m, n)
  for start in range(0, len(x), BATCH):
    stats = _update(model, stats, vars_a, vars_b, x[start:start + BATCH])
  C = corr_finalize(stats)                                    # [m, n]
  return specialization_summary(C, THRESHOLDS, active_nodes(stats))


@functools.partial(jax.jit, static_argnums=0)
def _update(model, stats, vars_a, vars_b, xb):
  """Merges one batch's activations of both networks into the statistics."""
  return corr_update(stats, penultimate(model, vars_a, xb),
                     penultimate(model, vars_b, xb))


def main():
  t0 = time.time()
  train = images.load_fashion_mnist("train")
  test = images.load_fashion_mnist("test")
  x = images.to_float(train.images[:N_TRAIN])
  y = jnp.asarray(train.labels[:N_TRAIN])
  x_eval = images.to_float(test.images[:N_EVAL])
  model = models.get_model("small_cnn", num_classes=10, mean=train.mean,
                           std=train.std, features=(8, 16), hidden=32)

  a, b = train_cnns(model, x, y, seeds=(0, 1))
  untrained = init_model(model, jax.random.key(2), x.shape[1:])
  nets = {"A (seed 0)": a, "B (seed 1)": b, "untrained": untrained}
  for name, variables in nets.items():
    logits = model.apply({"params": variables[0], **variables[1]}, x_eval)
    acc = float(jnp.mean(jnp.argmax(logits, -1) == test.labels[:N_EVAL]))
    print(f"network {name:11}: test accuracy {acc:.3f}")

  print(f"\nunits of A (fc1, {penultimate(model, a, x_eval[:1]).shape[-1]} "
        f"units) matched in another network, over {N_EVAL} test images:")
  for name, variables in nets.items():
    s = streamed_summary(model, a, variables, x_eval)
    counts = ", ".join(f"> {t}: {int(c)}" for t, c in
                       zip(THRESHOLDS, s["count_above"]))
    print(f"A vs {name:11}: mean best correlation {float(s['mean_best']):.3f} "
          f"over {int(s['num_active'])} active units ({counts})")
  print(f"done in {time.time() - t0:.1f} s")


if __name__ == "__main__":
  main()
