"""AutoAttack (Croce & Hein 2020) in JAX: the ensemble, its versions and its
sanity checks, with resumable progress on disk.

``autoattack(logits_fn, x, y, key, norm=..., eps=..., version="standard")``
runs the attacks in sequence, each only on the points still robust (every
point's worst case is kept), in fixed-size batches (the last one padded, so
each attack compiles once), and returns the adversarial inputs, the robust
accuracy after each attack and the final robust accuracy.

Versions, as the reference defines them:

* ``"standard"``: APGD-CE (1 restart) -> APGD-T (9 targets) -> FAB-T
  (9 targets) -> Square (5000 queries); 100 iterations each. Square runs as
  the reference ensemble builds it (``SquareAttack(..., n_queries=5000,
  resc_schedule=False)``): its p schedule halves after iterations 10, 50,
  ..., 4000 as written, not stretched to the query budget.
* ``"plus"``: APGD-CE (5 restarts) -> APGD-DLR (5) -> FAB (5) -> Square
  (5000) -> APGD-T (9 targets) -> FAB-T (9 targets, 1 restart: the
  reference sets ``self.fab.n_restarts = 1`` before FAB-T in every version,
  fra31/auto-attack autoattack/autoattack.py:211-216).
* ``"rand"``: APGD-CE and APGD-DLR with expectation over transformation
  (20 draws) for randomised models: ``logits_fn(x, key)`` then (with
  ``params``: ``logits_fn(params, x, key)``; ``ModelLogits`` accepts and
  ignores the key, its forward pass being deterministic); here EOT averages
  the *log-probabilities* of 20 fixed draws per call (the reference averages
  gradients of 20 fresh draws), see ``eot_logits_fn``.
* a custom list of attack names from ``ATTACKS``.

Compiled attacks are reused across calls when the model is passed as a
hashable function of its parameters, ``autoattack(model_fn, x, y, key,
params=variables, ...)`` with ``model_fn(params, x) -> logits`` (e.g.
``tsjax.methods.common.ModelLogits(model)``): evaluating another checkpoint
of the same architecture with the same settings then compiles nothing (the
attacks take the parameters as arguments instead of baking them in as
constants). A plain ``logits_fn(x)`` closure works too and compiles on every
call.

Sanity checks like the reference's (``AutoAttackWarning``): randomness in the
forward pass, outputs that look like probabilities, too few classes for the
targeted attacks, zero input gradients, and a black-box attack (Square)
breaking points the white-box attacks could not (gradient masking).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import os
import warnings
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tsjax import losses
from tsjax.attacks.apgd import apgd, apgd_targeted
from tsjax.attacks.fab import fab
from tsjax.attacks.square import square

ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
VERSIONS = {
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "plus": ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"),
    "rand": ("apgd-ce", "apgd-dlr"),
}


class AutoAttackWarning(UserWarning):
  """A sanity check of the evaluation failed (the robust accuracy may be
  overestimated)."""


def _settings(version: str, n_classes: int) -> dict:
  """The reference's per-version settings (``AutoAttack.__init__`` and
  ``set_version``). Square: 5000 queries, p schedule not rescaled
  (``resc_schedule=False``) in every version; FAB-T one restart in every
  version (autoattack.py:211-216 forces ``fab.n_restarts = 1``)."""
  n_targets = min(9, n_classes - 1)
  sq = dict(square_queries=5000, square_resc_schedule=False, fabt_restarts=1)
  if version == "plus":
    return dict(apgd_restarts=5, fab_restarts=5, apgdt_restarts=1,
                n_targets=n_targets, eot_iter=1, **sq)
  if version == "rand":
    return dict(apgd_restarts=1, fab_restarts=1, apgdt_restarts=1,
                n_targets=n_targets, eot_iter=20, **sq)
  return dict(apgd_restarts=1, fab_restarts=1, apgdt_restarts=1,
              n_targets=n_targets, eot_iter=1, **sq)


def eot_logits_fn(logits_fn_with_key: Callable, key, draws: int) -> Callable:
  """Deterministic EOT wrapper for a randomised model: mean log-softmax over
  ``draws`` fixed random draws."""
  keys = jax.random.split(key, draws)

  def fn(x):
    lp = jax.vmap(lambda k: jax.nn.log_softmax(logits_fn_with_key(x, k)))(keys)
    return jnp.mean(lp, axis=0)
  return fn


def _attack_fn(name: str, norm: str, eps: float, s: dict, steps: int):
  """``(logits_fn, x, y, key) -> (x_adv, info)`` of attack ``name`` with
  the settings ``s`` of ``_settings``."""
  if name == "apgd-ce":
    return lambda f, x, y, k: apgd(f, x, y, k, norm=norm, eps=eps,
                                     steps=steps, restarts=s["apgd_restarts"],
                                     loss="ce")
  if name == "apgd-dlr":
    return lambda f, x, y, k: apgd(f, x, y, k, norm=norm, eps=eps,
                                   steps=steps, restarts=s["apgd_restarts"],
                                   loss="dlr")
  if name == "apgd-t":
    return lambda f, x, y, k: apgd_targeted(
        f, x, y, k, norm=norm, eps=eps, steps=steps,
        n_target_classes=s["n_targets"], restarts=s["apgdt_restarts"])
  if name in ("fab", "fab-t"):
    restarts = s["fabt_restarts"] if name == "fab-t" else s["fab_restarts"]
    return lambda f, x, y, k: fab(f, x, y, k, norm=norm, eps=eps, steps=steps,
                                  restarts=restarts,
                                  targeted=name == "fab-t",
                                  n_target_classes=s["n_targets"])
  if name == "square":
    return lambda f, x, y, k: square(
        f, x, y, k, norm=norm, eps=eps, queries=s["square_queries"],
        resc_schedule=s["square_resc_schedule"])
  raise ValueError(f"unknown attack {name!r}; expected one of {ATTACKS}")


@dataclasses.dataclass(frozen=True)
class _EOT:
  """``eot_logits_fn`` as a hashable function of ``(params, key)``."""
  model_fn: Callable
  draws: int

  def __call__(self, params_and_key, x):
    params, key = params_and_key
    return eot_logits_fn(functools.partial(self.model_fn, params), key,
                         self.draws)(x)


@dataclasses.dataclass(frozen=True)
class _Closure:
  """A ``logits_fn(x)`` closure seen as a function of (ignored) params."""
  fn: Callable

  def __call__(self, params, x):
    del params
    return self.fn(x)


# Jitted (model function, attack, settings) -> function of (params, x, y,
# key); jit's own cache then holds one executable per batch shape. Bounded,
# least recently used out first.
_COMPILED: collections.OrderedDict = collections.OrderedDict()
_COMPILED_MAX = 64


def _jitted(cache, cache_key, build):
  try:
    hash(cache_key)
  except TypeError:       # an unhashable model function: no reuse
    return build()
  if cache_key in cache:
    cache.move_to_end(cache_key)
    return cache[cache_key]
  fn = cache[cache_key] = build()
  while len(cache) > _COMPILED_MAX:
    cache.popitem(last=False)
  return fn


def _inside(xa, x, norm, eps, tol=1e-5):
  d = (np.asarray(xa, np.float64) - np.asarray(x, np.float64)).reshape(len(x), -1)
  n = np.abs(d).max(1) if norm == "linf" else np.sqrt((d * d).sum(1))
  return (n <= eps + tol) & (np.asarray(xa).reshape(len(x), -1).min(1) >= -tol) \
      & (np.asarray(xa).reshape(len(x), -1).max(1) <= 1 + tol)


# ------------------------------------------------------------ sanity checks
def sanity_checks(logits_fn, x, y, n_classes: int, attacks: Sequence[str],
                  randomized: bool = False) -> list[str]:
  """The reference's checks before attacking; returns (and warns) messages."""
  msgs = []
  xs = jnp.asarray(x[:min(len(x), 64)])
  ys = jnp.asarray(y[:len(xs)])
  if not randomized:
    a, b = np.asarray(logits_fn(xs)), np.asarray(logits_fn(xs))
    if not np.allclose(a, b, rtol=1e-5, atol=1e-6):
      msgs.append("the forward pass is not deterministic (two calls on the "
                  "same inputs differ): use version='rand' for randomised "
                  "models")
  else:
    a = np.asarray(logits_fn(xs))
  if np.all(a >= 0) and np.all(a <= 1) and np.allclose(a.sum(-1), 1, atol=1e-4):
    msgs.append("the outputs look like probabilities (in [0, 1], summing to "
                "1): pass logits, or the losses (CE, DLR) are not the intended "
                "ones")
  targeted = [t for t in attacks if t.endswith("-t")]
  if targeted and n_classes - 1 < 9:
    msgs.append(f"{targeted} use 9 target classes but the model has only "
                f"{n_classes} classes: using {n_classes - 1} targets")
  g = jax.grad(lambda z: jnp.sum(losses.cross_entropy(logits_fn(z), ys)))(xs)
  gn = np.asarray(jnp.sqrt(jnp.sum(g.reshape(len(g), -1) ** 2, axis=1)))
  zero = float(np.mean(gn < 1e-20))
  if zero > 0:
    msgs.append(f"{zero:.1%} of the checked points have a zero input "
                f"gradient: gradient masking may make white-box attacks fail")
  for m in msgs:
    warnings.warn(m, AutoAttackWarning, stacklevel=3)
  return msgs


# ------------------------------------------------------------ resumable state
class _Progress:
  """Robust flags and adversarial inputs after each (attack, batch), saved
  atomically as .npz so a long evaluation can resume."""

  def __init__(self, directory, signature: dict, x, y):
    self.dir = directory
    self.sig = hashlib.sha256(json.dumps(signature, sort_keys=True).encode()
                              ).hexdigest()[:16]
    self.path = os.path.join(directory, f"autoattack_{self.sig}.npz") \
        if directory else None

  def load(self):
    if self.path and os.path.exists(self.path):
      d = np.load(self.path, allow_pickle=False)
      return {k: d[k] for k in d.files}
    return None

  def save(self, **arrays):
    if not self.path:
      return
    os.makedirs(self.dir, exist_ok=True)
    tmp = self.path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, self.path)


def _bucket(n: int, batch_size: int) -> int:
  """The batch size an attack runs with when ``n`` points are left: the
  smallest power of two >= n (at least 8), capped at ``batch_size``. Later
  attacks see few robust points; padding them to the full batch would cost
  as much as attacking every point, while power-of-two buckets bound the
  number of compilations."""
  b = 8
  while b < n:
    b *= 2
  return min(b, batch_size)


def autoattack(logits_fn: Callable, x, y, key, *, norm: str = "linf",
               eps: float, version: str = "standard",
               attacks: Sequence[str] | None = None, batch_size: int = 500,
               steps: int = 100, state_dir: str | None = None,
               n_classes: int | None = None, checks: bool = True,
               progress: bool = False, params=None) -> dict:
  """Runs AutoAttack; returns a dict with

  * ``x_adv`` [N, ...]: the adversarial input of every broken point (the
    clean input for points still robust);
  * ``robust`` [N] bool; ``clean_acc``; ``robust_acc`` (final);
  * ``robust_acc_after``: {attack name: robust accuracy after it};
  * ``warnings``: messages of the sanity checks.

  ``logits_fn(x) -> logits`` (``logits_fn(x, key)`` for version "rand"), or,
  with ``params`` given, ``logits_fn(params, x) -> logits``
  (``logits_fn(params, x, key)`` for "rand"): then the compiled attacks are
  cached by ``logits_fn`` (which must be hashable and compare equal for the
  same model, as ``tsjax.methods.common.ModelLogits`` does) and the
  settings, and a later call with other parameters of the same model does
  not recompile.
  ``state_dir``: save progress after every batch of every attack and resume
  from it (the file is keyed by the arguments, model outputs on the first
  points included, so a different model or data never resumes).
  """
  if version not in VERSIONS and attacks is None:
    raise ValueError(f"unknown AutoAttack version {version!r}; expected one "
                     f"of {sorted(VERSIONS)} or a custom attacks list")
  if norm not in ("linf", "l2"):
    raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
  if eps < 0:
    raise ValueError(f"eps must be >= 0, got {eps}")
  names = tuple(attacks) if attacks is not None else VERSIONS[version]
  for n in names:
    if n not in ATTACKS:
      raise ValueError(f"unknown attack {n!r}; expected names from {ATTACKS}")
  x = np.asarray(x)
  y = np.asarray(y, np.int32)
  k_eot, key = jax.random.split(key)
  randomized = version == "rand"
  # model_fn(p, x) -> logits with p passed to the compiled attacks as an
  # argument. Without params, a closure holding its parameters as constants:
  # p is None and the compiled attacks live for this call only (keeping them
  # would keep the parameters).
  cache = _COMPILED if params is not None else collections.OrderedDict()
  if params is None:
    model_fn = _Closure(eot_logits_fn(logits_fn, k_eot, 20) if randomized
                        else logits_fn)
    p = None
  elif randomized:
    model_fn, p = _EOT(logits_fn, 20), (params, k_eot)
  else:
    model_fn, p = logits_fn, params
  f = functools.partial(model_fn, p)
  f_batch_p = _jitted(cache, (model_fn, "logits"),
                      lambda: jax.jit(lambda q, z: model_fn(q, z)))
  f_batch = functools.partial(f_batch_p, p)
  clean_logits = np.concatenate([np.asarray(f_batch(jnp.asarray(x[i:i + batch_size])))
                                 for i in range(0, len(x), batch_size)])
  n_classes = n_classes or clean_logits.shape[-1]
  s = _settings(version if version in VERSIONS else "standard", n_classes)
  msgs = sanity_checks(f, x, y, n_classes, names, randomized) if checks else []
  robust = clean_logits.argmax(-1) == y
  x_adv = x.copy()
  out = {"clean_acc": float(robust.mean()), "robust_acc_after": {}}
  sig = {"norm": norm, "eps": float(eps), "attacks": names, "version": version,
         "n": len(x), "steps": steps, "bs": batch_size,
         "key": np.asarray(jax.random.key_data(key)).tolist(),
         "x": hashlib.sha256(x.tobytes()).hexdigest()[:16],
         "logits": np.round(clean_logits[:8].astype(np.float64), 4).tolist()}
  prog = _Progress(state_dir, sig, x, y)
  saved = prog.load()
  done_attack, done_batch = 0, 0
  if saved is not None:
    robust, x_adv = saved["robust"], saved["x_adv"]
    done_attack, done_batch = int(saved["attack"]), int(saved["batch"])
    out["robust_acc_after"] = json.loads(str(saved["after"]))
  white_box_robust = None
  for ai, name in enumerate(names):
    if ai < done_attack:
      continue
    attack = _jitted(
        cache, (model_fn, name, norm, float(eps), int(steps),
         tuple(sorted(s.items()))),
        lambda run=_attack_fn(name, norm, eps, s, steps): jax.jit(
            lambda q, xb, yb, kb: run(functools.partial(model_fn, q), xb, yb,
                                      kb)))
    if name == "square" and white_box_robust is None:
      white_box_robust = robust.copy()
    # The points this attack works on: those robust when it started (saved
    # with the progress, so a resumed attack sees the same batches).
    resuming = saved is not None and ai == done_attack and done_batch > 0
    todo = saved["todo"] if resuming else np.flatnonzero(robust)
    bs = _bucket(len(todo), batch_size)
    n_batches = -(-len(todo) // bs)
    for b in range(done_batch if resuming else 0, n_batches):
      idx = todo[b * bs:(b + 1) * bs]
      pad = bs - len(idx)
      sel = np.concatenate([idx, np.repeat(idx[-1:], pad)]) if pad else idx
      xa, _ = attack(p, jnp.asarray(x[sel]), jnp.asarray(y[sel]),
                     jax.random.fold_in(jax.random.fold_in(key, ai), b))
      # Count a point as broken only if the model misclassifies the returned
      # input and it lies in the threat model. (Predicted on the padded
      # batch: one compilation per bucket, not per number of points left.)
      pred = np.asarray(f_batch(xa)).argmax(-1)[:len(idx)]
      xa = np.asarray(xa)[:len(idx)]
      broken = (pred != y[idx]) & _inside(xa, x[idx], norm, eps)
      x_adv[idx[broken]] = xa[broken]
      robust[idx[broken]] = False
      prog.save(robust=robust, x_adv=x_adv, attack=ai, batch=b + 1, todo=todo,
                after=json.dumps(out["robust_acc_after"]))
      if progress:
        print(f"{name}: batch {b + 1}/{n_batches}, robust acc "
              f"{robust.mean():.4f}")
    out["robust_acc_after"][name] = float(robust.mean())
    prog.save(robust=robust, x_adv=x_adv, attack=ai + 1, batch=0,
              todo=np.zeros((0,), np.int64),
              after=json.dumps(out["robust_acc_after"]))
  if white_box_robust is not None and checks:
    extra = float(np.mean(white_box_robust & ~robust))
    if extra > 0.002:   # the reference's threshold
      m = (f"Square (black-box) broke {extra:.2%} of the points that the "
           f"white-box attacks could not: a sign of gradient masking")
      warnings.warn(m, AutoAttackWarning, stacklevel=2)
      msgs.append(m)
  out.update({"x_adv": x_adv, "robust": robust,
              "robust_acc": float(robust.mean()), "warnings": msgs})
  return out
