"""Shared helpers of the benchmark scripts: machine description and load.

``machine_info(torch_device=None)`` is what every results JSON stores under
``"machine"``: CPU model and core counts, platform, library versions, JAX
backend and device, ``XLA_FLAGS``, the git commit (and uncommitted changes
under ``tsjax/`` and ``configs/``), plus PyTorch's version, device and thread
counts when a ``torch_device`` is given (PyTorch is imported only then).
``loadavg()`` is the 1/5/15-minute load average (None where the OS has none)
and ``uptime()`` the ``uptime`` line;
scripts record it before and after a run, because timings on a shared machine
are only as good as its idle time. ``open_results`` / ``write_results`` read
and (atomically) write a script's ``benchmarks/results/*.json``, where each
run adds or replaces its own entries.
"""

from __future__ import annotations

import importlib.metadata
import json
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


def installed_version(dist: str):
  """A distribution's installed version without importing it (the
  benchmarks that run PyTorch in a worker process keep it out of the JAX
  driver), or None."""
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return None


def append_to_results_md(lines) -> pathlib.Path:
  """Appends a section (lines of Markdown) to benchmarks/RESULTS.md."""
  path = ROOT / "benchmarks" / "RESULTS.md"
  with path.open("a") as f:
    f.write("\n".join(lines) + "\n")
  print(f"appended a section to {path.relative_to(ROOT)}")
  return path


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


def open_results(benchmark: str, machine: dict, args) -> tuple:
  """``(path, data, command)`` for a benchmark's JSON results file.

  The file is ``args.out`` or ``benchmarks/results/<benchmark>_<backend>
  [_quick].json``; ``data`` is its content when it holds this benchmark's
  runs (``{"benchmark", "backend", "runs": {key: ...}}``), else a fresh one,
  so a run adds or replaces its own entries and keeps the others. ``command``
  is the command line that produced the run (``args.argv``).
  """
  backend = machine["backend"]
  path = pathlib.Path(args.out) if args.out else (
      ROOT / "benchmarks" / "results" /
      f"{benchmark}_{backend}{'_quick' if args.quick else ''}.json")
  data = {}
  if path.exists():
    try:
      data = json.loads(path.read_text())
    except json.JSONDecodeError:
      data = {}
  if data.get("benchmark") != benchmark or not isinstance(
      data.get("runs"), dict):
    data = {"benchmark": benchmark, "runs": {}}
  data["backend"] = backend
  command = " ".join([f"python benchmarks/{benchmark}.py", *args.argv])
  return path, data, command


def write_results(path: pathlib.Path, data: dict) -> pathlib.Path:
  """Writes ``data`` as JSON atomically (temporary file, then rename)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(data, indent=2) + "\n")
  os.replace(tmp, path)
  return path


def merge_rows(data: dict, run_key: str, result: dict, machine: dict,
               command: str, row_key: str, order) -> None:
  """Stores ``result`` under ``data["runs"][run_key]``, its ``rows`` merged
  by ``row[row_key]`` with the rows already there (a run of one model or
  method replaces that row and keeps the others), in the order of ``order``."""
  entry = data["runs"].get(run_key, {})
  rows = {r[row_key]: r for r in entry.get("rows", [])}
  rows.update({r[row_key]: {**r, "command": command, "machine": machine,
                            "timestamp": result["timestamp"]}
               for r in result["rows"]})
  data["runs"][run_key] = {
      **{k: v for k, v in result.items() if k != "rows"},
      "command": command, "machine": machine,
      "rows": [rows[m] for m in order if m in rows]}
