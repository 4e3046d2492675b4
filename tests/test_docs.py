"""The documentation site's sources stay complete: every public module has an API page, and
every README section a guide page includes exists (the site itself is built by .ci/run:
``mkdocs build --strict -f docs/mkdocs.yml``)."""

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


def test_included_readme_sections_exist_and_pages_are_in_the_nav():
  readme = (ROOT / "README.md").read_text()
  nav = (ROOT / "docs" / "mkdocs.yml").read_text()
  for page in PAGES.rglob("*.md"):
    assert str(page.relative_to(PAGES)) in nav, f"{page} is not in the nav"
    for file, section in re.findall(r'--8<-- "([^":]+):([^"]+)"', page.read_text()):
      assert file == "README.md"
      for edge in ("start", "end"):
        assert f"<!-- --8<-- [{edge}:{section}] -->" in readme, f"README lacks {edge}:{section}"
