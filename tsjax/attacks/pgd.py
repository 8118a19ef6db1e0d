"""FGSM and PGD on any per-example loss of the input.

An attack knows no model: it maximises ``loss_fn(x_adv) -> [B]`` inside a norm
ball around ``x``. The same function serves PGD-AT (cross-entropy or the
teacher–student squared error), TRADES / RSLAD (KL to fixed clean
probabilities), AdvFunMatch (KL between two networks both recomputed at
``x_adv``) and CW (margin).

* norms: ``"linf"`` (sign steps) and ``"l2"`` (normalised-gradient steps);
* ``random_start``: uniform start in the ball (or Gaussian with
  ``start_std``);
* ``restarts``: independent runs, ``vmap``-ed, the best per example kept;
* ``bounds``: optional box, e.g. ``(0.0, 1.0)`` for images;
* ``U`` and ``restrict`` (``"in"`` / ``"orth"``): perturb only inside span(U)
  or only in its orthogonal complement;
* the step loop is a single ``lax.fori_loop``; call the attack inside ``jit``
  (the train steps and evaluators in tsjax do). On the CPU backend a loop
  whose loss contains a convolution is unrolled (``unroll=None``, the
  default; see ``pgd``): XLA:CPU compiles the input gradient of a
  convolution inside a while-loop body to a naive loop nest instead of its
  library convolution: PGD 1.5-3x slower for the small CNN and ResNet-18
  (``benchmarks/adv_train_step_profile.py``, ``benchmarks/distill_step.py``).

``eps`` and ``step_size`` may be scalars or per-example [B] arrays.
"""

from __future__ import annotations

from typing import Callable

import chex
import jax
import jax.numpy as jnp

from tsjax.attacks import norms as N

LossFn = Callable[[jax.Array], jax.Array]

# Longest PGD loop unrolled automatically (CPU backend, convolutional loss).
CPU_UNROLL_MAX_STEPS = 64


def _has_primitive(jaxpr, name: str) -> bool:
  """Whether ``jaxpr`` (or a sub-jaxpr: pjit, custom_vjp, scan, ...) uses
  the primitive ``name``."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == name:
      return True
    for v in eqn.params.values():
      for sub in (v if isinstance(v, (tuple, list)) else (v,)):
        sub = getattr(sub, "jaxpr", sub)          # ClosedJaxpr -> Jaxpr
        if hasattr(sub, "eqns") and _has_primitive(sub, name):
          return True
  return False


def auto_unroll(loss_fn: LossFn, x: jax.Array, steps: int) -> bool:
  """``pgd``'s default: unroll the step loop on the CPU backend when the loss
  contains a convolution (and ``1 < steps <= CPU_UNROLL_MAX_STEPS``).

  XLA:CPU leaves the input gradient of a convolution inside a while-loop body
  with JAX's transposed kernel labels and emits a naive loop-nest
  convolution for it, not the library one it uses for the same code outside
  a loop (cf. jax-ml/jax#12868): measured 1.5-3x slower PGD for the small
  CNN and ResNet-18 on a 2-core CPU, while unrolled 10- to 20-step loops
  compile about as fast (50 steps: 3 s more for the small CNN). Other backends and convolution-free losses (the
  MLPs of the teacher-student studies) keep the loop. Costs one extra trace
  of the loss (no compilation)."""
  if jax.default_backend() != "cpu" or not 1 < int(steps) <= CPU_UNROLL_MAX_STEPS:
    return False
  return _has_primitive(jax.make_jaxpr(loss_fn)(x).jaxpr,
                        "conv_general_dilated")


def _check(norm, restrict, U, steps, restarts):
  if norm not in N.NORMS:
    raise ValueError(f"unknown norm {norm!r}; expected one of {N.NORMS}")
  if restrict not in N.RESTRICTIONS:
    raise ValueError(f"unknown restrict {restrict!r}; expected one of "
                     f"{N.RESTRICTIONS}")
  if restrict is not None and U is None:
    raise ValueError(f"restrict={restrict!r} needs the subspace basis U")
  if int(steps) < 0:
    raise ValueError(f"steps must be >= 0, got {steps}")
  if int(restarts) < 1:
    raise ValueError(f"restarts must be >= 1, got {restarts}")


def pgd(loss_fn: LossFn, x: jax.Array, key: jax.Array, *, eps, step_size,
        steps: int, norm: str = "linf", restarts: int = 1,
        random_start: bool = True, bounds=None, U: jax.Array | None = None,
        restrict: str | None = None, keep_best: bool = True,
        return_loss: bool = False, start_std: float | None = None,
        unroll: bool | None = None, state=None):
  """Projected gradient ascent of ``loss_fn`` in the eps-ball around ``x``.

  Args:
    loss_fn: ``x_adv [B, ...] -> [B]`` per-example loss to maximise. Examples
      must not interact (no batch-norm batch statistics inside).
    x: clean inputs [B, ...].
    key: PRNG key (random starts).
    eps, step_size: radius and step length (scalars or [B]).
    steps: number of ascent steps.
    norm: ``"linf"`` or ``"l2"``.
    restarts: independent runs (vmapped); per example the run with the
      highest loss wins.
    random_start: start uniformly in the ball (else at ``x``).
    start_std: with ``random_start``, start at ``x + start_std * N(0, I)``
      instead (TRADES / RSLAD / PeerAiD use 0.001), then project.
    bounds: optional ``(low, high)`` box for ``x_adv``.
    U, restrict: optional subspace restriction (see ``tsjax.attacks.norms``).
      With ``bounds`` too, the perturbation is kept in both by shrinking it
      radially toward ``x`` (``norms.fit_box``), so the restricted component
      stays exactly zero; where ``x`` sits on the box (saturated pixels, e.g.
      Fashion-MNIST's black background) the shrink factor can be 0 and the
      attack does not move. For subspace attacks on such images pass
      ``bounds=None`` (the models take any float input).
    keep_best: return the best iterate (incl. the start and the last) rather
      than the last one.
    return_loss: also return the per-example loss at the returned point.
    unroll: unroll the step loop (the same computation in different
      compiled code, so float rounding may differ); ``None``: ``auto_unroll``
      (on the CPU backend when the loss contains a convolution).
    state: optional pytree threaded through the objective,
      ``loss_fn(x_adv, state) -> ([B], state)`` (a network attacked in
      train mode updates its batch-norm running statistics at every step);
      one restart only. The loss at the returned point is evaluated with the
      state left as the last step made it.
  Returns:
    ``x_adv`` [B, ...] (and its loss [B] if ``return_loss``); with
    ``state``: ``(that, state)``.
  """
  _check(norm, restrict, U, steps, restarts)
  N.check_inputs(x, U, eps, step_size)
  stateful = state is not None
  if stateful and restarts != 1:
    raise ValueError("a stateful objective takes one restart")
  objective = loss_fn if stateful else (lambda xa, st: (loss_fn(xa), st))
  cons = dict(U=U, restrict=restrict, bounds=bounds)
  if unroll is None:
    unroll = auto_unroll(lambda xa: objective(xa, state)[0], x, steps)
  loop_kw = {"unroll": True} if unroll else {}

  def value_and_grad(delta, st):
    vals, vjp, st = jax.vjp(lambda d: objective(x + d, st), delta,
                            has_aux=True)
    chex.assert_shape(vals, (x.shape[0],), custom_message=(
        "pgd: loss_fn must return one loss per example, shape [B]"))
    return vals, vjp(jnp.ones_like(vals))[0], st

  def one_run(k, st):
    if random_start and start_std is not None:
      delta = start_std * jax.random.normal(k, x.shape, x.dtype)
    elif random_start:
      delta = N.random_in_ball(k, x, eps, norm, U=U, restrict=restrict)
    else:
      delta = jnp.zeros_like(x)
    delta = N.feasible(x, delta, eps, norm, **cons)
    step = N.batch_eps(step_size, x)

    def body(_, carry):
      delta, best_delta, best_loss, st = carry
      loss, g, st = value_and_grad(delta, st)
      better = loss > best_loss
      best_delta = jnp.where(N._bcast(better, x), delta, best_delta)
      best_loss = jnp.where(better, loss, best_loss)
      g = N.restrict_subspace(g, U, restrict)
      delta = delta + step * N.ascent_direction(g, norm)
      # l2: delta and the step both lie in the subspace already (up to
      # rounding), so the restriction is not applied again.
      delta = N.feasible(x, delta, eps, norm, **cons,
                         restricted=N.step_keeps_subspace(norm))
      return delta, best_delta, best_loss, st

    init_best = jnp.full((x.shape[0],), -jnp.inf, x.dtype)
    delta, best_delta, best_loss, st = jax.lax.fori_loop(
        0, int(steps), body, (delta, delta, init_best, st), **loop_kw)
    last_loss = objective(x + delta, st)[0]     # no further state update
    if keep_best:
      better = last_loss > best_loss
      best_delta = jnp.where(N._bcast(better, x), delta, best_delta)
      best_loss = jnp.where(better, last_loss, best_loss)
      return best_delta, best_loss, st
    return delta, last_loss, st

  if restarts == 1:
    delta, loss, state = one_run(key, state if stateful else ())
  else:
    deltas, losses, _ = jax.vmap(lambda k: one_run(k, ()))(
        jax.random.split(key, restarts))
    delta, loss = best_of_restarts(deltas, losses)
  x_adv = x + delta
  out = (x_adv, loss) if return_loss else x_adv
  return (out, state) if stateful else out


def best_of_restarts(deltas: jax.Array, losses: jax.Array):
  """Per example, the restart with the highest loss: ``deltas [R, B, ...]``,
  ``losses [R, B]`` -> ``(delta [B, ...], loss [B])``."""
  win = jnp.argmax(losses, axis=0)                         # [B]
  delta = jnp.take_along_axis(
      deltas, win.reshape((1, -1) + (1,) * (deltas.ndim - 2)), axis=0)[0]
  return delta, jnp.take_along_axis(losses, win[None], axis=0)[0]


def fgsm(loss_fn: LossFn, x: jax.Array, *, eps, norm: str = "linf",
         bounds=None, U=None, restrict=None, return_loss: bool = False):
  """One full-size ascent step from ``x`` (Goodfellow et al.; l2: FGM)."""
  return pgd(loss_fn, x, jax.random.key(0), eps=eps, step_size=eps, steps=1,
             norm=norm, random_start=False, bounds=bounds, U=U,
             restrict=restrict, keep_best=False, return_loss=return_loss)
