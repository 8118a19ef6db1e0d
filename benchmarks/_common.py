"""Shared helpers of the benchmark scripts: machine description and load.

``machine_info(torch_device=None)`` is what every results JSON stores under
``"machine"``: CPU model and core counts, platform, library versions, JAX
backend and device, ``XLA_FLAGS``, the git commit (and uncommitted changes
under ``tsjax/`` and ``configs/``), plus PyTorch's version, device and thread
counts when a ``torch_device`` is given (PyTorch is imported only then).
``loadavg()`` is the 1/5/15-minute load average (None where the OS has none)
and ``uptime()`` the ``uptime`` line;
scripts record it before and after a run, because timings on a shared machine
are only as good as its idle time.
"""

from __future__ import annotations

import os
import pathlib
import platform
import subprocess

import jax

ROOT = pathlib.Path(__file__).resolve().parents[1]


def cpu_model() -> str:
  """``model name`` from /proc/cpuinfo ("" where unavailable)."""
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return ""


def git(*args) -> str:
  """Output of ``git *args`` in the repository root ("" on any failure)."""
  try:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return ""


def _version(module: str):
  try:
    return __import__(module).__version__
  except Exception:  # pragma: no cover
    return None


def loadavg():
  """[1, 5, 15]-minute load average, or None."""
  return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def uptime() -> str:
  """Output of ``uptime`` (load averages with the time), "" if unavailable."""
  try:
    return subprocess.run(["uptime"], capture_output=True, text=True,
                          timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return ""


def machine_info(torch_device=None) -> dict:
  dev = jax.devices()[0]
  try:
    affinity = len(os.sched_getaffinity(0))
  except AttributeError:
    affinity = None
  info = {
      "processor": platform.processor(),
      "cpu_model": cpu_model(),
      "machine": platform.machine(),
      "platform": platform.platform(),
      "cpu_count": os.cpu_count(),
      "cpus_usable": affinity,
      "python": platform.python_version(),
      "jax": jax.__version__,
      "jaxlib": _version("jaxlib"),
      "flax": _version("flax"),
      "backend": jax.default_backend(),
      "device_kind": dev.device_kind,
      "device_count": jax.device_count(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "git_commit": git("rev-parse", "HEAD"),
      "git_dirty_paths": git("status", "--porcelain", "--", "tsjax",
                             "configs").splitlines(),
  }
  if torch_device is not None:
    import torch
    info.update({
        "torch": torch.__version__,
        "torch_device": str(torch_device),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
    })
    if torch_device.type == "cuda":
      info["torch_device_name"] = torch.cuda.get_device_name(torch_device)
  return info
