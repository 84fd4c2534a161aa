"""TensorFlow's notices as it loads: held off the console (sam/start_up.py).

Whether TensorFlow prints any depends on the CPU (where oneDNN is on by
default) or on TF_ENABLE_ONEDNN_OPTS=1, which main_test.py's console test
sets; here a process writes the lines TensorFlow 2.21 wrote on such a
machine into its own stderr.
"""

import io
import os
import subprocess
import sys

import pytest

from sam import start_up
from tests.conftest import ROOT

# main.py's stderr while tensorflow-cpu 2.21 loaded, TF_CPP_MIN_LOG_LEVEL=2,
# on an AMD EPYC with AVX512_VNNI and AVX512_BF16 (2026-12-07).
LOADING = (
    'WARNING: All log messages before absl::InitializeLog() is called are '
    'written to STDERR\n'
    'I0000 00:00:1796631568.941801   25907 port.cc:153] oneDNN custom '
    'operations are on. You may see slightly different numerical results due '
    'to floating-point round-off errors from different computation orders. '
    'To turn them off, set the environment variable '
    '`TF_ENABLE_ONEDNN_OPTS=0`.\n')
# What must still reach the console: errors, and what is no C++ log line.
KEPT = ('E0000 00:00:1796631568.941900   25907 cuda_executor.cc:1] failed '
        'call to cuInit\n'
        '/x/site-packages/keras/src/export.py:1: UserWarning: a warning\n')


@pytest.mark.parametrize('below,held,shown', [
    (2, LOADING, KEPT), (1, LOADING.splitlines(True)[1], LOADING.split(
        '\n', 1)[0] + '\n' + KEPT), (0, '', LOADING + KEPT)])
def test_lines_below_the_level_are_held(below, held, shown):
  console, kept = io.BytesIO(), io.BytesIO()
  start_up.split(io.BytesIO((LOADING + KEPT).encode()), console, kept, below)
  assert kept.getvalue().decode() == held
  assert console.getvalue().decode() == shown


@pytest.mark.parametrize('value,expected', [
    (None, 0), ('2', 2), (' 1 ', 1), ('', 0), ('x', 0)])
def test_min_level_is_0_unless_a_number(value, expected):
  environ = {} if value is None else {'TF_CPP_MIN_LOG_LEVEL': value}
  assert start_up.min_level(environ) == expected


def _process(code: str, level: str) -> subprocess.CompletedProcess:
  """Python (no TensorFlow) holding its stderr while `code` writes to it."""
  script = ('import os, sys\n'
            'from sam import start_up\n'
            'loading = start_up.Held()\n'
            f'os.write(2, {(LOADING + KEPT).encode()!r})\n'
            f'{code}\n'
            'print(loading.lines())\n')
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=level, PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, '-c', script], env=env,
                        capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize('level', ['2', '0'])
def test_a_process_keeps_its_console_for_its_own_lines(level):
  run = _process("print('after', file=sys.stderr)", level)
  assert run.returncode == 0, run.stderr
  held = LOADING.splitlines() if level == '2' else []
  assert run.stdout == f'{held}\n'
  assert run.stderr == (LOADING * (level == '0')) + KEPT + 'after\n'


def test_what_comes_before_an_abort_reaches_the_console():
  run = _process(r"os.write(2, b'F0000 00:00:1.0 1 tpu.cc:1] no TPU\n'); "
                 'os.abort()', '2')
  assert run.returncode < 0
  assert run.stderr == KEPT + 'F0000 00:00:1.0 1 tpu.cc:1] no TPU\n'
