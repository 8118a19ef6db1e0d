"""The runnable documentation runs: every ``examples/*.py`` script and every
```python block of README.md and of docs/*.md, each in a fresh interpreter as
a user would run it (so JAX's global settings, e.g. 64-bit mode, never leak in
from the test process or another block).

* Scripts are parametrized over the folder's contents: a new example is
  tested without touching this file (return code 0, some output; the known
  ones also print numbers that are checked for sanity below).
* Markdown blocks (ids ``README.md:LINE``, ``docs/api.md:LINE``) run in a
  temporary working directory (a block may write, e.g. a teacher's work dir)
  with the repository root on ``PYTHONPATH`` (blocks may use a clone's
  ``experiments/``). Every block runs exactly as written, nothing prepended;
  a block that only illustrates is fenced as ```text or ```bash instead.
* Only what the selected tests need is launched (``-k docs`` runs no
  example scripts).
* Whatever reads Fashion-MNIST skips only when the Debian package's folder is
  missing, as the other tests do.
"""

import concurrent.futures
import os
import re
import subprocess
import sys

import pytest

from tsjax.data import images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = sorted(f for f in os.listdir(os.path.join(ROOT, "examples"))
                  if f.endswith(".py"))
FMNIST = os.path.isdir(images.DEFAULT_FASHION_MNIST_DIR)
TIMEOUT = 600

# What the known examples must print (regexes); the float groups are checked
# by CHECKS. Examples not listed here only need a clean exit and some output.
EXPECTED = {
    "attack_any_model.py": [
        r"clean accuracy: +(\d\.\d+)",
        r"PGD-10 \(linf 0\.1, 3 restarts\) accuracy: (\d\.\d+)",
        r"restrict='in' +accuracy: (\d\.\d+)",
        r"restrict='orth' accuracy: (\d\.\d+)",
        r"AutoAttack \(linf 0\.1\) accuracy: (\d\.\d+)",
    ],
    "specialization_two_networks.py": [
        r"A vs A \(seed 0\) : mean best correlation (\d\.\d+)",
        r"A vs B \(seed 1\) : mean best correlation (\d\.\d+)",
        r"A vs untrained +: mean best correlation (\d\.\d+)",
    ],
    "seed_sweep_teacher_student.py": [
        r"standard mean +(\S+) +(\S+) +(\S+) +(\S+) +(\S+)",
        r"pgd_at mean +(\S+) +(\S+) +(\S+) +(\S+) +(\S+)",
    ],
    "distill_one_step.py": [
        r"advfunmatch: loss before the step (\d+\.\d+), after (\d+\.\d+)",
        r"peeraid: loss before the step (\d+\.\d+), after (\d+\.\d+)",
    ],
}


def _check_attack(v):
  clean, pgd_acc, in_acc, orth_acc, aa = v
  assert clean > 0.6                       # a trained classifier
  assert pgd_acc < clean and aa <= clean   # the attacks do something
  assert in_acc < clean and orth_acc < clean


def _check_specialization(v):
  itself, other_seed, untrained = v
  assert itself > 0.999                    # a network matches itself exactly
  assert untrained < other_seed < itself


def _check_sweep(v):
  standard, pgd_at = v[:5], v[5:]
  assert standard[2] < 1e-6 < pgd_at[2]    # only PGD-AT leaves span(U)
  assert pgd_at[1] > standard[1]           # ... and specialises off it


def _check_distill(v):
  afm_before, afm_after, peer_before, peer_after = v
  assert afm_after < afm_before and peer_after < peer_before


CHECKS = {"attack_any_model.py": _check_attack,
          "specialization_two_networks.py": _check_specialization,
          "seed_sweep_teacher_student.py": _check_sweep,
          "distill_one_step.py": _check_distill}


def _env():
  """The environment a user's shell would give: no virtual devices or x64
  switched on by the test process (conftest sets both for itself)."""
  env = dict(os.environ)
  flags = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                   if "xla_force_host_platform_device_count" not in f)
  env["XLA_FLAGS"] = flags
  env.pop("JAX_ENABLE_X64", None)
  env["PYTHONPATH"] = os.pathsep.join(
      [ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
  return env


def _run(args, cwd):
  """``(returncode, stdout, stderr)`` of ``python ARGS`` in ``cwd``."""
  proc = subprocess.run([sys.executable, *args], cwd=cwd, env=_env(),
                        capture_output=True, text=True, timeout=TIMEOUT)
  return proc.returncode, proc.stdout, proc.stderr


def _ok(args, result) -> str:
  code, out, err = result
  assert code == 0, (f"{args} exited with {code}\n--- stdout\n{out[-4000:]}"
                     f"\n--- stderr\n{err[-6000:]}")
  return out


def _needs_fmnist(source: str) -> bool:
  return "fashion" in source.lower()


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs(name, launched):
  path = os.path.join(ROOT, "examples", name)
  with open(path) as f:
    source = f.read()
  assert source.lstrip().startswith('"""'), f"{name}: no module docstring"
  assert re.search(r"^def main\(\):", source, re.M), f"{name}: no main()"
  assert 'if __name__ == "__main__":' in source
  if _needs_fmnist(source) and not FMNIST:
    pytest.skip(f"needs `{images.FASHION_MNIST_APT}`")
  cwd, result = launched[("example", name)]
  out = _ok([path], result)
  assert out.strip(), f"{name} printed nothing"
  assert not os.listdir(cwd), f"{name} wrote into its working directory"
  values = []
  for pattern in EXPECTED.get(name, []):
    m = re.search(pattern, out)
    assert m, f"{name}: no line matching {pattern!r} in\n{out}"
    values += [float(g) for g in m.groups()]
  if name in CHECKS:
    CHECKS[name](values)


# ------------------------------------------------------------ README, docs/
USING = "## Using the library"
DOCS = ["README.md"] + sorted(
    "docs/" + f for f in os.listdir(os.path.join(ROOT, "docs"))
    if f.endswith(".md")) if os.path.isdir(os.path.join(ROOT, "docs")) else [
        "README.md"]


def markdown_blocks(doc: str):
  """``(doc, line, section, code)`` of every ```python block of ``doc`` (a
  path relative to the repository root); ``line`` is the fence's line."""
  with open(os.path.join(ROOT, doc)) as f:
    text = f.read()
  blocks = []
  for m in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
    before = text[:m.start()]
    headings = re.findall(r"^## .*$", before, re.M)
    blocks.append((doc, before.count("\n") + 1,
                   headings[-1] if headings else "", m.group(1)))
  return blocks


BLOCKS = [b for doc in DOCS for b in markdown_blocks(doc)]
BLOCK_IDS = [f"{doc}:{line}" for doc, line, _, _ in BLOCKS]


def test_readme_has_library_blocks():
  """The README shows the functional API as real, runnable python: one to
  three short blocks under its "Using the library" heading."""
  n = sum(doc == "README.md" and section == USING
          for doc, _, section, _ in BLOCKS)
  assert 1 <= n <= 3, f"{n} python blocks under {USING!r} in README.md"


def test_docs_blocks_collected():
  """Every page of docs/ is read, and no fence is half-open (an odd count of
  ``` lines would swallow the rest of a page into one block)."""
  assert "docs/api.md" in DOCS
  for doc in DOCS:
    with open(os.path.join(ROOT, doc)) as f:
      fences = re.findall(r"^```", f.read(), re.M)
    assert len(fences) % 2 == 0, f"{doc}: unbalanced ``` fences"


def _selected_jobs(session) -> set | None:
  """The launch keys the selected tests of this module need; None: no test
  of this module was collected with parameters (then everything runs)."""
  module = sys.modules[__name__]
  keys = set()
  for item in session.items:
    params = getattr(getattr(item, "callspec", None), "params", None)
    if getattr(item, "module", None) is not module or not params:
      continue
    if "name" in params:
      keys.add(("example", params["name"]))
    elif "doc" in params:
      keys.add(("block", params["doc"], params["line"]))
  return keys or None


@pytest.fixture(scope="module")
def launched(request, tmp_path_factory):
  """Every selected example and markdown block, run two at a time (each
  process spends most of its time compiling, which is single-threaded, so two
  share the machine's cores well): ``{key: (cwd, (returncode, stdout,
  stderr))}`` with keys ``("example", name)`` and ``("block", doc, line)``.
  What needs Fashion-MNIST is not run without it."""
  wanted = _selected_jobs(request.session)
  jobs = {}
  for name in EXAMPLES:
    path = os.path.join(ROOT, "examples", name)
    with open(path) as f:
      if _needs_fmnist(f.read()) and not FMNIST:
        continue
    if wanted is None or ("example", name) in wanted:
      jobs[("example", name)] = ([path], tmp_path_factory.mktemp("example"))
  for doc, line, _, code in BLOCKS:
    key = ("block", doc, line)
    if (_needs_fmnist(code) and not FMNIST) or (
        wanted is not None and key not in wanted):
      continue
    d = tmp_path_factory.mktemp("block")
    (d / "block.py").write_text(code)
    (d / "cwd").mkdir()
    jobs[key] = ([str(d / "block.py")], d / "cwd")
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    futures = {k: pool.submit(_run, args, cwd) for k, (args, cwd) in
               jobs.items()}
    return {k: (jobs[k][1], f.result()) for k, f in futures.items()}


@pytest.mark.parametrize("doc,line,section,code", BLOCKS, ids=BLOCK_IDS)
def test_markdown_block_runs(doc, line, section, code, launched):
  if _needs_fmnist(code) and not FMNIST:
    pytest.skip(f"needs `{images.FASHION_MNIST_APT}`")
  _ok([f"{doc}:{line}"], launched[("block", doc, line)][1])
