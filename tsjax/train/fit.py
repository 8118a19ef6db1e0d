"""A training loop for image classifiers (and distillation students).

``fit`` runs epochs of a jitted step, evaluates on a validation split after
each epoch, keeps the best parameters by a validation metric next to the last
ones, maintains optional EMA and SWA averages, logs to JSON lines and
TensorBoard, prints one line per epoch (epoch, train loss, validation clean /
robust accuracy, best so far, seconds per epoch, ETA of the whole run; also
appended to ``log.txt``) and, on a terminal, a progress bar with throughput,
checkpoints every epoch with Orbax (atomic; a killed run resumes from the last
finished epoch and, with the deterministic per-epoch batch order it expects,
ends with the same parameters), and stops with a clear error on a non-finite
loss, leaving the last good checkpoint intact. The step loop makes no
implicit host <-> device transfer (it runs under
``jax.transfer_guard("disallow")``; the next batch is put while the step
runs, metrics are fetched every ``log_every`` steps).

Several processes (``jax.distributed``): every process runs ``fit`` with the
same arguments (global batches, a state replicated by ``state_sharding``);
all of them take part in the checkpoints, only process 0 writes the logs,
TensorBoard events and prints.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from tsjax.train.checkpoint import CheckpointStore
from tsjax.train.classifier import bn_reestimate, ema_update, swa_update
from tsjax.train.distributed import is_main_process, to_global, to_host
from tsjax.train.metric_writers import (JsonlWriter, MultiWriter,
                                        TensorBoardWriter, TextLog)


def fit(*, workdir: str, state, step_fn: Callable, train_batches: Callable[[int], Iterable],
        epochs: int, steps_per_epoch: int,
        evaluate_fn: Callable[[Any, Any], dict] | None = None,
        select_metric: str | None = None, ctx: Any = None,
        ema_decay: float | None = None, swa_start_epoch: int | None = None,
        bn_batches: Callable[[], Iterable] | None = None, model=None,
        log_every: int = 50, progress: bool = True,
        stop_after_epochs: int | None = None, state_sharding=None,
        view: Callable[[Any, Any], tuple] | None = None) -> dict:
  """Trains ``state`` for ``epochs`` epochs; returns a summary dict.

  Args:
    workdir: directory for ``checkpoints/``, ``best/``, ``metrics.jsonl``,
      ``log.txt`` and TensorBoard events (``tb/``).
    state: the initial ``TrainState``.
    step_fn: jitted ``(state, batch, ctx) -> (state, metrics)``.
    train_batches: ``epoch -> iterable`` of device batches; must be a pure
      function of the epoch (deterministic order) for exact resume.
    epochs, steps_per_epoch: schedule length (``steps_per_epoch`` batches are
      taken from each epoch's iterable).
    evaluate_fn: ``(params, model_state) -> dict`` of validation scalars.
    select_metric: key of ``evaluate_fn``'s dict to maximise for model
      selection (the best parameters are saved under ``best/``).
    ema_decay: keep an exponential moving average of the parameters (updated
      every step; evaluated with the current batch-norm statistics).
    swa_start_epoch: from this epoch on, average the parameters at the end of
      every epoch (equal weights) and re-estimate batch-norm statistics over
      ``bn_batches(epoch)`` for the averaged parameters (needs ``model``).
      With ``select_metric`` the average is also selected on its own: the
      average of the epoch with the best validation metric is kept
      (``swa_best``; PeerAiD main.py:786-812 saves the SWA student with the
      best test PGD-10 accuracy of the SWA student itself).
    progress: print the per-epoch lines (and a progress bar on a terminal).
    stop_after_epochs: stop (as a kill would) after this many new epochs.
    state_sharding: where the state lives (e.g. replicated over the data
      mesh); fresh and restored states are placed there so the jitted step
      sees one input layout and compiles once. Needed with several
      processes (checkpoints hold global arrays).
    view: ``(params, model_state) -> (params, model_state)`` of the model that
      is evaluated, averaged (EMA / SWA) and saved as ``best`` when the
      trained state holds more than that model (PeerAiD trains a student and
      a peer: the view is the student). Default: the whole state.
  Returns:
    ``{"state", "last": val metrics, "best": {"epoch", "metric", "params",
    "model_state"}, "ema": ..., "swa": ..., "swa_best": like "best" or None,
    "history": [...]}``.
  """
  main = is_main_process()
  if main:
    os.makedirs(workdir, exist_ok=True)
  store = CheckpointStore(os.path.join(workdir, "checkpoints"))
  best_store = CheckpointStore(os.path.join(workdir, "best"), max_to_keep=1)
  swa_store = CheckpointStore(os.path.join(workdir, "best_swa"), max_to_keep=1)
  copy = lambda t: jax.tree.map(jnp.copy, t)   # the step donates the state
  view = view or (lambda params, model_state: (params, model_state))
  v_params, v_state = view(state.params, state.model_state)
  carry = {
      "state": state,
      "ema": copy(v_params) if ema_decay else {},
      "swa": {"params": copy(v_params),
              "model_state": copy(v_state),
              "count": jnp.zeros((), jnp.int32)} if swa_start_epoch is not None
             else {},
      "best_metric": jnp.asarray(-jnp.inf, jnp.float32),
      "best_epoch": jnp.asarray(-1, jnp.int32),
  }
  if swa_start_epoch is not None:
    carry.update(swa_best_metric=jnp.asarray(-jnp.inf, jnp.float32),
                 swa_best_epoch=jnp.asarray(-1, jnp.int32))
  place = ((lambda tree: to_global(tree, state_sharding))
           if state_sharding is not None else (lambda tree: tree))
  carry = place(carry)   # restored arrays take the template's sharding
  start_epoch = 0
  restored = store.restore_latest(carry)
  writer = MultiWriter([JsonlWriter(os.path.join(workdir, "metrics.jsonl")),
                        TensorBoardWriter(os.path.join(workdir, "tb")),
                        TextLog(os.path.join(workdir, "log.txt"),
                                echo=progress)] if main else [])
  if restored is not None:
    start_epoch, carry = restored
    carry = place(carry)
    writer.write_text(f"resumed after epoch {start_epoch} from "
                      f"{store.directory}")
  history = []
  new_epochs = 0
  state = carry["state"]
  last_val = None
  t_start = time.time()
  try:
    for epoch in range(start_epoch, epochs):
      t_epoch = time.time()
      state, ema, train_loss = _train_epoch(
          state, step_fn, train_batches(epoch), ctx, epoch, epochs,
          steps_per_epoch, writer, log_every, progress and main, workdir,
          carry["ema"] if ema_decay else None, ema_decay, view,
          state_sharding)
      carry["state"] = state
      if ema_decay:
        carry["ema"] = ema
      record = {"epoch": epoch + 1}
      v_params, v_state = view(state.params, state.model_state)
      if swa_start_epoch is not None and epoch + 1 > swa_start_epoch:
        swa = carry["swa"]
        params = swa_update(swa["params"], v_params, swa["count"])
        ms = bn_reestimate(model, params, v_state, bn_batches(epoch))
        carry["swa"] = {"params": params, "model_state": ms,
                        "count": swa["count"] + 1}
      if evaluate_fn is not None:
        last_val = evaluate_fn(v_params, v_state)
        record.update({f"val/{k}": v for k, v in last_val.items()
                       if np.isscalar(v)})
        if ema_decay:
          ev = evaluate_fn(carry["ema"], v_state)
          record.update({f"val_ema/{k}": v for k, v in ev.items()
                         if np.isscalar(v)})
        if select_metric is not None and select_metric not in last_val:
          raise KeyError(f"select_metric {select_metric!r} is not among the "
                         f"validation metrics {sorted(last_val)}")
        if carry["swa"] and int(carry["swa"]["count"]) > 0:
          swa = {"params": carry["swa"]["params"],
                 "model_state": carry["swa"]["model_state"]}
          sv = evaluate_fn(swa["params"], swa["model_state"])
          record.update({f"val_swa/{k}": v for k, v in sv.items()
                         if np.isscalar(v)})
          if select_metric is not None:
            _select(carry, "swa_best", sv[select_metric], epoch, swa_store,
                    swa)
        if select_metric is not None:
          _select(carry, "best", last_val[select_metric], epoch, best_store,
                  {"params": v_params, "model_state": v_state})
      writer.write_scalars(int(state.step), record)
      history.append(record)
      carry = place(carry)
      store.save(epoch + 1, carry)
      new_epochs += 1
      now = time.time()
      per_epoch = (now - t_start) / new_epochs
      writer.write_text(epoch_line(
          epoch + 1, epochs, train_loss, last_val, select_metric,
          float(carry["best_metric"]), int(carry["best_epoch"]),
          now - t_epoch, per_epoch * (epochs - epoch - 1)))
      if stop_after_epochs is not None and new_epochs >= stop_after_epochs \
          and epoch + 1 < epochs:
        return {"stopped": True, "state": state}
  finally:
    writer.close()
    store.close()
  v_params, v_state = view(state.params, state.model_state)
  template = {"params": v_params, "model_state": v_state}
  best = _selected(carry, "best", best_store, template)
  swa_best = _selected(carry, "swa_best", swa_store, template)
  return {"stopped": False, "state": state, "last": last_val, "best": best,
          "ema": carry["ema"] or None, "swa": carry["swa"] or None,
          "swa_best": swa_best, "history": history}


def _select(carry, name: str, value, epoch: int, store, tree) -> None:
  """Keeps ``tree`` in ``store`` (and its epoch / metric in ``carry``)
  when ``value`` beats the best ``name`` so far."""
  if value > float(carry[f"{name}_metric"]):
    carry[f"{name}_metric"] = jnp.asarray(value, jnp.float32)
    carry[f"{name}_epoch"] = jnp.asarray(epoch + 1, jnp.int32)
    store.save(epoch + 1, tree)


def _selected(carry, name: str, store, template) -> dict | None:
  """The kept ``name`` tree with its epoch and metric, or None; closes
  ``store``."""
  epoch = int(carry.get(f"{name}_epoch", -1))
  tree = store.restore(epoch, template) if epoch > 0 else None
  store.close()
  if tree is None:
    return None
  return {"epoch": epoch, "metric": float(carry[f"{name}_metric"]), **tree}


def format_seconds(seconds: float) -> str:
  """``"1:02:03"`` (hours:minutes:seconds)."""
  s = int(round(max(seconds, 0.0)))
  return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def epoch_line(epoch: int, epochs: int, train_loss: float, val: dict | None,
               select_metric: str | None, best: float, best_epoch: int,
               seconds: float, eta: float) -> str:
  """The per-epoch log line, e.g. ``epoch 3/10 | train loss 1.2345 | val
  clean 0.8125 pgd 0.4219 | best pgd/acc 0.4219 (epoch 3) | 41.2 s/epoch |
  ETA 0:04:48``."""
  parts = [f"epoch {epoch}/{epochs}", f"train loss {train_loss:.4f}"]
  if val:
    accs = [f"{k.split('/')[0]} {v:.4f}" for k, v in val.items()
            if k.endswith("/acc") and np.isscalar(v)]
    if accs:
      parts.append("val " + " ".join(accs))
  if select_metric is not None and best_epoch > 0:
    parts.append(f"best {select_metric} {best:.4f} (epoch {best_epoch})")
  parts += [f"{seconds:.1f} s/epoch", f"ETA {format_seconds(eta)}"]
  return " | ".join(parts)


def _train_epoch(state, step_fn, batches, ctx, epoch, epochs, steps_per_epoch,
                 writer, log_every, progress, workdir, ema=None, ema_decay=None,
                 view=None, sharding=None):
  # A bar only on a terminal (disable=None): cluster logs get the epoch lines.
  bar = tqdm(total=steps_per_epoch, disable=None if progress else True,
             unit="step", desc=f"epoch {epoch + 1}/{epochs}",
             dynamic_ncols=True, leave=False)
  t0, seen = time.time(), 0
  pending, loss_sum = [], 0.0
  it = iter(batches)
  # No implicit host <-> device transfer inside the step loop: the only
  # transfers are the batches' explicit device puts (one batch ahead, so the
  # next batch is gathered and copied while the step runs) and the explicit
  # metric fetches every ``log_every`` steps.
  with jax.transfer_guard("disallow"):
    batch = _next_batch(it, epoch, 0, steps_per_epoch, sharding)
    for i in range(steps_per_epoch):
      state, metrics = step_fn(state, batch, ctx)   # dispatched, not waited on
      seen += _batch_size(batch)
      if i + 1 < steps_per_epoch:
        batch = _next_batch(it, epoch, i + 1, steps_per_epoch, sharding)
      if ema is not None:
        ema = ema_update(ema, view(state.params, state.model_state)[0],
                         decay=ema_decay)
      pending.append(metrics)
      if len(pending) >= log_every or i == steps_per_epoch - 1:
        loss_sum += _flush(pending, state, epoch, workdir, writer)
        pending = []
        rate = seen / max(time.time() - t0, 1e-9)
        bar.set_postfix(img_s=f"{rate:.0f}")
      bar.update(1)
  bar.close()
  return state, ema, loss_sum / steps_per_epoch


def _next_batch(it, epoch: int, i: int, steps_per_epoch: int, sharding=None):
  """The next batch, made with transfers allowed (the batch iterator's
  device puts are the loop's one sanctioned transfer)."""
  with jax.transfer_guard("allow"):
    try:
      batch = next(it)
    except StopIteration:
      raise ValueError(f"epoch {epoch} yielded only {i} batches; "
                       f"steps_per_epoch={steps_per_epoch}") from None
    # Host values (numpy batches of a single-process run) are put
    # explicitly, where the state lives.
    return jax.tree.map(lambda v: v if isinstance(v, jax.Array)
                        else jax.device_put(v, sharding), batch)


def _batch_size(batch):
  shapes = [l.shape for l in jax.tree.leaves(batch) if getattr(l, "ndim", 0)]
  return shapes[0][0] if shapes else 1


def _flush(pending, state, epoch, workdir, writer) -> float:
  """Writes the mean of the pending steps' metrics; returns their summed
  loss."""
  host, step = to_host((pending, state.step))
  finite = all(bool(m["finite"]) for m in host)
  if not finite:
    raise FloatingPointError(
        f"non-finite loss or gradient during epoch {epoch + 1} (step "
        f"{int(step)}); the update was skipped and training stopped. "
        f"The last good checkpoint (end of epoch {epoch}) in "
        f"{os.path.join(workdir, 'checkpoints')} is intact; lower the "
        f"learning rate or check the inputs.")
  keys = [k for k in host[-1] if k != "finite"]
  writer.write_scalars(int(step), {
      f"train/{k}": float(np.mean([m[k] for m in host])) for k in keys})
  return float(np.sum([m.get("loss", np.nan) for m in host]))
