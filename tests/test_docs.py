"""Every relative link of the documentation resolves.

README.md, CHANGELOG.md, docs/*.md, benchmarks/README.md and
benchmarks/RESULTS.md: each relative markdown link (``[text](path)``,
``![alt](path)``, ``[text](path#anchor)``, ``[text](#anchor)``) must name a
file or folder of this repository, and an
``#anchor`` into a markdown file must be the GitHub slug of one of its
headings. External links (``http(s)://``, ``mailto:``) are not checked, and
neither is anything inside code spans or fenced blocks. A broken link is
reported by page, line and target.
"""

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def doc_pages(root: str = ROOT) -> list[str]:
  """The checked pages, relative to ``root``."""
  pages = ["README.md", "CHANGELOG.md", "benchmarks/README.md",
           "benchmarks/RESULTS.md"]
  docs = os.path.join(root, "docs")
  if os.path.isdir(docs):
    pages += sorted("docs/" + f for f in os.listdir(docs) if f.endswith(".md"))
  return [p for p in pages if os.path.isfile(os.path.join(root, p))]


_FENCE = re.compile(r"^\s*(```|~~~)")
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
# [text](target) and ![alt](target); the target ends at whitespace (an
# optional "title" may follow) or at the closing parenthesis.
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REF_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)")
_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def _prose_lines(text: str):
  """``(line number, line)`` outside fenced code blocks."""
  fenced = None
  for n, line in enumerate(text.splitlines(), 1):
    m = _FENCE.match(line)
    if m:
      if fenced is None:
        fenced = m.group(1)
      elif m.group(1) == fenced:
        fenced = None
      continue
    if fenced is None:
      yield n, line


def links(text: str):
  """``(line number, target)`` of every link of a markdown text."""
  for n, line in _prose_lines(text):
    line = _CODE_SPAN.sub("", line)
    for m in _LINK.finditer(line):
      yield n, m.group(1)
    m = _REF_DEF.match(line)
    if m:
      yield n, m.group(1)


def slug(heading: str) -> str:
  """GitHub's anchor for a heading's text (github-slugger): the rendered
  text lower-cased, everything but letters, digits, ``_``, ``-`` and spaces
  removed, spaces turned into hyphens."""
  text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)   # links -> text
  text = re.sub(r"<[^>]+>", "", text)                          # inline HTML
  text = text.replace("`", "").replace("*", "")
  text = re.sub(r"[^\w\- ]", "", text.lower())
  return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
  """Every heading anchor of a markdown text, repeated headings numbered as
  GitHub numbers them (``name``, ``name-1``, ...)."""
  seen: dict[str, int] = {}
  out = set()
  for _, line in _prose_lines(text):
    m = _HEADING.match(line)
    if not m:
      continue
    base = slug(m.group(2))
    k = seen.get(base, 0)
    out.add(base if k == 0 else f"{base}-{k}")
    seen[base] = k + 1
  for m in re.finditer(r"<a\s+(?:name|id)=\"([^\"]+)\"", text):
    out.add(m.group(1))
  return out


def broken_links(page: str, root: str = ROOT) -> list[str]:
  """``"PAGE:LINE: TARGET (why)"`` for every relative link of ``page`` (a
  path relative to ``root``) that does not resolve."""
  path = os.path.join(root, page)
  with open(path, encoding="utf-8") as f:
    text = f.read()
  root_real = os.path.realpath(root)
  problems = []
  for n, target in links(text):
    if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):   # http:, mailto:, ...
      continue
    file_part, _, anchor = target.partition("#")
    if file_part:
      dest = os.path.normpath(os.path.join(os.path.dirname(path), file_part))
    else:
      dest = path
    where = f"{page}:{n}: {target}"
    if os.path.isabs(file_part):
      problems.append(f"{where} (absolute path)")
      continue
    real = os.path.realpath(dest)
    if os.path.commonpath([real, root_real]) != root_real:
      problems.append(f"{where} (outside the repository)")
      continue
    if not os.path.exists(dest):
      problems.append(f"{where} (no such file)")
      continue
    if anchor and dest.endswith(".md") and os.path.isfile(dest):
      with open(dest, encoding="utf-8") as f:
        if anchor not in anchors(f.read()):
          problems.append(f"{where} (no heading with anchor #{anchor})")
  return problems


PAGES = doc_pages()


def test_pages_found():
  assert "README.md" in PAGES and any(p.startswith("docs/") for p in PAGES)


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_resolve(page):
  problems = broken_links(page)
  assert not problems, "broken links:\n" + "\n".join(problems)


def test_checker_reports_broken_links(tmp_path):
  """The checker itself: a page with good and bad links of every kind gets
  exactly the bad ones, by line and target."""
  (tmp_path / "docs").mkdir()
  (tmp_path / "docs" / "b.md").write_text(
      "# Page B\n\n## Recipes: what each `paper` variant reproduces\n\n"
      "## Repeated\n\n## Repeated\n\n```text\n# not a heading\n```\n")
  (tmp_path / "img.png").write_bytes(b"")
  (tmp_path / "README.md").write_text("\n".join([
      "# Top",                                                    # 1
      "[ok](docs/b.md) ![ok](img.png) [ok](docs/) [ok](#top)",    # 2
      "[ok](docs/b.md#recipes-what-each-paper-variant-reproduces)",  # 3
      "[ok](docs/b.md#repeated-1) [web](https://example.org/x.md#nope)",  # 4
      "[bad](docs/missing.md)",                                   # 5
      "[bad](docs/b.md#not-a-heading) [bad](#nowhere)",           # 6
      "`[in code](nope.md)` [bad](../outside.md)",                # 7
      "```bash", "[in a block](nope.md)", "```",                  # 8-10
      "[bad](docs/b.md#repeated-2)",                              # 11
  ]) + "\n")
  found = broken_links("README.md", root=str(tmp_path))
  assert [p.split(" (")[0] for p in found] == [
      "README.md:5: docs/missing.md",
      "README.md:6: docs/b.md#not-a-heading",
      "README.md:6: #nowhere",
      "README.md:7: ../outside.md",
      "README.md:11: docs/b.md#repeated-2",
  ], found


def test_slug_matches_github():
  assert slug("Recipes: what each paper variant reproduces") == \
      "recipes-what-each-paper-variant-reproduces"
  assert slug("XLA:CPU flags of the image experiments") == \
      "xlacpu-flags-of-the-image-experiments"
  assert slug("Standard AutoAttack vs torchattacks (benchmarks/autoattack.py)") \
      == "standard-autoattack-vs-torchattacks-benchmarksautoattackpy"
  assert slug("The teacher–student study") == "the-teacherstudent-study"
  assert slug("`seed_sweep` and *friends*") == "seed_sweep-and-friends"
