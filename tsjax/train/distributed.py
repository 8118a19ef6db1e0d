"""Several processes (hosts) with ``jax.distributed``: start-up from a config
section, which process writes files, and moving values between the host and
global arrays.

JAX's multi-controller runtime runs one Python process per host (or per GPU);
every process runs the same program, holds the shards of each global
``jax.Array`` that live on its own devices, and jitted computations over global
arrays communicate through XLA collectives. tsjax follows four rules:

* every process calls the same jitted functions on the same global arrays
  (batches are assembled from each process's own rows, see
  ``tsjax.data.images``; seed sweeps shard seeds over all devices);
* metrics are reduced on device over global arrays, so the result is
  replicated and every process can read it; an array partly held by other
  processes is never copied to the host directly (:func:`to_host` all-gathers
  it on device first);
* only the main process (``jax.process_index() == 0``) writes logs, results,
  plots, TensorBoard events and ``config.json`` (:func:`is_main_process`);
* every process takes part in Orbax checkpoint saves and restores, as Orbax
  requires (``tsjax.train.checkpoint``).

A single process (no ``distributed`` settings) takes the same code paths:
every helper here is then the identity or a plain ``np.asarray``.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils

from tsjax import config_checks as cc

FIELDS = ("coordinator_address", "num_processes", "process_id", "auto",
          "local_device_ids", "initialization_timeout", "cpu_devices")


def _get(section, name, default=None):
  if section is None:
    return default
  if isinstance(section, Mapping):
    return section.get(name, default)
  return section.get(name, default) if hasattr(section, "get") else getattr(
      section, name, default)


def settings(section, prefix: str = "distributed") -> dict | None:
  """Checks a ``distributed`` config section; returns the keyword arguments of
  ``jax.distributed.initialize`` (``{}``: auto-detection) or ``None`` (one
  process, nothing to start). Raises ``ConfigError`` naming the field.

  Fields (all optional):
    coordinator_address: ``"host:port"`` of process 0's coordinator. With
      ``num_processes`` and ``process_id``: an explicit launch; a ``None``
      among those two is auto-detected.
    auto: ``True``: ``jax.distributed.initialize()`` with no arguments, so
      JAX reads the cluster's environment (SLURM ``srun``, Open MPI
      ``mpirun``, Cloud TPU pods, GKE / Kubernetes).
    num_processes, process_id: see ``coordinator_address``.
    local_device_ids: the accelerators this process uses (default: all
      visible ones, or what the cluster assigns).
    initialization_timeout: seconds to wait for every process (default 300).
    cpu_devices: XLA CPU devices of each process (:func:`cpu_devices`); not
      a ``jax.distributed`` argument, checked and applied by
      :func:`initialize`.
  """
  address = _get(section, "coordinator_address")
  auto = _get(section, "auto", False)
  if not isinstance(auto, bool):
    raise cc.ConfigError(f"config field '{prefix}.auto' must be True or False, "
                         f"got {auto!r}")
  if not address:
    return {} if auto else None
  if not isinstance(address, str) or ":" not in address:
    raise cc.ConfigError(f"config field '{prefix}.coordinator_address' must be "
                         f"'host:port' (process 0's host), got {address!r}")
  out = {"coordinator_address": address}
  n = _get(section, "num_processes")
  if n is not None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
      raise cc.ConfigError(f"config field '{prefix}.num_processes' must be a "
                           f"positive integer, got {n!r}")
    out["num_processes"] = int(n)
  pid = _get(section, "process_id")
  if pid is not None:
    if isinstance(pid, bool) or not isinstance(pid, int) or not (
        0 <= pid < (n or pid + 1)):
      raise cc.ConfigError(
          f"config field '{prefix}.process_id' must be an integer in [0, "
          f"'{prefix}.num_processes' = {n}), got {pid!r}")
    out["process_id"] = int(pid)
  ids = _get(section, "local_device_ids")
  if ids is not None:
    out["local_device_ids"] = [int(i) for i in (
        ids if isinstance(ids, (tuple, list)) else str(ids).split(","))]
  timeout = _get(section, "initialization_timeout")
  if timeout:
    out["initialization_timeout"] = int(timeout)
  return out


def cpu_devices(section, prefix: str = "distributed") -> int | None:
  """The XLA CPU device count a config's ``cpu_devices`` field asks for:
  ``None`` (or no field): JAX's default (one device), ``"cores"``: one per
  core this process may run on, a positive integer (or its digits, as a
  command line gives them): that many. Raises
  ``ConfigError`` naming the field otherwise."""
  value = _get(section, "cpu_devices")
  if isinstance(value, str) and value.strip().isdigit():   # command line
    value = int(value)
  if value is None:
    return None
  if value == "cores":
    return len(os.sched_getaffinity(0)) if hasattr(
        os, "sched_getaffinity") else (os.cpu_count() or 1)
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise cc.ConfigError(f"config field '{prefix}.cpu_devices' must be None, "
                         f"'cores' or a positive integer, got {value!r}")
  return value


def set_cpu_devices(count: int | None) -> bool:
  """Gives this process ``count`` XLA CPU devices (``None``: no change).

  Only possible before JAX starts its backends; an explicit
  ``--xla_force_host_platform_device_count`` in ``XLA_FLAGS`` or an earlier
  ``jax_num_cpu_devices`` setting wins. Returns whether the count was set.
  CPU devices are what a host's cores run side by side: XLA:CPU spreads one
  program's large operations over all cores itself, but a program of many
  tiny operations (the teacher-student training loops) runs faster on one
  core, so several such programs on several devices use the cores better.
  """
  if count is None or "xla_force_host_platform_device_count" in os.environ.get(
      "XLA_FLAGS", "") or jax.config.jax_num_cpu_devices >= 0:
    return False
  try:
    jax.config.update("jax_num_cpu_devices", int(count))
  except RuntimeError:  # backends already running: keep their devices
    return False
  return True


def initialize(section=None, prefix: str = "distributed") -> bool:
  """Starts ``jax.distributed`` as a config's ``distributed`` section says
  (see :func:`settings`), first giving this process the section's
  ``cpu_devices`` (:func:`set_cpu_devices`); call it before any JAX
  computation. Returns True
  when this process is part of a multi-process run (started now or before).

  Nothing configured: a single process, nothing is started. Calling it again
  in the same process (e.g. two experiments in one Python session) does
  nothing.
  """
  kwargs = settings(section, prefix)
  set_cpu_devices(cpu_devices(section, prefix))
  if jax.distributed.is_initialized():
    return True
  if kwargs is None:
    return False
  try:
    jax.distributed.initialize(**kwargs)
  except ValueError as e:
    if kwargs:
      raise
    raise RuntimeError(
        f"config field '{prefix}.auto' is True but JAX found no cluster to "
        f"join ({e}); run under srun / mpirun / a TPU pod, or set "
        f"'{prefix}.coordinator_address', '{prefix}.num_processes' and "
        f"'{prefix}.process_id'") from e
  return True


def is_main_process() -> bool:
  """True on the process that writes files (process 0; always in a single
  process)."""
  return jax.process_index() == 0


def describe() -> str:
  """``"process 0 of 2, 2 of 4 cpu devices"``: where this process runs."""
  return (f"process {jax.process_index()} of {jax.process_count()}, "
          f"{jax.local_device_count()} of {jax.device_count()} "
          f"{jax.default_backend()} devices")


def _is_key(x) -> bool:
  return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype,
                                                       jax.dtypes.prng_key)


def to_host(tree: Any) -> Any:
  """The values of a pytree of arrays as numpy, on every process.

  An array that spans other processes' devices is all-gathered on device
  first (``multihost_utils.process_allgather``: a jitted identity with a
  replicated output), so nothing reads another process's memory; every
  process must then call this together, on the same arrays. Typed PRNG keys
  become their key data. This is an explicit transfer: it is allowed under
  ``jax.transfer_guard("disallow")``, which the training loop runs under.
  """
  with jax.transfer_guard("allow"):
    return jax.tree.map(_host_value, tree)


def _host_value(x):
  if _is_key(x):
    x = jax.random.key_data(x)
  if isinstance(x, jax.Array) and not x.is_fully_addressable \
      and not x.is_fully_replicated:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


@functools.lru_cache(maxsize=64)
def _resharder(sharding):
  """A jitted identity onto ``sharding`` (global arrays of any dtype, typed
  PRNG keys included, move there on device)."""
  return jax.jit(lambda x: x, out_shardings=sharding)


def to_global(tree: Any, sharding) -> Any:
  """Places a pytree on ``sharding`` (which may span every process).

  Host values and process-local arrays must hold the same value on every
  process (they come from the same seed); each process then fills only its
  own devices' shards. Global arrays are resharded on device. Typed PRNG
  keys keep their type.
  """
  multi = jax.process_count() > 1

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return x if x.sharding == sharding else _resharder(sharding)(x)
    if not multi:
      return jax.device_put(x, sharding)
    if _is_key(x):
      return jax.random.wrap_key_data(one(jax.random.key_data(x)),
                                      impl=jax.random.key_impl(x))
    return jax.device_put(np.asarray(x), sharding)
  return jax.tree.map(one, tree)


def split_points(n: int) -> tuple[int, int]:
  """This process's contiguous share ``[lo, hi)`` of ``n`` points (sizes
  differ by at most one; ``(0, n)`` in a single process)."""
  p, count = jax.process_index(), jax.process_count()
  return n * p // count, n * (p + 1) // count


def gather_hosts(tree: Any) -> Any:
  """Host values of the same shape on every process -> numpy arrays with a
  leading process axis ``[P, ...]`` (a device all-gather; every process must
  call it). A single process gets ``[1, ...]``."""
  return jax.tree.map(
      lambda x: np.asarray(multihost_utils.process_allgather(np.asarray(x))),
      tree)


def sum_hosts(tree: Any) -> Any:
  """Sums host values (same shapes) over the processes; every process gets
  the total."""
  return jax.tree.map(lambda x: x.sum(0), gather_hosts(tree))


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier ``name`` (no-op in a
  single process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
