"""The README's quickstart runs and does what its comments say."""

import re
from pathlib import Path

import numpy as np

README = Path(__file__).parent.parent / "README.md"


def test_quickstart_runs(capsys):
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
  assert blocks, "the README has no python block"
  namespace = {}
  exec(compile(blocks[0], "README.md", "exec"), namespace)
  state, info, u = namespace["state"], namespace["info"], namespace["u"]
  assert abs(float(state.u)) < 0.01
  np.testing.assert_allclose(np.sort(np.abs(np.asarray(state.beams))), 0.5, atol=1e-6)
  assert float(info.certificate[-1]) < 1e-3
  assert abs(float(u)) < 0.05


def test_readme_opens_with_the_two_commands():
  text = README.read_text()
  commands = re.findall(r"```bash\n(.*?)```", text, flags=re.S)[0].strip().splitlines()
  assert commands[0].startswith('pip install -e ".[bench]" && python -m benchmarks all --quick')
  assert commands[1].startswith('pip install -e ".[test]" && python -m pytest')
  ci = (README.parent / ".ci" / "run").read_text()
  assert 'pip install -e ".[test]" && python -m pytest' in ci


def test_flax_beams_example_runs():
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
  example = next(b for b in blocks if "stack_modules" in b)
  namespace = {}
  exec(compile(example, "README.md", "exec"), namespace)
  assert namespace["scores"].shape == (5, 1, 1)
  values = np.asarray(namespace["info"].values)
  assert values.shape == (300, 5) and np.all(np.isfinite(values))
