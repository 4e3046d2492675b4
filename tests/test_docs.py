"""The documentation site's sources stay complete: every public module has an API page, every
page is in the nav and every nav entry is a page, and every file a page includes exists (the
site itself is built by .ci/run: ``mkdocs build --strict -f docs/mkdocs.yml``; the pages'
python blocks run in tests/test_readme.py)."""

import re
import types
from pathlib import Path

import kbeam_jax
import kbeam_jax.tasks

ROOT = Path(__file__).resolve().parent.parent
PAGES = ROOT / "docs" / "pages"


def test_every_public_module_has_an_api_page():
  api = {p.name: p.read_text() for p in (PAGES / "api").glob("*.md")}
  modules = [n for n in kbeam_jax.__all__ if isinstance(getattr(kbeam_jax, n), types.ModuleType)]
  assert modules, "kbeam_jax.__all__ lists no modules"
  for name in modules:
    assert f"::: kbeam_jax.{name}" in api.get(f"{name}.md", ""), f"docs/pages/api/{name}.md"
  for name in kbeam_jax.tasks._MODULES:
    assert f"::: kbeam_jax.tasks.{name}\n" in api["tasks.md"], f"tasks.{name} missing"
  top = api["kbeam_jax.md"]
  for name in kbeam_jax.__all__:
    obj = getattr(kbeam_jax, name)
    if not isinstance(obj, types.ModuleType) and getattr(obj, "__module__", "").startswith(
      "kbeam_jax._"
    ):
      assert f"::: kbeam_jax.{name}" in top, f"kbeam_jax.{name} missing from the API page"


def nav_pages() -> list[str]:
  """The pages the nav of docs/mkdocs.yml names, as paths under docs/pages."""
  nav = (ROOT / "docs" / "mkdocs.yml").read_text().split("\nnav:\n", 1)[1]
  nav = nav[: re.search(r"^\S", nav, flags=re.M).start()]  # up to the next top-level key
  return re.findall(r"^\s+- (?:[^\n]*: )?(\S+\.md)$", nav, flags=re.M)


def test_nav_and_pages_agree():
  nav = nav_pages()
  assert "index.md" in nav and "guide/bilevel.md" in nav and "benchmarks/index.md" in nav, nav
  assert len(nav) == len(set(nav)), "a page is in the nav twice"
  for page in nav:
    assert (PAGES / page).is_file(), f"the nav names docs/pages/{page}, which does not exist"
  for page in PAGES.rglob("*.md"):
    assert str(page.relative_to(PAGES)) in nav, f"{page} is not in the nav"


def test_included_files_exist():
  """A page may include a file (the changelog does) with pymdownx.snippets; the file, and the
  section when one is named, must exist. The guide no longer includes README sections: the
  pages hold their own text."""
  for page in PAGES.rglob("*.md"):
    for file, section in re.findall(r'--8<-- "([^":]+)(?::([^"]+))?"', page.read_text()):
      assert file != "README.md", f"{page} includes the README; move the text into the page"
      assert (ROOT / file).is_file(), f"{page} includes {file}, which does not exist"
      if section:
        text = (ROOT / file).read_text()
        for edge in ("start", "end"):
          assert f"--8<-- [{edge}:{section}]" in text, f"{file} lacks {edge}:{section}"
