"""Experiment configs (ml_collections), one file per experiment.

In a clone they are files for ``--config configs/NAME.py[:VARIANT]``. The
same files are the package ``tsjax.configs`` (``tsjax/configs`` links here),
so an installed tsjax reaches them without a clone::

  from tsjax import configs
  config = configs.get_config("adv_train", "cifar10,ard")   # a ConfigDict
  configs.path("adv_train")   # the file, for --config PATH:VARIANT
"""

import importlib
import os

NAMES = ("teacher_student", "adv_train", "distill", "evaluate", "specialization")


def path(name: str) -> str:
  """The file of config ``name`` (one of ``NAMES``)."""
  if name not in NAMES:
    raise ValueError(f"unknown config {name!r}; configs are {NAMES}")
  return os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")


def get_config(name: str, variant: str | None = None):
  """``get_config(variant)`` of config ``name``, as ``--config PATH:VARIANT``
  builds it (``variant=None``: the file's default)."""
  path(name)  # checks the name
  module = importlib.import_module(f"{__name__}.{name}")
  return module.get_config() if variant is None else module.get_config(variant)
