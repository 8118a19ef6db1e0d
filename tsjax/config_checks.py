"""Early, readable validation of ml_collections configs.

Every check raises ``ValueError`` naming the dotted config field and what was
expected, so a bad config fails before anything is traced or compiled.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Sequence

import ml_collections


class ConfigError(ValueError):
  """A config field is missing or holds a value of the wrong kind or range."""


def get_field(config: Any, path: str) -> Any:
  """Returns ``config.<path>`` or raises ConfigError naming the missing field."""
  node = config
  walked = []
  for part in path.split("."):
    walked.append(part)
    try:
      if isinstance(node, (dict, ml_collections.ConfigDict)):
        node = node[part]
      else:
        node = getattr(node, part)
    except (KeyError, AttributeError):
      raise ConfigError(
          f"config field '{'.'.join(walked)}' is missing (needed as "
          f"'{path}'); add it to the config file or pass "
          f"--config.{path}=VALUE") from None
  return node


def require_fields(config: Any, paths: Iterable[str]) -> None:
  for path in paths:
    get_field(config, path)


def check_number(config: Any, path: str, *, low: float | None = None,
                 high: float | None = None, low_open: bool = False,
                 integer: bool = False) -> float:
  """Checks ``config.<path>`` is a finite number inside [low, high]."""
  value = get_field(config, path)
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ConfigError(f"config field '{path}' must be a number, got "
                      f"{value!r} ({type(value).__name__})")
  if not math.isfinite(value):
    raise ConfigError(f"config field '{path}' must be finite, got {value!r}")
  if integer and int(value) != value:
    raise ConfigError(f"config field '{path}' must be an integer, got {value!r}")
  if low is not None:
    if low_open and not value > low:
      raise ConfigError(f"config field '{path}' must be > {low}, got {value!r}")
    if not low_open and not value >= low:
      raise ConfigError(f"config field '{path}' must be >= {low}, got {value!r}")
  if high is not None and not value <= high:
    raise ConfigError(f"config field '{path}' must be <= {high}, got {value!r}")
  return value


def check_eps(config: Any, path: str, norm: str,
              dim: int | None = None) -> float:
  """An attack radius on images in [0, 1]: ``>= 0``; L-inf at most 1 (the
  error says how to write 8/255 when 8 was meant); L2 at most ``sqrt(dim)``
  (the diameter of the input box) when ``dim`` is known."""
  value = check_number(config, path, low=0)
  if norm == "linf" and value > 1:
    raise ConfigError(
        f"config field '{path}' is {value:g}, but an L-inf radius on images "
        f"in [0, 1] is at most 1; for {value:g}/255 pass "
        f"--config.{path}={value:g}/255 (= {value / 255:.6g})")
  if norm == "l2" and dim and value > math.sqrt(dim):
    raise ConfigError(
        f"config field '{path}' is {value:g}, larger than the L2 diameter "
        f"sqrt({dim}) = {math.sqrt(dim):.4g} of images in [0, 1]")
  return value


def check_choice(config: Any, path: str, choices: Sequence[Any]) -> Any:
  value = get_field(config, path)
  if value not in choices:
    raise ConfigError(f"config field '{path}' must be one of "
                      f"{list(choices)}, got {value!r}")
  return value


def check_sequence_choices(config: Any, path: str,
                           choices: Sequence[str]) -> tuple:
  """A non-empty tuple of names from ``choices`` (comma-separated strings are
  accepted, as command-line overrides produce them)."""
  value = get_field(config, path)
  if isinstance(value, str):
    value = (value,)
  # "--config.regimes=a,b" arrives as ("a,b",): split such entries.
  value = tuple(v.strip() for item in value for v in str(item).split(",")
                if v.strip())
  if not value:
    raise ConfigError(f"config field '{path}' must name at least one of "
                      f"{list(choices)}")
  for v in value:
    if v not in choices:
      raise ConfigError(f"config field '{path}' has unknown entry {v!r}; "
                        f"expected entries from {list(choices)}")
  return value


def is_positive_int(value: Any) -> bool:
  """True for an int (or integral float) >= 1; False for bools, NaN, inf."""
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value) and value >= 1 and int(value) == value)


class FieldError(ValueError):
  """A value of a dataclass field (method options, attack spec) is out of
  range; ``build`` turns it into a ConfigError naming the config field."""

  def __init__(self, field: str, expected: str, value: Any):
    super().__init__(f"{field} must be {expected}, got {value!r}")
    self.field, self.expected, self.value = field, expected, value


def require(obj: Any, field: str, ok: bool, expected: str) -> None:
  """In a dataclass's ``__post_init__``: raise FieldError unless ``ok``."""
  if not ok:
    raise FieldError(field, expected, getattr(obj, field))


def number_in(value: Any, low: float | None = None, high: float | None = None,
              low_open: bool = False) -> bool:
  """A finite real number (not a bool) inside [low, high] ((low, high] with
  ``low_open``)."""
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return False
  if not math.isfinite(value):
    return False
  if low is not None and (value <= low if low_open else value < low):
    return False
  return high is None or value <= high


def build(cls: type, values: Any, prefix: str):
  """``cls(**values)`` for a frozen dataclass, with every problem reported
  as a ConfigError naming ``prefix.FIELD``: unknown fields, wrong values
  (FieldError / ValueError / TypeError from ``__post_init__``)."""
  if isinstance(values, ml_collections.ConfigDict):
    values = values.to_dict()
  values = dict(values or {})
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - names)
  if unknown:
    raise ConfigError(f"config field '{prefix}.{unknown[0]}' is not an option"
                      f" of {cls.__module__}.{cls.__qualname__}; known: "
                      f"{sorted(names)}")
  for k, v in values.items():     # ml_collections turns tuples into lists
    if isinstance(v, list):
      values[k] = tuple(v)
  try:
    return cls(**values)
  except FieldError as e:
    raise ConfigError(f"config field '{prefix}.{e.field}' must be "
                      f"{e.expected}, got {e.value!r}") from None
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config field '{prefix}': {e}") from None
