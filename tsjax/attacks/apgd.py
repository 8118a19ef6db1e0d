"""APGD and APGD-T (Croce & Hein, ICML 2020), the gradient attacks of AutoAttack.

A JAX port of the reference semantics (fra31/auto-attack, as ported by
torchattacks 3.5.1 ``APGD`` / ``APGDT``):

* start ``x0 = x + eps * t / ||t||`` (linf: ``t ~ U[-1, 1]`` and the max-norm;
  l2: ``t ~ N(0, I)`` and the 2-norm), clipped to the box;
* per-example step size, initially ``2 * eps``; linf steps ``sign(grad)``, l2
  steps ``grad / ||grad||``, each projected onto the eps-ball and the box;
  momentum ``x_{k+1} = x_k + 0.75 (z_{k+1} - x_k) + 0.25 (x_k - x_{k-1})``
  (weight 1 on ``z`` at the first step), projected again;
* checkpoints (:func:`apgd_checkpoints`, the reference's integer schedule);
  at a checkpoint the step of an example is halved when the loss increased in
  at most ``rho * k`` of the last ``k`` steps (condition 1) or when its step
  was not halved at the previous checkpoint and its best loss has not
  improved since then (condition 2); a halved example restarts from its best
  point ``x_best`` and that point's gradient;
* per run an example counts as broken if the random start or any iterate is
  misclassified; its returned input is the last misclassified iterate (the
  reference's ``x_best_adv``). Points that stay robust (or are misclassified
  already at ``x``) are returned unchanged (``x``), as the reference does.
* restarts / target classes run in sequence (one ``lax.fori_loop``); each run
  attacks only the points still robust, so per example the first success is
  kept. Runs compute on the whole (static-shape) batch and mask the result; a
  run is skipped entirely (``lax.cond``) once no point is robust.

Everything is per example and traceable: call the attacks inside ``jax.jit``
(the AutoAttack ensemble does). ``logits_fn`` must treat examples
independently.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from tsjax import losses
from tsjax.attacks import norms as N

LogitsFn = Callable[[jax.Array], jax.Array]
APGD_LOSSES = ("ce", "dlr", "dlr_targeted")
_TINY = 1e-12


def apgd_checkpoints(n_iter: int) -> list[int]:
  """Iteration counts (1-based) after which the step-size rule is checked.

  The reference's integer schedule: first window ``max(int(0.22 n), 1)``,
  each next window shorter by ``max(int(0.03 n), 1)`` down to
  ``max(int(0.06 n), 1)``. ``[22, 41, 57, 70, 80, 87, 93, 99]`` for ``n=100``.
  """
  n_iter = int(n_iter)
  if n_iter < 1:
    return []
  k = max(int(0.22 * n_iter), 1)
  k_min = max(int(0.06 * n_iter), 1)
  decr = max(int(0.03 * n_iter), 1)
  out, c = [], 0
  while c + k <= n_iter:
    c += k
    out.append(c)
    k = max(k - decr, k_min)
  return out


def _check(norm, eps, steps, restarts, rho, loss):
  if norm not in N.NORMS:
    raise ValueError(f"unknown norm {norm!r}; expected one of {N.NORMS}")
  if loss not in APGD_LOSSES:
    raise ValueError(f"unknown APGD loss {loss!r}; expected one of "
                     f"{APGD_LOSSES}")
  if int(steps) < 1:
    raise ValueError(f"steps must be >= 1, got {steps}")
  if int(restarts) < 1:
    raise ValueError(f"restarts must be >= 1, got {restarts}")
  if not 0.0 <= float(rho) <= 1.0:
    raise ValueError(f"rho must be in [0, 1], got {rho}")
  if not isinstance(eps, jax.core.Tracer) and np.any(np.asarray(eps) < 0):
    raise ValueError(f"eps must be >= 0, got {eps}")


def _bc(v, like):
  return v.reshape((-1,) + (1,) * (like.ndim - 1))


def _l2(v):
  f = v.reshape(v.shape[0], -1)
  return jnp.sqrt(jnp.sum(f * f, axis=1))


def _box(v, bounds):
  if bounds is None:
    return v
  return jnp.clip(v, bounds[0], bounds[1])


def _per_example_loss(name, logits, y, targets):
  if name == "ce":
    return losses.cross_entropy(logits, y)
  if name == "dlr":
    return losses.dlr(logits, y)
  return losses.dlr_targeted(logits, y, targets)


def _value_and_grad(logits_fn, name, y, targets):
  """x -> (per-example loss [B], logits [B, C], d sum(loss) / dx)."""
  def total(xa):
    logits = logits_fn(xa)
    lv = _per_example_loss(name, logits, y, targets)
    return jnp.sum(lv), (lv, logits)

  def vg(xa):
    (_, (lv, logits)), g = jax.value_and_grad(total, has_aux=True)(xa)
    return lv, logits, g
  return vg


def random_start(key, x, eps, norm, bounds=(0.0, 1.0)):
  """The reference's starting point: ``x + eps * t / ||t||`` in the box."""
  eps_b = N.batch_eps(eps, x)
  if norm == "linf":
    t = jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0)
    n = jnp.max(jnp.abs(t.reshape(x.shape[0], -1)), axis=1)
  else:
    t = jax.random.normal(key, x.shape, x.dtype)
    n = _l2(t) + _TINY
  return _box(x + eps_b * t / _bc(n, x), bounds)


def _single_run(logits_fn, x, y, x0, *, eps, norm, steps, loss, targets, rho,
                bounds):
  """One APGD run from ``x0`` (attack_single_run of the reference).

  Returns ``(x_best, acc, loss_best, x_best_adv, step_size)``: the best-loss
  point, whether every iterate (start included) was correctly classified,
  the best loss, the last misclassified iterate (else the start) and the
  final per-example step size.
  """
  steps = int(steps)
  eps_b = N.batch_eps(eps, x)
  vg = _value_and_grad(logits_fn, loss, y, targets)

  def project(v):
    if norm == "linf":
      return _box(jnp.clip(v, x - eps_b, x + eps_b), bounds)
    d = v - x
    n = _l2(d)
    return _box(x + d / _bc(n + _TINY, x) * jnp.minimum(eps_b, _bc(n, x)),
                bounds)

  def project_momentum(v):
    if norm == "linf":
      return project(v)
    # The reference adds 1e-12 to the norm inside the min on this projection.
    d = v - x
    n = _l2(d)
    return _box(x + d / _bc(n + _TINY, x)
                * jnp.minimum(eps_b, _bc(n + _TINY, x)), bounds)

  loss0, logits0, g0 = vg(x0)
  acc0 = jnp.argmax(logits0, axis=-1) == y
  step0 = 2.0 * eps_b.reshape(-1)

  ckpts = apgd_checkpoints(steps)
  is_check = np.zeros(steps, bool)
  window = np.zeros(steps, np.int32)
  prev = 0
  for c in ckpts:
    is_check[c - 1] = True
    window[c - 1] = c - prev
    prev = c
  is_check = jnp.asarray(is_check)
  window = jnp.asarray(window)
  rows = jnp.arange(steps)

  def body(i, s):
    x_adv, x_old, grad = s["x_adv"], s["x_old"], s["grad"]
    step = _bc(s["step"], x)
    mom = x_adv - x_old
    a = jnp.where(i > 0, 0.75, 1.0).astype(x.dtype)
    if norm == "linf":
      z = project(x_adv + step * jnp.sign(grad))
    else:
      z = project(x_adv + step * grad / _bc(_l2(grad) + _TINY, x))
    x_new = project_momentum(x_adv + (z - x_adv) * a + mom * (1 - a))

    lv, logits, g = vg(x_new)
    pred = jnp.argmax(logits, axis=-1) == y
    acc = s["acc"] & pred
    x_best_adv = jnp.where(_bc(~pred, x), x_new, s["x_best_adv"])
    loss_steps = s["loss_steps"].at[i].set(lv)
    imp = lv > s["loss_best"]
    x_best = jnp.where(_bc(imp, x), x_new, s["x_best"])
    grad_best = jnp.where(_bc(imp, x), g, s["grad_best"])
    loss_best = jnp.where(imp, lv, s["loss_best"])

    # Step-size rule at a checkpoint. Condition 1 (check_oscillation): count
    # the increases loss[r] > loss[r - 1] over the last k steps; like the
    # reference, loss[-1] wraps to the last row of the (zero-initialised)
    # loss history.
    check = is_check[i]
    k = window[i]
    inc = loss_steps > jnp.roll(loss_steps, 1, axis=0)
    in_win = (rows <= i) & (rows > i - k)
    count = jnp.sum(inc & in_win[:, None], axis=0)
    osc = count <= k * rho
    no_impr = (~s["reduced_last"]) & (s["loss_best_last"] >= loss_best)
    reduce_now = osc | no_impr
    red = check & reduce_now
    reduced_last = jnp.where(check, reduce_now, s["reduced_last"])
    loss_best_last = jnp.where(check, loss_best, s["loss_best_last"])
    new_step = jnp.where(red, s["step"] / 2.0, s["step"])
    x_next = jnp.where(_bc(red, x), x_best, x_new)
    g_next = jnp.where(_bc(red, x), grad_best, g)
    return dict(x_adv=x_next, x_old=x_adv, grad=g_next, step=new_step,
                acc=acc, x_best_adv=x_best_adv, loss_steps=loss_steps,
                x_best=x_best, grad_best=grad_best, loss_best=loss_best,
                reduced_last=reduced_last, loss_best_last=loss_best_last)

  init = dict(x_adv=x0, x_old=x0, grad=g0, step=step0.astype(x.dtype),
              acc=acc0, x_best_adv=x0,
              loss_steps=jnp.zeros((steps,) + loss0.shape, loss0.dtype),
              x_best=x0, grad_best=g0, loss_best=loss0,
              reduced_last=jnp.ones(loss0.shape, bool),
              loss_best_last=loss0)
  s = jax.lax.fori_loop(0, steps, body, init)
  return s["x_best"], s["acc"], s["loss_best"], s["x_best_adv"], s["step"]


def _attack(logits_fn, x, y, key, *, norm, eps, steps, n_runs, loss,
            targets_of_run, rho, bounds):
  """Runs ``n_runs`` APGD runs in sequence, each on the still-robust points."""
  x = jnp.asarray(x)
  y = jnp.asarray(y)
  clean_logits = logits_fn(x)
  robust0 = jnp.argmax(clean_logits, axis=-1) == y
  keys = jax.random.split(key, n_runs)
  eps_b = N.batch_eps(eps, x)
  # The loss dtype (logits may be of another dtype than x).
  loss_dtype = jax.eval_shape(
      lambda lg: _per_example_loss(loss, lg, y, y), clean_logits).dtype
  init = dict(x_adv=x, robust=robust0,
              loss=jnp.full(y.shape, -jnp.inf, loss_dtype),
              step=(2.0 * eps_b.reshape(-1)).astype(x.dtype))

  def one_run(j, carry):
    def attack(c):
      targets = targets_of_run(j, clean_logits)
      x0 = random_start(keys[j], x, eps, norm, bounds)
      _, acc, loss_best, x_best_adv, step = _single_run(
          logits_fn, x, y, x0, eps=eps, norm=norm, steps=steps, loss=loss,
          targets=targets, rho=rho, bounds=bounds)
      active = c["robust"]
      fooled = active & ~acc
      return dict(
          x_adv=jnp.where(_bc(fooled, x), x_best_adv, c["x_adv"]),
          robust=active & acc,
          loss=jnp.where(active, jnp.maximum(c["loss"], loss_best), c["loss"]),
          step=jnp.where(active, step, c["step"]))
    return jax.lax.cond(jnp.any(carry["robust"]), attack, lambda c: c, carry)

  out = jax.lax.fori_loop(0, n_runs, one_run, init)
  info = {"robust": out["robust"], "loss": out["loss"],
          "step_size": out["step"]}
  return out["x_adv"], info


def apgd(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, key: jax.Array, *,
         norm: str = "linf", eps, steps: int = 100, restarts: int = 1,
         loss: str = "ce", targets: jax.Array | None = None,
         rho: float = 0.75, bounds=(0.0, 1.0)):
  """APGD (untargeted losses "ce" / "dlr", or "dlr_targeted" with ``targets``).

  Args:
    logits_fn: ``x [B, ...] -> logits [B, C]``; examples independent.
    x: clean inputs in the box; y: int labels [B]; key: PRNG key.
    norm: "linf" or "l2"; eps: radius (scalar or [B]).
    steps: iterations per run; restarts: runs, each on the points still
      robust (the first success per example is kept).
    loss: "ce", "dlr" or "dlr_targeted" (needs ``targets`` [B]).
    rho: threshold of the step-size rule (condition 1).
    bounds: the input box ``(low, high)`` (None: no box).
  Returns:
    ``(x_adv, info)``: ``x_adv`` [B, ...] is a misclassified point of the
    eps-ball for every broken example and ``x`` otherwise; ``info`` has
    ``robust`` [B] bool (correctly classified at ``x`` and at every point the
    attack visited), ``loss`` [B] (highest loss reached in the runs that
    attacked the example; -inf if never attacked, i.e. misclassified at
    ``x``) and ``step_size`` [B] (final step size of its last run; 2 eps if
    never attacked).
  """
  _check(norm, eps, steps, restarts, rho, loss)
  N.check_inputs(x, eps=eps)
  if loss == "dlr_targeted":
    if targets is None:
      raise ValueError("loss='dlr_targeted' needs targets [B]")
    targets = jnp.asarray(targets)
  if loss in ("dlr", "dlr_targeted"):
    n_min = 3 if loss == "dlr" else 4
    c = jax.eval_shape(logits_fn, jax.ShapeDtypeStruct(
        jnp.shape(x), jnp.result_type(x))).shape[-1]
    if c < n_min:
      raise ValueError(f"loss={loss!r} needs at least {n_min} classes, the "
                       f"model has {c}")
  return _attack(logits_fn, x, y, key, norm=norm, eps=eps, steps=steps,
                 n_runs=int(restarts), loss=loss,
                 targets_of_run=lambda j, clean_logits: targets, rho=rho,
                 bounds=bounds)


def apgd_targeted(logits_fn: LogitsFn, x: jax.Array, y: jax.Array,
                  key: jax.Array, *, norm: str = "linf", eps, steps: int = 100,
                  n_target_classes: int = 9, restarts: int = 1,
                  rho: float = 0.75, bounds=(0.0, 1.0)):
  """APGD-T: targeted DLR towards the classes ranked 2nd, 3rd, ...,
  (n_target_classes + 1)-th by the clean logits, one run per target class
  (``restarts`` runs each), each on the points still robust. Returns
  ``(x_adv, info)`` as :func:`apgd`.
  """
  _check(norm, eps, steps, restarts, rho, "dlr_targeted")
  c = jax.eval_shape(logits_fn, jax.ShapeDtypeStruct(
      jnp.shape(x), jnp.result_type(x))).shape[-1]
  n_target_classes = int(n_target_classes)
  if c < 4:
    raise ValueError(f"APGD-T (targeted DLR) needs at least 4 classes, the "
                     f"model has {c}")
  if not 1 <= n_target_classes <= c - 1:
    raise ValueError(f"n_target_classes must be in [1, {c - 1}] for {c} "
                     f"classes, got {n_target_classes}")
  restarts = int(restarts)

  def targets_of_run(j, clean_logits):
    rank = 2 + j // restarts          # 2nd largest clean logit first
    order = jnp.argsort(clean_logits, axis=-1)    # ascending
    return jnp.take(order, c - rank, axis=-1)

  return _attack(logits_fn, x, y, key, norm=norm, eps=eps, steps=steps,
                 n_runs=n_target_classes * restarts, loss="dlr_targeted",
                 targets_of_run=targets_of_run, rho=rho, bounds=bounds)
