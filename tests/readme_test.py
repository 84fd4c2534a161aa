"""The Python examples of README.md and docs/ run as written, each alone.

A fresh process, as a user's would be: strategies built earlier in the test
process (and its virtual CPU devices) would share its collective state.
"""

import glob
import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # Not in the fast subset (pytest.ini).

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCKS = []
for _path in [os.path.join(ROOT, 'README.md'),
              *sorted(glob.glob(os.path.join(ROOT, 'docs', '*.md')))]:
  with open(_path) as _f:
    BLOCKS += re.findall(r'```python\n(.*?)```', _f.read(), re.S)


def test_readme_has_examples():
  assert len(BLOCKS) >= 2


@pytest.mark.parametrize('block', BLOCKS, ids=lambda b: b.splitlines()[0])
def test_python_block_runs(block, tmp_path):
  script = tmp_path / 'example.py'
  script.write_text(block)
  # TMPDIR: what an example writes to a temporary directory goes with
  # tmp_path (docs/api.md saves a model there).
  env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL='2',
             JAX_PLATFORMS='cpu', TMPDIR=str(tmp_path))
  run = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
