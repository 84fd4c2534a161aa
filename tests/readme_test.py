"""The README's Python example runs as written."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_python_blocks_run():
  with open(os.path.join(ROOT, 'README.md')) as f:
    blocks = re.findall(r'```python\n(.*?)```', f.read(), re.S)
  assert blocks
  for block in blocks:
    exec(compile(block, 'README.md', 'exec'), {})  # pylint: disable=exec-used
