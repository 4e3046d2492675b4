"""Every ```python block of the README and of the documentation pages (docs/pages/**/*.md)
runs on its own, as a standalone script in a fresh process, and the examples do what their
comments say.

A block that appears word for word in several files (the quickstart: README.md and the
site's home page) runs once, under its first place. A block whose first line is
``# needs data: ...`` is skipped when ``KBEAM_JAX_DATA`` is unset; a block whose first line
is ``# readme-test: skip, <reason>`` is skipped with that reason (for a block waiting on an
API change).
"""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"
PAGES = ROOT / "docs" / "pages"


def markdown_files() -> list[Path]:
  """README.md, then every documentation page in path order."""
  return [README] + sorted(PAGES.rglob("*.md"))


def python_blocks(path: Path) -> list[tuple[int, str]]:
  """``(line number, code)`` of every ```python block of one file."""
  text = path.read_text()
  return [
    (text[: m.start()].count("\n") + 2, m.group(1))
    for m in re.finditer(r"```python\n(.*?)```", text, flags=re.S)
  ]


def all_blocks() -> list[tuple[str, int, str]]:
  """``(file, line, code)`` of every distinct block, under the first place it appears."""
  seen, blocks = set(), []
  for path in markdown_files():
    for line, code in python_blocks(path):
      if code not in seen:
        seen.add(code)
        blocks.append((str(path.relative_to(ROOT)), line, code))
  return blocks


# Checks appended to a block (found by a string it contains): what its comments promise.
CHECKS = {
  "anti-saddle: no saddle point": """
    import numpy as np
    assert abs(float(state.u)) < 0.01
    np.testing.assert_allclose(np.sort(np.abs(np.asarray(state.beams))), 0.5, atol=1e-6)
    assert float(info.certificate[-1]) < 1e-3
    assert abs(float(u)) < 0.05
  """,
  "nn.stack_modules(Critic": """
    import numpy as np
    assert scores.shape == (5, 1, 1)
    values = np.asarray(info.values)
    assert values.shape == (300, 5) and np.all(np.isfinite(values))
  """,
  "nn.update_without_grads(optimizer": """
    import numpy as np
    assert int(optimizer.step[...]) == 100
    values = nn.optimizer_state(optimizer, "values")
    assert isinstance(values, jax.Array) and values.shape == (4,)
    assert np.all(np.isfinite(np.asarray(values)))
  """,
  "parallel.make_mesh(beams=1)": """
    import numpy as np
    assert state.beams.shape == (8, 2)
    assert np.all(np.isfinite(np.asarray(info.values)))
  """,
  "adversarial.objective(classifier, attacker, penalty=0.1)": """
    import numpy as np
    assert info.values.shape == (5,) and np.all(np.isfinite(np.asarray(info.values)))
  """,
  "print(jax.hessian(F)(u))": """
    import numpy as np
    np.testing.assert_allclose(jax.grad(F)(u), jax.jacfwd(F)(u), rtol=1e-10)
    H = jax.hessian(F)(u)
    np.testing.assert_allclose(H, H.T, rtol=1e-8)
  """,
  "solve=closed_form": """
    import numpy as np
    steps = lambda l2: jnp.mean((x @ bilevel.argmin(ridge, l2, jnp.zeros(8), x, y,
      method=bilevel.RMD(), inner_steps=3000, inner_lr=0.5) - y) ** 2)
    np.testing.assert_allclose(jax.grad(val_loss)(1.0), jax.grad(steps)(1.0), rtol=1e-3)
  """,
  "prox=soft_threshold": """
    import numpy as np
    assert np.isfinite(float(jax.grad(val)(jnp.log(0.1))))
  """,
  "inner_lr=2.5, throw=True": """
    assert bool(out.info.diverging)
    assert "inner_lr 2.5 is above 2/λ_max ≈ 2" in message, message
    assert abs(float(bilevel.max_curvature(g, u, v0)) - 1.0) < 1e-5
  """,
  "class JacobiCG(bilevel.Implicit)": """
    import numpy as np
    np.testing.assert_allclose(out.grad, [1.0, 0.01], rtol=1e-4)
  """,
  "examples.matching_pennies()": """
    import numpy as np
    assert float(jnp.abs(jnp.stack(state.players)).max()) < 1e-3  # the last one: SOS
  """,
  "def y_star(x):  # level 2": """
    import numpy as np
    P3 = np.linalg.solve(np.eye(3) + np.asarray(D), np.asarray(B))
    P2 = np.linalg.solve(np.eye(3) + P3.T @ P3, np.asarray(A))
    p2 = np.linalg.solve(np.eye(3) + P3.T @ P3, P3.T @ np.asarray(d))
    x_star = np.linalg.solve(np.eye(3) + P2.T @ P2, np.asarray(a) + P2.T @ (np.asarray(c) - p2))
    np.testing.assert_allclose(x, x_star, atol=1e-5)
  """,
  '"penalty": bilevel.penalty(f, g': """
    import numpy as np
    np.testing.assert_allclose(state.u, 0.5, atol=1e-3)
  """,
}


def test_every_block_is_found_and_checks_match_blocks():
  blocks = [code for _, _, code in all_blocks()]
  assert len(blocks) >= 15, "the README and the pages have fewer python blocks than expected"
  assert python_blocks(README), "the README has no quickstart block"
  for key in CHECKS:
    assert sum(key in code for code in blocks) == 1, key


def test_readme_blocks_are_on_the_site_too():
  """The README is the short front page: every example it shows is also on a page."""
  pages = [code for path in markdown_files()[1:] for _, code in python_blocks(path)]
  for line, code in python_blocks(README):
    assert code in pages, f"README.md line {line}: the block is on no page of docs/pages/"


@pytest.mark.parametrize(
  "file, line, code",
  [
    pytest.param(file, line, code, id=f"{file.removeprefix('docs/pages/')}:{line}")
    for file, line, code in all_blocks()
  ],
)
def test_block_runs_standalone(file, line, code, tmp_path):
  first = code.splitlines()[0]
  if first.startswith("# readme-test: skip"):
    pytest.skip(f"{file} line {line}: {first.split('skip', 1)[1].strip(' ,:')}")
  if first.startswith("# needs data") and not os.environ.get("KBEAM_JAX_DATA"):
    pytest.skip(f"{file} line {line} reads data files: set KBEAM_JAX_DATA to run it")
  script = code + "".join(textwrap.dedent(c) for k, c in CHECKS.items() if k in code)
  (tmp_path / "block.py").write_text(script)
  path = [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))  # this checkout's kbeam_jax
  if env.get("KBEAM_JAX_DATA"):  # CI sets it relative to the repository; the block runs elsewhere
    env["KBEAM_JAX_DATA"] = os.path.abspath(env["KBEAM_JAX_DATA"])
  result = subprocess.run(
    [sys.executable, "block.py"],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, f"{file} block at line {line} failed:\n{result.stderr[-3000:]}"


def test_readme_opens_with_the_two_commands():
  text = README.read_text()
  commands = re.findall(r"```bash\n(.*?)```", text, flags=re.S)[0].strip().splitlines()
  assert commands[0].startswith('pip install -e ".[bench]" && python -m benchmarks all --quick')
  assert commands[1].startswith('pip install -e ".[test]" && python -m pytest')
  ci = (README.parent / ".ci" / "run").read_text()
  assert 'pip install -e ".[test]" && python -m pytest' in ci


def test_readme_stays_short_and_says_how_to_build_the_docs():
  text = README.read_text()
  assert len(text.splitlines()) <= 250, "the README is the front page: the long text is in docs/"
  assert "mkdocs serve -f docs/mkdocs.yml" in text and "mkdocs build --strict" in text
  home = (PAGES / "index.md").read_text()
  assert (
    re.findall(r"```bash\n(.*?)```", home, flags=re.S)[0]
    == re.findall(r"```bash\n(.*?)```", text, flags=re.S)[0]
  ), "the site's home page shows the README's two commands"
