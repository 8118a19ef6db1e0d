"""Shared pytest setup for the tsjax test suite.

* Four virtual CPU devices (``--xla_force_host_platform_device_count=4``) so
  the seed sweep's ``shard_map`` path is exercised on a CPU-only machine. This
  must happen before jax initialises its backends, i.e. before ``import jax``.
* 64-bit mode: the study's default dtype is float64; float32 tests pass their
  dtypes explicitly.
* The repository root on ``sys.path`` so ``configs`` (and ``tsjax`` without an
  install) import.
"""

import atexit
import os
import shutil
import sys
import tempfile

_FLAG = "--xla_force_host_platform_device_count=4"
_existing = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _existing:
  os.environ["XLA_FLAGS"] = (_existing + " " + _FLAG).strip()

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

import jax  # noqa: E402  (must follow the XLA_FLAGS setup above)

jax.config.update("jax_enable_x64", True)

# A persistent compilation cache for this session only (a fresh temporary
# directory, removed at exit): tests that build the same programs again (a
# study run, its resume, another test's equal config) load them instead of
# compiling. The results are the same executables, so nothing tested changes.
# Under pytest-xdist (``-n``) the controller makes the directory and its
# workers (started from it, so they inherit the variable) share it.
_CACHE = os.environ.get("TSJAX_TEST_XLA_CACHE")
if not _CACHE or "PYTEST_XDIST_WORKER" not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix="tsjax_test_xla_cache_")
  os.environ["TSJAX_TEST_XLA_CACHE"] = _CACHE
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
if not jax.config.jax_compilation_cache_dir:
  jax.config.update("jax_compilation_cache_dir", _CACHE)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)

import pytest  # noqa: E402

from tsjax.configs import teacher_student as ts_configs  # noqa: E402


def shrink(config):
  """The smoke config shrunk further so a whole study runs in seconds."""
  config.num_seeds = 2
  config.data.n_train = 256
  config.data.n_eval = 128
  config.train.steps = 200
  config.eval.restarts = 2
  config.eval.steps = 3
  config.eval.corr_batch = 64
  config.robust_features.steps = 10
  return config


@pytest.fixture(scope="session")
def make_small_config():
  """Factory of fresh small configs (for module-scoped fixtures)."""
  return lambda: shrink(ts_configs.get_config("smoke"))


@pytest.fixture
def small_config(make_small_config):
  """``configs.teacher_student`` ("smoke") shrunk to run in seconds."""
  return make_small_config()
