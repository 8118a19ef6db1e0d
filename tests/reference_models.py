"""A small classifier trained on real Fashion-MNIST, in Flax and (with the
same weights) in PyTorch, for cross-checking attacks against reference
implementations (torchattacks). Test helper, not part of tsjax.

The model is an MLP 784-128-64-10 trained for a few hundred SGD steps (seconds
on a CPU); results are cached per process.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tsjax import losses
from tsjax.data import images


class RefMLP(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(128, name="fc1")(x))
    x = nn.relu(nn.Dense(64, name="fc2")(x))
    return nn.Dense(10, name="fc3")(x)


@functools.lru_cache(maxsize=None)
def fmnist_reference(n_train: int = 10000, n_test: int = 500, steps: int = 600,
                     seed: int = 0):
  """Returns ``(model, params, x_test float32 [N,28,28,1] in [0,1], y_test)``."""
  train = images.load_dataset("fashion_mnist", "train")
  test = images.load_dataset("fashion_mnist", "test")
  x = train.images[:n_train].astype(np.float32) / 255.0
  y = train.labels[:n_train]
  model = RefMLP()
  params = model.init(jax.random.key(seed), jnp.zeros((1, 28, 28, 1),
                                                      jnp.float32))["params"]
  opt = optax.sgd(0.1, momentum=0.9)
  opt_state = opt.init(params)

  @jax.jit
  def step(params, opt_state, xb, yb):
    g = jax.grad(lambda p: jnp.mean(losses.cross_entropy(
        model.apply({"params": p}, xb), yb)))(params)
    upd, opt_state = opt.update(g, opt_state, params)
    return optax.apply_updates(params, upd), opt_state

  rng = np.random.default_rng(seed)
  for _ in range(steps):
    idx = rng.integers(0, n_train, 128)
    params, opt_state = step(params, opt_state, x[idx], y[idx])
  xt = test.images[:n_test].astype(np.float32) / 255.0
  return model, params, xt, test.labels[:n_test]


def flax_logits_fn(model, params):
  return lambda x: model.apply({"params": params}, x)


def torch_model(params):
  """The same MLP in PyTorch (NCHW input in [0, 1]) with the Flax weights."""
  import torch
  net = torch.nn.Sequential(
      torch.nn.Flatten(), torch.nn.Linear(784, 128), torch.nn.ReLU(),
      torch.nn.Linear(128, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
  with torch.no_grad():
    for layer, name in ((net[1], "fc1"), (net[3], "fc2"), (net[5], "fc3")):
      layer.weight.copy_(torch.from_numpy(np.array(params[name]["kernel"]).T.copy()))
      layer.bias.copy_(torch.from_numpy(np.array(params[name]["bias"])))
  return net.eval()


def to_torch_images(x):
  """NHWC numpy -> NCHW float32 torch tensor."""
  import torch
  return torch.from_numpy(np.ascontiguousarray(np.transpose(
      np.asarray(x, np.float32), (0, 3, 1, 2))))
