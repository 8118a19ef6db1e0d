"""One description of an inner maximisation: ``AttackSpec``.

Every attack a method or an evaluator runs is an ``AttackSpec`` (norm, radius,
step, steps, start, restarts, which iterate to return, the optimiser and the
batch-norm mode of the attacked network) turned into a call by
``AttackSpec.run``; nothing else translates attack settings into ``pgd``
arguments. The spec knows no model: ``bn_mode`` is read by the method that
builds the objective (``tsjax.methods.common.attack_model``).

Optimisers (``optimizer``):

* ``"pgd"``: projected sign / normalised-gradient ascent (Madry et al.);
* ``"backtrack"``: CCAT's F7P optimiser (Stutz et al., reference
  ``attacks/batch_gradient_descent.py``): sign gradient with momentum
  ``momentum`` (``m <- mu m + (1 - mu) sign g``), per-example step that is
  divided by ``lr_factor`` whenever a step would not improve the objective
  (the step is then not taken), and the best iterate over all iterations
  kept; start drawn per batch from ``start="mixed"`` (Gaussian with std
  ``eps / (2 log D)``, uniform-by-norm in the l-inf ball, or zero).

Starts (``start``): ``"uniform"`` (uniform in the ball), ``"normal"``
(``x + start_std N(0, I)``, TRADES / RSLAD / PeerAiD / AdaAD), ``"zero"``,
``"mixed"`` (CCAT, ``"backtrack"`` only).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import chex
import jax
import jax.numpy as jnp

from tsjax import config_checks as cc
from tsjax.attacks import norms as N
from tsjax.attacks.pgd import best_of_restarts, pgd

BN_MODES = ("eval", "train")
STARTS = ("uniform", "normal", "zero", "mixed")
OPTIMIZERS = ("pgd", "backtrack")


@dataclasses.dataclass(frozen=True)
class AttackSpec:
  """An inner maximisation in input units (images: pixels in [0, 1]).

  ``bn_mode``: batch-norm mode of the attacked network, ``"eval"`` (running
  statistics, no update) or ``"train"`` (batch statistics; where the method
  attacks through ``tsjax.methods.common.attack_model``, as ARD, IAD and the
  cross-entropy attacks do, every attack step also updates the running
  statistics, as the ARD / IAD reference code does by attacking a network in
  train mode; objectives that read the network through ``logits_fn``, e.g.
  AdvFunMatch's inner KL, use batch statistics without updating them).
  ``keep_best``: return the iterate
  with the highest objective rather than the last one. ``restrict`` with a
  basis ``U`` at run time: perturb only inside span(U) (``"in"``) or its
  complement (``"orth"``).
  """
  norm: str = "linf"
  eps: float = 8 / 255
  step_size: float = 2 / 255
  steps: int = 10
  start: str = "uniform"
  start_std: float = 0.001
  restarts: int = 1
  keep_best: bool = False
  bn_mode: str = "eval"
  optimizer: str = "pgd"
  momentum: float = 0.9
  lr_factor: float = 1.5
  bounds: tuple | None = (0.0, 1.0)
  restrict: str | None = None

  def __post_init__(self):
    req = functools.partial(cc.require, self)
    for name, choices in (("norm", N.NORMS), ("start", STARTS),
                          ("bn_mode", BN_MODES), ("optimizer", OPTIMIZERS),
                          ("restrict", N.RESTRICTIONS)):
      req(name, getattr(self, name) in choices, f"one of {list(choices)}")
    req("eps", cc.number_in(self.eps, 0), "a number >= 0")
    req("step_size", cc.number_in(self.step_size, 0), "a number >= 0")
    req("start_std", cc.number_in(self.start_std, 0), "a number >= 0")
    req("steps", cc.number_in(self.steps, 0) and int(self.steps) == self.steps,
        "an integer >= 0")
    req("restarts", cc.is_positive_int(self.restarts), "an integer >= 1")
    req("momentum", cc.number_in(self.momentum, 0, 1), "in [0, 1]")
    req("lr_factor", cc.number_in(self.lr_factor, 1), "a number >= 1")
    req("keep_best", isinstance(self.keep_best, bool), "True or False")
    req("start", self.start != "mixed" or self.optimizer == "backtrack",
        "not 'mixed' unless optimizer is 'backtrack' (CCAT's start)")
    req("optimizer", self.optimizer != "backtrack" or self.norm == "linf",
        "'pgd' for norm 'l2' ('backtrack' is implemented for linf)")
    req("restarts", self.bn_mode == "eval" or int(self.restarts) == 1,
        "1 with bn_mode 'train' (the statistics follow one run)")
    req("optimizer", self.bn_mode == "eval" or self.optimizer == "pgd",
        "'pgd' with bn_mode 'train' ('backtrack' attacks in eval mode)")

  def replace(self, **changes) -> "AttackSpec":
    return dataclasses.replace(self, **changes)

  def run(self, loss_fn: Callable, x: jax.Array, key: jax.Array, *, U=None,
          state=None, return_loss: bool = False):
    """Maximises ``loss_fn`` in the ball around ``x``; ``x_adv`` carries no
    gradient.

    ``loss_fn(x_adv) -> [B]``, or with ``state`` (a pytree, e.g. batch-norm
    running statistics updated by every evaluation):
    ``loss_fn(x_adv, state) -> ([B], state)``, and the result is
    ``(x_adv, state)`` after every step's update.
    """
    if self.optimizer == "backtrack":
      if state is not None:
        raise ValueError("the 'backtrack' optimizer attacks in eval mode only")
      out = backtracking_pgd(loss_fn, x, key, self)
      x_adv, loss = out
    else:
      start_std = self.start_std if self.start == "normal" else None
      out = pgd(loss_fn, x, key, eps=self.eps, step_size=self.step_size,
                steps=int(self.steps), norm=self.norm,
                restarts=int(self.restarts),
                random_start=self.start != "zero", start_std=start_std,
                bounds=self.bounds, U=U, restrict=self.restrict,
                keep_best=self.keep_best, return_loss=True, state=state)
      if state is not None:
        (x_adv, loss), state = out
      else:
        x_adv, loss = out
    x_adv = jax.lax.stop_gradient(x_adv)
    res = (x_adv, jax.lax.stop_gradient(loss)) if return_loss else x_adv
    return (res, state) if state is not None else res


def _mixed_start(key, x, eps):
  """CCAT's ``RandomInitializations([Gaussian, LInfUniformNorm, Zero])``:
  one of the three, drawn once per batch."""
  k_choice, k_dir, k_len = jax.random.split(key, 3)
  b = x.shape[0]
  d = math.prod(x.shape[1:])
  gauss = (eps / (2 * math.log(d))) * jax.random.normal(k_dir, x.shape,
                                                        x.dtype)
  direction = jax.random.normal(k_dir, x.shape, x.dtype)
  direction = direction / jnp.max(jnp.abs(direction.reshape(b, -1)), -1
                                  ).reshape((b,) + (1,) * (x.ndim - 1))
  length = jax.random.uniform(k_len, (b,) + (1,) * (x.ndim - 1), x.dtype)
  uniform_norm = eps * length * direction
  choice = jax.random.randint(k_choice, (), 0, 3)
  return jnp.select([choice == 0, choice == 1],
                    [gauss, uniform_norm], jnp.zeros_like(x))


def _start(spec: AttackSpec, key, x):
  if spec.start == "mixed":
    return _mixed_start(key, x, spec.eps)
  if spec.start == "uniform":
    return N.random_in_ball(key, x, spec.eps, spec.norm)
  if spec.start == "normal":
    return spec.start_std * jax.random.normal(key, x.shape, x.dtype)
  return jnp.zeros_like(x)


def backtracking_pgd(loss_fn: Callable, x: jax.Array, key: jax.Array,
                     spec: AttackSpec):
  """CCAT's F7P optimiser (see the module docstring), maximising
  ``loss_fn``; restarts vmapped, the best per example kept. Returns
  ``(x_adv, loss at x_adv)``.

  Per iteration ``i = 0..steps`` (as the reference orders it): project,
  evaluate, record the best, and (``i < steps``) update the momentum with
  the sign of the gradient and try ``delta + lr * m``: taken if the
  objective does not get worse, else the example's ``lr`` is divided by
  ``lr_factor`` and ``delta`` stays.
  """
  N.check_inputs(x, eps=spec.eps, step_size=spec.step_size)
  cons = dict(bounds=spec.bounds)
  steps = int(spec.steps)

  def value_and_grad(delta):
    vals, vjp = jax.vjp(lambda d: loss_fn(x + d), delta)
    chex.assert_shape(vals, (x.shape[0],), custom_message=(
        "backtracking_pgd: loss_fn must return one loss per example, [B]"))
    return vals, vjp(jnp.ones_like(vals))[0]

  def one_run(k):
    delta = N.feasible(x, _start(spec, k, x), spec.eps, "linf", **cons)
    lr = jnp.full((x.shape[0],), spec.step_size, x.dtype)
    m = jnp.zeros_like(x)
    best_d, best_l = delta, jnp.full((x.shape[0],), -jnp.inf, x.dtype)

    def body(_, carry):
      delta, lr, m, best_d, best_l = carry
      loss, g = value_and_grad(delta)
      better = loss > best_l
      best_d = jnp.where(N._bcast(better, x), delta, best_d)
      best_l = jnp.where(better, loss, best_l)
      m = spec.momentum * m + (1.0 - spec.momentum) * jnp.sign(g)
      nxt = N.feasible(x, delta + N._bcast(lr, x) * m, spec.eps, "linf",
                       **cons)
      ok = loss_fn(x + nxt) >= loss
      delta = jnp.where(N._bcast(ok, x), nxt, delta)
      lr = jnp.where(ok, lr, jnp.maximum(lr / spec.lr_factor, 1e-20))
      return delta, lr, m, best_d, best_l

    delta, lr, m, best_d, best_l = jax.lax.fori_loop(
        0, steps, body, (delta, lr, m, best_d, best_l))
    last = loss_fn(x + delta)
    better = last > best_l
    return (jnp.where(N._bcast(better, x), delta, best_d),
            jnp.where(better, last, best_l))

  if int(spec.restarts) == 1:
    delta, loss = one_run(key)
  else:
    delta, loss = best_of_restarts(
        *jax.vmap(one_run)(jax.random.split(key, int(spec.restarts))))
  return x + delta, loss
