"""Attack any Flax model: PGD, subspace-restricted PGD and AutoAttack.

What it shows: tsjax's attacks never see a model, only a function of the
input. Any Flax module (here a two-layer MLP defined in this file, trained for
a few hundred Adam steps on real Fashion-MNIST) is attacked by

* ``tsjax.attacks.pgd`` on a per-example loss ``x_adv -> [B]`` (L-inf, with
  random restarts, the best restart kept per example);
* the same PGD restricted to a subspace: L2 perturbations only inside
  span(U) (``restrict="in"``) or only in its orthogonal complement
  (``restrict="orth"``), with U the 20 leading principal directions of the
  training images (no pixel box for these two, see the comment in ``main``;
  the standard-trained MLP is far more fragile off span(U) than inside it,
  the teacher–student study's theme);
* AutoAttack (``tsjax.attacks.autoattack.autoattack``) with a reduced attack
  list (APGD-CE, APGD-T) and 25 iterations instead of 100.

Needs Fashion-MNIST from the Debian package (``apt-get install
dataset-fashion-mnist``, files in /usr/share/datasets/fashion-mnist).
Nothing is downloaded or written. Run from the repository root:

  python examples/attack_any_model.py      # ~15 s on a 2-core CPU
"""

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tsjax import losses
from tsjax.attacks import pgd
from tsjax.attacks.autoattack import autoattack
from tsjax.data import images

N_TRAIN, N_TEST = 10_000, 200
EPS_LINF = 0.1          # the usual Fashion-MNIST L-inf radius (pixels in [0, 1])
EPS_L2 = 2.0            # L2 radius of the subspace-restricted attacks
RANK = 20               # dimension of the principal subspace span(U)


class MLP(nn.Module):
  """Any Flax model works; this one flattens 28x28x1 images in [0, 1]."""
  hidden: int = 256

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.hidden)(x))
    return nn.Dense(10)(x)


def load(split, n):
  """``n`` Fashion-MNIST images as float32 in [0, 1] and int32 labels."""
  ds = images.load_fashion_mnist(split)
  return images.to_float(ds.images[:n]), jnp.asarray(ds.labels[:n])


def train(model, x, y, key, steps=300, batch=128):
  """A few hundred Adam steps of plain cross-entropy (jitted step)."""
  params = model.init(key, x[:1])
  opt = optax.adam(1e-3)
  opt_state = opt.init(params)

  @jax.jit
  def step(params, opt_state, xb, yb):
    loss, g = jax.value_and_grad(lambda p: jnp.mean(
        losses.cross_entropy(model.apply(p, xb), yb)))(params)
    updates, opt_state = opt.update(g, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(0)
  for _ in range(steps):
    idx = rng.integers(0, len(x), batch)
    params, opt_state, loss = step(params, opt_state, x[idx], y[idx])
  return params, float(loss)


def accuracy(logits_fn, x, y):
  return float(jnp.mean(jnp.argmax(logits_fn(x), -1) == y))


def main():
  t0 = time.time()
  x_train, y_train = load("train", N_TRAIN)
  x_test, y_test = load("test", N_TEST)
  model = MLP()
  params, loss = train(model, x_train, y_train, jax.random.key(0))
  logits_fn = jax.jit(lambda x: model.apply(params, x))
  print(f"trained MLP: last batch loss {loss:.3f}")
  print(f"clean accuracy:                          "
        f"{accuracy(logits_fn, x_test, y_test):.3f}")

  # 1. PGD on any per-example loss of the input: here the cross-entropy.
  loss_per_example = lambda xa: losses.cross_entropy(logits_fn(xa), y_test)
  attack = jax.jit(lambda x, key: pgd(
      loss_per_example, x, key, eps=EPS_LINF, step_size=EPS_LINF / 4,
      steps=10, norm="linf", restarts=3, bounds=(0.0, 1.0)))
  x_adv = attack(x_test, jax.random.key(1))
  print(f"PGD-10 (linf {EPS_LINF}, 3 restarts) accuracy: "
        f"{accuracy(logits_fn, x_adv, y_test):.3f}")

  # 2. Subspace-restricted PGD. U: [D, k] orthonormal columns, D = 28*28*1
  #    (perturbations are flattened per example), here the leading principal
  #    directions of the training images. No pixel box here: a restricted
  #    attack keeps the box by shrinking the whole perturbation (clipping
  #    would leave the subspace), and with background pixels at exactly 0 a
  #    dense direction of span(U) fits no box, so bounds=(0, 1) would leave
  #    these images unperturbed.
  flat = np.asarray(x_train[:2000]).reshape(2000, -1)
  _, _, vt = np.linalg.svd(flat - flat.mean(0), full_matrices=False)
  U = jnp.asarray(vt[:RANK].T)                                   # [784, 20]
  for restrict in ("in", "orth"):
    x_r = pgd(loss_per_example, x_test, jax.random.key(2), eps=EPS_L2,
              step_size=EPS_L2 / 4, steps=10, norm="l2", U=U,
              restrict=restrict)
    delta = (x_r - x_test).reshape(N_TEST, -1)
    outside = jnp.linalg.norm(delta - (delta @ U) @ U.T, axis=1)
    inside = jnp.linalg.norm(delta @ U, axis=1)
    print(f"PGD-10 l2 {EPS_L2} restrict={restrict!r:6} accuracy: "
          f"{accuracy(logits_fn, x_r, y_test):.3f}  (mean |delta| in span(U) "
          f"{float(inside.mean()):.2f}, off it {float(outside.mean()):.2f})")

  # 3. AutoAttack: a logits function, the points, a key; here two of the four
  #    standard attacks with 25 iterations (version="standard" runs all four
  #    with 100).
  out = autoattack(logits_fn, x_test, y_test, jax.random.key(3),
                   norm="linf", eps=EPS_LINF, attacks=("apgd-ce", "apgd-t"),
                   steps=25, batch_size=N_TEST)
  after = ", ".join(f"{k} {v:.3f}" for k, v in out["robust_acc_after"].items())
  print(f"AutoAttack (linf {EPS_LINF}) accuracy: {out['robust_acc']:.3f}  "
        f"(clean {out['clean_acc']:.3f}; after each attack: {after})")
  print(f"done in {time.time() - t0:.1f} s")


if __name__ == "__main__":
  main()
