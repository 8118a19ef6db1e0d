"""Shared plumbing of experiment modules: work dirs, config files, JSON rows."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import time
from typing import Any

import jax
import jaxlib
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags
from ml_collections.config_flags import tuple_parser

import tsjax
from tsjax import configs as packaged_configs
from tsjax.config_checks import ConfigError
from tsjax.data.images import DatasetNotPreparedError
from tsjax.backend.cpu import IMAGE_XLA_FLAGS, use_unrolled_threefry


def config_dict(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort(sort_keys=True))


# Sections that say how a run is launched, not what it computes: left out of
# the config hash and of the resume check (each process of a multi-process
# run has its own process_id; a resumed run may get another coordinator).
LAUNCH_SECTIONS = ("distributed",)


def _run_fields(d: dict) -> dict:
  return {k: v for k, v in d.items() if k not in LAUNCH_SECTIONS}


def config_hash(config: ml_collections.ConfigDict) -> str:
  blob = json.dumps(_run_fields(config_dict(config)), sort_keys=True).encode()
  return hashlib.sha256(blob).hexdigest()[:8]


def default_workdir(name: str, config_arg: str,
                    config: ml_collections.ConfigDict) -> str:
  """``runs/<name>_<variant>_<hash>``: the same config resumes, another one
  gets its own directory. Characters other than letters, digits, ``._-``
  (the ``,`` between variants, ``:`` of ``tfds:NAME``) become ``-``."""
  variant = re.sub(r"[^A-Za-z0-9._-]", "-", config_arg) if config_arg else "default"
  return os.path.join("runs", f"{name}_{variant}_{config_hash(config)}")


def config_arg_from_argv(argv, default: str = "") -> str:
  """The ``:variant`` of ``--config path.py:variant`` on the command line."""
  for i, a in enumerate(argv):
    spec = None
    if a.startswith("--config="):
      spec = a.split("=", 1)[1]
    elif a == "--config" and i + 1 < len(argv):
      spec = argv[i + 1]
    if spec is not None:
      return spec.split(":", 1)[1] if ":" in spec else default
  return default


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
  if isinstance(a, dict) and isinstance(b, dict):
    out = []
    for k in sorted(set(a) | set(b)):
      out += _diff(a.get(k, "<missing>"), b.get(k, "<missing>"),
                   f"{prefix}{k}.")
    return out
  return [] if a == b else [f"{prefix[:-1]}: {a!r} -> {b!r}"]


def prepare_workdir(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Creates ``workdir`` and records the config; refuses to resume a run made
  with a different config (ValueError naming the differing fields; the
  ``distributed`` section may differ). With several processes every process
  checks, only process 0 writes."""
  main = jax.process_index() == 0
  if main:
    os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  new = config_dict(config)
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    diffs = _diff(_run_fields(old), _run_fields(new))
    if diffs:
      raise ConfigError(
          f"work dir {workdir!r} holds a run made with a different config "
          f"({'; '.join(diffs[:5])}{' ...' if len(diffs) > 5 else ''}); pass "
          f"another --workdir or delete that directory to start afresh")
  elif main:
    atomic_write(path, json.dumps(new, indent=2, sort_keys=True))
  if main:   # one row per start: what ran this work dir, and when
    append_line(os.path.join(workdir, "provenance.jsonl"),
                json.dumps({"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                            **provenance()}, sort_keys=True))


def _git_commit() -> str | None:
  """The commit of the tsjax checkout in use (``+dirty`` with uncommitted
  changes); None for an installed copy outside a git checkout."""
  pkg = os.path.dirname(os.path.abspath(tsjax.__file__))
  try:
    git = lambda *a: subprocess.run(
        ["git", "-C", pkg, *a], capture_output=True, text=True, timeout=10,
        check=True).stdout.strip()
    top = git("rev-parse", "--show-toplevel")
    if not os.path.samefile(os.path.join(top, "tsjax"), pkg):
      return None          # some other repository holds the installed copy
    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
  except (OSError, subprocess.SubprocessError):
    return None
  return commit + ("+dirty" if dirty else "")


def provenance() -> dict:
  """What made a result: tsjax's version and git commit, JAX / jaxlib, the
  backend and its devices, the process count, Python."""
  kinds = sorted({d.device_kind for d in jax.devices()})
  return {"tsjax": tsjax.__version__, "git_commit": _git_commit(),
          "jax": jax.__version__, "jaxlib": jaxlib.__version__,
          "backend": jax.default_backend(), "device_kind": ", ".join(kinds),
          "device_count": jax.device_count(),
          "process_count": jax.process_count(),
          "python": platform.python_version()}


def atomic_write(path: str, text: str | bytes) -> None:
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "wb" if isinstance(text, bytes) else "w") as f:
    f.write(text)
  os.replace(tmp, path)


def append_line(path: str, line: str) -> None:
  """Appends one line, rewriting the file atomically (a killed writer leaves
  the old file or the new one, never half a line)."""
  old = ""
  if os.path.exists(path):
    with open(path) as f:
      old = f.read()
  atomic_write(path, old + line.rstrip("\n") + "\n")


def to_jsonable(x):
  if isinstance(x, dict):
    return {k: to_jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [to_jsonable(v) for v in x]
  if isinstance(x, (jax.Array, np.ndarray, np.generic)):
    a = np.asarray(x)
    return a.item() if a.ndim == 0 else a.tolist()
  return x


def config_overrides(flag: str = "config") -> dict:
  """``{dotted field: value}`` given as ``--FLAG.field=value`` on the command
  line (parsed by ml_collections against the config file's types)."""
  return dict(config_flags.get_override_values(flags.FLAGS[flag]))


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict) -> list:
  """Sets each dotted field present in ``config``; returns the fields it
  does not have (a table applies one set of overrides to several methods,
  each with its own options)."""
  missing = []
  for path, value in overrides.items():
    *parents, leaf = path.split(".")
    node = config
    try:
      for p in parents:
        node = node[p]
      node[leaf]                                      # present?
    except (KeyError, AttributeError, TypeError):
      missing.append(path)
      continue
    node[leaf] = tuple(value) if isinstance(value, list) else value
  return missing


class FractionFloatParser(flags.FloatParser):
  """Float config fields from the command line, fractions included:
  ``--config.eval.eps=8/255`` is 0.0313725... (eps in pixel units)."""

  _FRACTION = re.compile(r"\s*([-+]?[0-9.]+(?:[eE][-+]?[0-9]+)?)\s*/\s*"
                         r"([0-9.]+(?:[eE][-+]?[0-9]+)?)\s*")

  def parse(self, argument):
    m = (self._FRACTION.fullmatch(argument) if isinstance(argument, str)
         else None)
    if m:
      den = float(m[2])
      if den == 0:
        raise ValueError(f"{argument!r}: division by zero")
      argument = float(m[1]) / den
    return super().parse(argument)


class CommaTupleParser(tuple_parser.TupleParser):
  """Tuple config fields from the command line: a Python literal
  (``"('standard', 'kd')"``, ``(16,32)``) or bare comma-separated words
  (``standard,kd``), which the default parser reads as one string."""

  def parse(self, argument):
    value = super().parse(argument)
    if (isinstance(argument, str) and len(value) == 1
        and isinstance(value[0], str) and "," in value[0]):
      return tuple(v.strip() for v in value[0].split(",") if v.strip())
    return value


def register_config_parsers() -> None:
  config_flags.register_flag_parser_for_type(float, FractionFloatParser())
  config_flags.register_flag_parser_for_type(tuple, CommaTupleParser())


def resolve_config_path(spec: str) -> str:
  """``configs/NAME.py[:variant]`` as given, when that file is there (a
  clone); else the installed ``tsjax.configs`` file of that name, so an
  experiment launches from any directory after ``pip install``."""
  path, sep, variant = spec.partition(":")
  if os.path.exists(path) or os.path.dirname(path) not in ("configs",
                                                            "./configs"):
    return spec
  name = os.path.splitext(os.path.basename(path))[0]
  if name not in packaged_configs.NAMES:
    return spec
  return packaged_configs.path(name) + sep + variant


def _resolve_config_argv(argv: list[str]) -> list[str]:
  out = list(argv)
  for i, a in enumerate(out):
    if a.startswith("--config="):
      out[i] = "--config=" + resolve_config_path(a.split("=", 1)[1])
    elif a == "--config" and i + 1 < len(out):
      out[i + 1] = resolve_config_path(out[i + 1])
  return out


def _one_line(text: str) -> str:
  return " ".join(str(text).replace("\\n", " ").split())


def _fail(message: str) -> None:
  print(message, file=sys.stderr)
  sys.exit(2)


def _override_named(text: str, argv) -> str | None:
  """The ``--config.PATH`` override of ``argv`` whose last field ``text``
  (an ml_collections message) names."""
  for a in argv:
    if a.startswith("--config."):
      path = a[len("--config."):].split("=", 1)[0]
      if re.search(rf"\b{re.escape(path.split('.')[-1])}\b", text):
        return path
  return None


def _flags_error(e: BaseException, argv) -> str:
  """One line for a command line that did not parse: an unknown override
  field, a config file that does not load, a variant it refuses, a value of
  the wrong type."""
  chain = [e]
  while chain[-1].__cause__ or chain[-1].__context__:
    chain.append(chain[-1].__cause__ or chain[-1].__context__)
  texts = [_one_line(c).strip("'\"") for c in chain]
  hint = next((m for m in (re.search(r'Did you mean "?([\w.]+)"? instead', t)
                           for t in texts) if m), None)
  if hint or any(isinstance(c, (AttributeError, KeyError)) for c in chain):
    path = _override_named(" ".join(texts), argv)
    return (f"config error: --config.{path or '?'}: no such config field"
            + (f" (did you mean {hint[1]!r}?)" if hint else ""))
  loading = next((c for c in chain if isinstance(c, OSError)), None)
  if loading is not None:   # the config file (or something it reads)
    return f"config error: {_one_line(loading)}"
  variant = next((c for c in reversed(chain) if isinstance(c, ValueError)
                  and not isinstance(c, flags.Error)), None)
  if variant is not None and "variant" in str(variant):
    return f"config error: {_one_line(variant)}"
  return f"config error: {texts[0]}"


def parse_flags_one_line(argv):
  """absl's flag parsing (``app.run``'s ``flags_parser``) whose failures end
  in one line and exit status 2, no traceback or usage text; positional
  arguments are refused the same way."""
  try:
    rest = flags.FLAGS(argv)
    if "config" in flags.FLAGS:
      flags.FLAGS.config.keys()   # a config file that failed to load raises
  except Exception as e:     # flags.Error, and what loading the config raised
    _fail(_flags_error(e, argv))
  if len(rest) > 1:
    _fail(f"usage error: unexpected positional arguments {rest[1:]}; flags "
          f"are --config=FILE[:VARIANT], --config.FIELD=VALUE, --workdir=DIR")
  return rest


# Errors of a started run that are the user's input, not tsjax's bug: one
# line, exit status 2.
USER_ERRORS = (ConfigError, DatasetNotPreparedError)


def one_line_config_errors(main):
  """``main(argv)`` that ends a ``ConfigError`` (a field, a work dir of
  another config) or a missing data set in one line naming it and exit
  status 2, no traceback."""
  def wrapped(argv):
    try:
      return main(argv)
    except USER_ERRORS as e:
      kind = "data error" if isinstance(e, DatasetNotPreparedError) else (
          "config error")
      _fail(f"{kind}: {_one_line(e)}")
  return wrapped


# JAX's persistent compilation cache for experiments launched from the
# command line (``--compilation_cache``): a rerun, a resumed run or another
# config with the same programs loads them instead of compiling again.
COMPILATION_CACHE = os.path.join("~", ".cache", "tsjax", "jax_compilation_cache")


# Programs that took at least this long to compile go into the persistent
# cache (JAX's default, 1 s, left the study's sub-second training programs
# out, so a warm launch compiled them again).
CACHE_MIN_COMPILE_S = 0.1
_MIN_COMPILE_ENV = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"


def enable_compilation_cache(path: str | None) -> str | None:
  """Turns JAX's persistent compilation cache on at ``path`` (``~`` is
  expanded); ``None``, ``""`` or ``"off"``: left off. A cache already set
  (``JAX_COMPILATION_CACHE_DIR`` or ``jax.config``) wins. With a cache on,
  every program that took ``CACHE_MIN_COMPILE_S`` or longer to compile is
  kept (unless ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` says
  otherwise). Returns the directory in use (or None)."""
  current = jax.config.jax_compilation_cache_dir
  if not current and path and path != "off":
    current = os.path.expanduser(path)
    os.makedirs(current, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", current)
  if current and _MIN_COMPILE_ENV not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      CACHE_MIN_COMPILE_S)
  return current or None


# IMAGE_XLA_FLAGS (tsjax.backend.cpu) is re-exported for the image experiments.


def add_xla_flags(flags) -> list[str]:
  """Appends ``flags`` to ``XLA_FLAGS`` unless it already sets them (by
  name), before JAX starts its backends; returns those added."""
  current = os.environ.get("XLA_FLAGS", "")
  added = [f for f in flags if f.split("=")[0] not in current]
  if added:
    os.environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
  return added


def prepare_backend(xla_flags=()) -> None:
  """What every experiment sets before JAX compiles anything: its
  ``xla_flags`` (``add_xla_flags``) and the unrolled threefry lowering on
  the CPU backend (``tsjax.backend.cpu``: the same random bits, fewer executed
  operations per draw)."""
  add_xla_flags(xla_flags)
  use_unrolled_threefry()


def launch(name: str, run, default_config: str, config_help: str,
           default_variant: str = "", workdir_fn=None,
           xla_flags=()) -> None:
  """The command line of an experiment module (flax-example style):
  ``python -m experiments.NAME --config configs/NAME.py[:variant]
  [--config.field=value ...] [--workdir DIR]``.

  Defines ``--config`` (an ml_collections config file, locked) and
  ``--workdir`` (default ``runs/<name>_<variant>_<config hash>``, so the same
  config resumes there; ``workdir_fn(config)`` gives another default), then
  calls ``run(config, workdir)``. The flags are
  defined here, only when a module runs as a program, so the experiment
  modules can be imported together (tests, tables). ``xla_flags`` go into
  ``XLA_FLAGS`` first (``prepare_backend``).
  """
  register_config_parsers()
  sys.argv = _resolve_config_argv(sys.argv)
  config_flags.DEFINE_config_file("config", resolve_config_path(default_config),
                                  config_help, lock_config=True)
  flags.DEFINE_string("workdir", None,
                      f"Output directory (default: runs/{name}_<variant>_"
                      "<config hash>; the same config resumes there).")
  flags.DEFINE_string(
      "compilation_cache", COMPILATION_CACHE,
      "JAX persistent compilation cache directory ('off' to disable; the "
      "JAX_COMPILATION_CACHE_DIR environment variable takes precedence).")
  for flag in ("config", "workdir", "compilation_cache"):  # in --help
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[flag])

  def main(argv):
    del argv   # positional arguments: refused by parse_flags_one_line
    logging.set_verbosity(logging.WARNING)   # Orbax logs every save at INFO
    prepare_backend(xla_flags)
    enable_compilation_cache(flags.FLAGS.compilation_cache)
    config = flags.FLAGS.config
    arg = config_arg_from_argv(sys.argv, default=default_variant)
    workdir = flags.FLAGS.workdir or (
        workdir_fn(config) if workdir_fn else default_workdir(name, arg, config))
    t0 = time.time()
    run(config, workdir)
    print(f"done in {time.time() - t0:.0f} s; results in {workdir}")

  app.run(one_line_config_errors(main), flags_parser=parse_flags_one_line)
