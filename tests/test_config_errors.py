"""Bad configs fail in TeacherStudent(config) with a ValueError naming the
field, before JAX traces or compiles anything."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from tsjax import configs
from tsjax.train.teacher_student import TeacherStudent

from compile_events import BACKEND_COMPILE, compile_events


def test_compile_listener_sees_a_fresh_jit():
  """The check below can fail: a new jitted function does fire the events."""
  with compile_events() as events:
    jax.jit(lambda x: jnp.sin(x) * 3.0 + 0.125)(jnp.arange(7.0)).block_until_ready()
  assert BACKEND_COMPILE in events
  assert any(e.endswith("jaxpr_trace_duration") for e in events)


def _set(path, value):
  def edit(config):
    *parents, leaf = path.split(".")
    node = config
    for p in parents:
      node = node[p]
    if leaf in node:  # ConfigDict is type-safe: replace, don't cast
      del node[leaf]
    node[leaf] = value
  return edit


def _delete(path):
  def edit(config):
    *parents, leaf = path.split(".")
    node = config
    for p in parents:
      node = node[p]
    del node[leaf]
  return edit


def _teacher_widths_student_tuple(config):
  config.teacher.widths = (10,)
  _set("student.multi", (15,))(config)


def _robust_before_source(config):
  config.regimes = ("standard", "robust_features", "pgd_at")
  config.robust_features.source = "pgd_at"


def _robust_without_source(config):
  config.regimes = ("standard", "robust_features")
  config.robust_features.source = "pgd_at"


def _missing_in_fresh_configdict(config):
  """A ConfigDict built without ``data.sigma`` (not deleted afterwards)."""
  data = {k: v for k, v in config.data.items() if k != "sigma"}
  return ml_collections.ConfigDict({**config.to_dict(), "data": data})


CASES = [
    ("unknown_regime", _set("regimes", ("standard", "fgsm_at")), "regimes"),
    ("unknown_regime_str", _set("regimes", "standard,bogus"), "regimes"),
    ("adv_eps_negative", _set("adv.eps_frac", -0.1), "adv.eps_frac"),
    ("eval_eps_negative", _set("eval.eps_frac", -1e-3), "eval.eps_frac"),
    ("k_greater_than_d", _set("data.k", 51), "data.k"),
    ("student_tuple_not_multiple", _teacher_widths_student_tuple,
     "student.multi"),
    ("student_tuple_wrong_depth", _set("student.multi", (20, 20)),
     "student.multi"),
    ("student_tuple_zero_width", _set("student.multi", (0,)),
     "student.multi"),
    ("student_tuple_negative_width", _set("student.multi", (-10,)),
     "student.multi"),
    ("student_tuple_string_width", _set("student.multi", ("20",)),
     "student.multi"),
    ("non_integer_multi", _set("student.multi", 1.5), "student.multi"),
    ("multi_zero", _set("student.multi", 0), "student.multi"),
    ("missing_sigma", _delete("data.sigma"), "data.sigma"),
    ("missing_section", _delete("ccat"), "ccat"),
    ("missing_in_fresh_configdict", _missing_in_fresh_configdict,
     "data.sigma"),
    ("robust_before_source", _robust_before_source, "robust_features.source"),
    ("robust_without_source", _robust_without_source,
     "robust_features.source"),
    ("bad_norm", _set("adv.norm", "l1"), "adv.norm"),
    ("bad_dtype", _set("dtype", "bfloat16"), "dtype"),
]


@pytest.mark.parametrize("edit,field", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_config_raises_before_compiling(small_config, edit, field):
  config = edit(small_config) or small_config
  with compile_events() as events:
    with pytest.raises(ValueError) as info:
      TeacherStudent(config)
  assert f"'{field}" in str(info.value), str(info.value)
  assert not events, f"compiled/traced before raising: {events}"


NON_FINITE = [
    ("train.steps", float("inf")),
    ("train.steps", float("nan")),
    ("data.d", float("inf")),
    ("student.multi", float("inf")),
    ("student.multi", float("nan")),
    ("teacher.widths", (float("inf"),)),
]


@pytest.mark.parametrize("path,value", NON_FINITE,
                         ids=[f"{p}={v}" for p, v in NON_FINITE])
def test_non_finite_numbers_raise_value_error_naming_field(small_config, path,
                                                           value):
  """inf / nan in an integer field must give the same readable ValueError.

  ``int(inf)`` raises OverflowError (not a ValueError) and ``int(nan)`` a
  ValueError that names no field, so the finiteness check has to come before
  any ``int(value)`` comparison.
  """
  _set(path, value)(small_config)
  with compile_events() as events:
    with pytest.raises(ValueError) as info:
      TeacherStudent(small_config)
  assert f"'{path}'" in str(info.value), str(info.value)
  assert not events


def test_good_config_constructs_without_compiling(small_config):
  with compile_events() as events:
    study = TeacherStudent(small_config)
  assert not events, events
  assert study.student_widths == (20,)
  # An explicit tuple of multiples is accepted too.
  _set("student.multi", (30,))(small_config)
  assert TeacherStudent(small_config).student_widths == (30,)


def test_configs_reachable_from_the_package():
  """``tsjax.configs`` is the ``configs/`` folder: the same files, so
  ``--config configs/NAME.py:VARIANT`` and ``get_config(NAME, VARIANT)`` build
  the same config; unknown names are refused with the list."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for name in configs.NAMES:
    assert os.path.samefile(configs.path(name),
                            os.path.join(root, "configs", f"{name}.py"))
  spec = importlib.util.spec_from_file_location(
      "adv_train_file", os.path.join(root, "configs", "adv_train.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert (configs.get_config("adv_train", "cifar10,ard").to_dict()
          == module.get_config("cifar10,ard").to_dict())
  assert configs.get_config("distill").method.name == "rslad"
  with pytest.raises(ValueError, match="unknown config 'nope'.*teacher_student"):
    configs.get_config("nope")
