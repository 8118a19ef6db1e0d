"""Orbax checkpoints of arbitrary pytrees (typed PRNG keys included).

``CheckpointStore`` wraps ``orbax.checkpoint.CheckpointManager``: each save is
written to a temporary directory and renamed when complete (atomic), the last
``max_to_keep`` are kept, and ``restore_latest`` returns ``None`` when there is
nothing to resume from.

Several processes (``jax.distributed``): every process must call ``save`` and
``restore`` together, on the same global arrays (Orbax writes each shard once,
from the process that holds it, and process 0 finalises the directory).
Restored arrays take the sharding of the template's arrays, so a restored
state lives where the fresh one did; without a template, the saved sharding
where this run has its devices, else replicated over all devices.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def _is_key(x) -> bool:
  return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype,
                                                       jax.dtypes.prng_key)


def _to_storable(tree):
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x,
                      tree)


def _from_storable(tree, like):
  return jax.tree.map(
      lambda x, l: jax.random.wrap_key_data(x, impl=jax.random.key_impl(l))
      if _is_key(l) else x, tree, like)


class CheckpointStore:
  """Save / resume a pytree under ``directory`` (created if needed)."""

  def __init__(self, directory: str, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    self._mngr = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                             create=True))

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def save(self, step: int, tree: Any) -> None:
    self._mngr.save(int(step), args=ocp.args.StandardSave(_to_storable(tree)))
    self._mngr.wait_until_finished()

  def restore(self, step: int, like: Any) -> Any:
    """Restores ``step`` into the structure, shapes and dtypes of ``like``
    (a pytree of concrete arrays, e.g. the freshly initialised state); each
    ``jax.Array`` of ``like`` also gives its sharding."""
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(
            x.shape, x.dtype,
            sharding=x.sharding if isinstance(x, jax.Array) else None),
        _to_storable(like))
    tree = self._mngr.restore(int(step), args=ocp.args.StandardRestore(abstract))
    return _from_storable(tree, like)

  def restore_raw(self, step: int | None = None) -> Any:
    """Restores a step (default: the latest) as saved, without a template:
    nested dicts of arrays (dataclasses such as TrainState become dicts)."""
    step = self.latest_step() if step is None else int(step)
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    # Arrays come back with their saved sharding where this run has those
    # devices, else (another topology: e.g. saved by 2 processes, read by 1)
    # replicated over all devices.
    everywhere = NamedSharding(Mesh(np.asarray(jax.devices()), ("all",)),
                               PartitionSpec())
    return self._mngr.restore(step, args=ocp.args.StandardRestore(
        fallback_sharding=everywhere))

  def restore_latest(self, like: Any) -> tuple[int, Any] | None:
    step = self.latest_step()
    if step is None:
      return None
    return step, self.restore(step, like)

  def close(self) -> None:
    self._mngr.close()

