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
  (the train steps and evaluators in tsjax do).

``eps`` and ``step_size`` may be scalars or per-example [B] arrays.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from tsjax.attacks import norms as N

LossFn = Callable[[jax.Array], jax.Array]


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
        return_loss: bool = False, start_std: float | None = None):
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
    keep_best: return the best iterate (incl. the start and the last) rather
      than the last one.
    return_loss: also return the per-example loss at the returned point.
  Returns:
    ``x_adv`` [B, ...] (and its loss [B] if ``return_loss``).
  """
  _check(norm, restrict, U, steps, restarts)
  cons = dict(U=U, restrict=restrict, bounds=bounds)

  def value_and_grad(delta):
    vals, vjp = jax.vjp(lambda d: loss_fn(x + d), delta)
    return vals, vjp(jnp.ones_like(vals))[0]

  def one_run(k):
    if random_start and start_std is not None:
      delta = start_std * jax.random.normal(k, x.shape, x.dtype)
    elif random_start:
      delta = N.random_in_ball(k, x, eps, norm, U=U, restrict=restrict)
    else:
      delta = jnp.zeros_like(x)
    delta = N.feasible(x, delta, eps, norm, **cons)
    step = N.batch_eps(step_size, x)

    def body(_, carry):
      delta, best_delta, best_loss = carry
      loss, g = value_and_grad(delta)
      better = loss > best_loss
      best_delta = jnp.where(N._bcast(better, x), delta, best_delta)
      best_loss = jnp.where(better, loss, best_loss)
      g = N.restrict_subspace(g, U, restrict)
      delta = delta + step * N.ascent_direction(g, norm)
      return N.feasible(x, delta, eps, norm, **cons), best_delta, best_loss

    init_best = jnp.full((x.shape[0],), -jnp.inf, x.dtype)
    delta, best_delta, best_loss = jax.lax.fori_loop(
        0, int(steps), body, (delta, delta, init_best))
    last_loss = loss_fn(x + delta)
    if keep_best:
      better = last_loss > best_loss
      best_delta = jnp.where(N._bcast(better, x), delta, best_delta)
      best_loss = jnp.where(better, last_loss, best_loss)
      return best_delta, best_loss
    return delta, last_loss

  if restarts == 1:
    delta, loss = one_run(key)
  else:
    deltas, losses = jax.vmap(one_run)(jax.random.split(key, restarts))
    win = jnp.argmax(losses, axis=0)                       # [B]
    delta = jnp.take_along_axis(
        deltas, win.reshape((1, -1) + (1,) * (x.ndim - 1)), axis=0)[0]
    loss = jnp.take_along_axis(losses, win[None], axis=0)[0]
  x_adv = x + delta
  return (x_adv, loss) if return_loss else x_adv


def fgsm(loss_fn: LossFn, x: jax.Array, *, eps, norm: str = "linf",
         bounds=None, U=None, restrict=None, return_loss: bool = False):
  """One full-size ascent step from ``x`` (Goodfellow et al.; l2: FGM)."""
  return pgd(loss_fn, x, jax.random.key(0), eps=eps, step_size=eps, steps=1,
             norm=norm, random_start=False, bounds=bounds, U=U,
             restrict=restrict, keep_best=False, return_loss=return_loss)
