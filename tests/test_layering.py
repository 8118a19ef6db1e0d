"""The library's imports point down only: each subpackage of ``tsjax``
imports from the layers below it (or from itself), never sideways or up, and
no ``tsjax`` import hides inside a function (where a cycle would go
unnoticed until that function runs)."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "tsjax")

# Bottom to top. ``experiments`` and ``configs`` (links to the top-level
# directories, the programs built on the library) may import anything.
LAYERS = (
    ("config_checks", "backend"),
    ("losses",),
    ("attacks",),
    ("models",),
    ("metrics",),
    ("data",),
    ("methods",),
    ("train",),
)
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}
TOP = ("experiments", "configs")


def _library_files():
  for root, dirs, files in os.walk(PKG):
    rel = os.path.relpath(root, PKG)
    if rel.split(os.sep)[0] in TOP:
      dirs[:] = []
      continue
    dirs[:] = [d for d in dirs if d not in TOP and d != "__pycache__"]
    for f in files:
      if f.endswith(".py"):
        yield os.path.join(root, f)


def _unit(path: str) -> str | None:
  """The layer unit of a file: its subpackage or top-level module
  (``tsjax/__init__.py``: None, the package's front, above every layer)."""
  rel = os.path.relpath(path, PKG).split(os.sep)
  if rel == ["__init__.py"]:
    return None
  return rel[0][:-3] if len(rel) == 1 else rel[0]


def _imports(tree):
  """``(module, lineno, at module level)`` of every ``tsjax`` import."""
  top = {id(n) for n in tree.body}
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.level == 0 and (
        node.module or "").split(".")[0] == "tsjax":
      mods = ([f"tsjax.{a.name}" for a in node.names]
              if node.module == "tsjax" else [node.module])
    elif isinstance(node, ast.Import):
      mods = [a.name for a in node.names if a.name.split(".")[0] == "tsjax"]
    else:
      continue
    for m in mods:
      yield m, node.lineno, id(node) in top


def violations(files) -> list[str]:
  """The bad imports of ``(path, unit)`` pairs, one line each."""
  out = []
  for path, unit in files:
    with open(path) as f:
      tree = ast.parse(f.read())
    rel = os.path.relpath(path, ROOT)
    for mod, line, top_level in _imports(tree):
      parts = mod.split(".")
      target = parts[1] if len(parts) > 1 else None
      if not top_level:
        out.append(f"{rel}:{line}: 'import {mod}' inside a function")
      if unit is None or target is None or target == unit:
        continue
      if target in TOP:
        out.append(f"{rel}:{line}: the library imports {mod} (a program)")
      elif target not in RANK or unit not in RANK:
        out.append(f"{rel}:{line}: {unit} -> {target}: a unit missing from "
                   f"LAYERS")
      elif RANK[target] >= RANK[unit]:
        kind = "sideways" if RANK[target] == RANK[unit] else "upward"
        out.append(f"{rel}:{line}: {kind} import {unit} -> {target}")
  return out


def test_library_imports_point_down_only():
  files = [(p, _unit(p)) for p in _library_files()]
  assert len(files) > 40
  assert violations(files) == []


@pytest.mark.parametrize("source, expected", [
    ("from tsjax.train import fit\n", "upward import metrics -> train"),
    ("from tsjax import methods\n", "upward import metrics -> methods"),
    ("def f():\n  from tsjax.losses import margin\n", "inside a function"),
    ("from tsjax.experiments import common\n", "a program"),
])
def test_the_check_catches_each_kind(tmp_path, source, expected):
  """Would the check notice? A module of ``tsjax/metrics`` with each kind of
  bad import."""
  path = tmp_path / "probe.py"
  path.write_text(source)
  found = violations([(str(path), "metrics")])   # as if in tsjax/metrics
  assert any(expected in v for v in found), found
