"""main.py as users run it: flags, the workdir it fills, stray arguments."""

import importlib.metadata
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import tensorflow as tf

from sam import input_pipeline
from tests.conftest import ROOT
from tests.conftest import TINY

pytestmark = pytest.mark.slow  # Not in the fast subset (pytest.ini).


def _main(*args, quiet=True, config='configs/default.py', **environ):
  env = dict(os.environ, JAX_PLATFORMS='cpu', **environ)
  env.pop('TF_CPP_MIN_LOG_LEVEL', None)  # main.py's own default.
  if not quiet:
    env['TF_CPP_MIN_LOG_LEVEL'] = '0'
  return subprocess.run(
      [sys.executable, 'main.py', f'--config={config}', *args],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_stray_arguments_are_refused(tmp_path):
  run = _main(f'--workdir={tmp_path}', 'extra', *TINY)
  assert run.returncode != 0
  assert 'Unexpected arguments' in run.stderr
  assert not os.path.exists(tmp_path / 'checkpoints')


def test_workdir_is_required():
  run = _main(*TINY)
  assert run.returncode != 0
  assert 'workdir' in run.stderr


@pytest.mark.parametrize('workdir,message', [
    ('', '--workdir is empty (an unset shell variable?)'),
    ('.', '--workdir=. is the checkout itself'),
    ('README.md', '--workdir=README.md is a file')])
def test_a_workdir_that_is_no_place_for_a_run_is_one_line(workdir, message):
  """main.py runs in the checkout (ROOT): nothing may be written there."""
  before = sorted(os.listdir(ROOT))
  run = _main(f'--workdir={workdir}', *TINY)
  assert run.returncode == 1
  assert run.stderr.strip().splitlines()[-1].startswith(f'Error: {message}')
  assert 'Traceback' not in run.stderr
  assert sorted(os.listdir(ROOT)) == before


def test_bad_override_names_the_field(tmp_path):
  run = _main(f'--workdir={tmp_path}', *TINY, '--config.sam.rho=-1')
  assert run.returncode != 0
  assert 'config.sam.rho' in run.stderr


@pytest.mark.parametrize('config,override,message', [
    ('configs/nope.py', [], "Error: --config: [Errno 2] No such file or "
     "directory: 'configs/nope.py'"),
    ('configs/default.py', ['--config.sam.rhoo=1'],
     """Error: --config: no field 'rhoo' in the config. Did you mean "rho" """),
    ('configs/default.py', ['--config.sam.rho=abc'],
     "flag --config.sam.rho=abc: could not convert string to float"),
])
def test_a_bad_config_file_or_field_is_one_line(tmp_path, config, override,
                                                 message):
  run = _main(f'--workdir={tmp_path}', *override, config=config)
  assert run.returncode == 1
  assert message in run.stderr
  assert 'Traceback' not in run.stderr
  assert not os.listdir(tmp_path)  # Refused before anything is written.


# What the `tensorflow` wheel with CUDA prints as it loads, before main.py can
# set a level, on a machine without a GPU (a failed cuInit). The README's
# `tensorflow-cpu` prints none of it: there, nothing is excused.
CUDA_WHEEL_START_UP = (
    'All log messages before absl::InitializeLog() is called',
    'cudart_stub.cc', '] failed call to cuInit: ', 'cpu_feature_guard.cc',
    'To enable the following instructions:', 'oneDNN custom operations')


def _tensorflow_wheel() -> str:
  for name in ('tensorflow-cpu', 'tensorflow-tpu', 'tensorflow'):
    try:
      importlib.metadata.version(name)
      return name
    except importlib.metadata.PackageNotFoundError:
      pass
  return ''


def _loud(stderr: str) -> list[str]:
  """Console lines at warning or error level (but the CUDA wheel's start-up);
  with the README's wheel, any line of TensorFlow's C++ (I0000: before its
  log is set up)."""
  cpu_wheel = _tensorflow_wheel() == 'tensorflow-cpu'
  known = () if cpu_wheel else CUDA_WHEEL_START_UP
  pattern = r'[WEF]\d{4} |WARNING|ERROR|Traceback' + ('|I0000 ' * cpu_wheel)
  return [line for line in stderr.splitlines()
          if re.match(pattern, line) and not any(k in line for k in known)]


# A C++ INFO line as TensorFlow loads, on any CPU where oneDNN is asked for
# (unasked only on some CPUs, e.g. an AMD EPYC with AVX512_VNNI, 2026-12-07).
ONEDNN = {'TF_ENABLE_ONEDNN_OPTS': '1'}
ONEDNN_LINE = 'oneDNN custom operations are on'


def test_two_steps_fill_the_workdir_and_a_quiet_console(tmp_path):
  run = _main(f'--workdir={tmp_path}', *TINY, **ONEDNN)
  assert run.returncode == 0, run.stderr[-3000:]
  with open(tmp_path / 'results.json') as f:
    assert json.load(f)['step'] == 2
  assert os.path.exists(tmp_path / 'config.json')
  assert any(n.startswith('events.out.tfevents') for n in os.listdir(tmp_path))
  assert os.listdir(tmp_path / 'checkpoints')
  log = (tmp_path / 'log.txt').read_text()
  assert 'Final test accuracy' in log and 'Config:' in log
  assert 'Final test accuracy' in run.stderr
  assert not _loud(run.stderr)
  # TensorFlow's Python INFO lines (one per checkpoint here) stay out, and
  # its C++ notices as it loads: 2.21 prints them before it reads
  # TF_CPP_MIN_LOG_LEVEL (sam/start_up.py holds them). The workdir's log
  # keeps both, for debugging.
  assert 'Sharding callback' not in run.stderr
  assert ONEDNN_LINE not in run.stderr
  assert 'Sharding callback' in log
  if tuple(map(int, tf.__version__.split('.')[:2])) >= (2, 21):
    assert 'Held off the console as TensorFlow loaded: I' in log
    assert ONEDNN_LINE in log


def test_tf_info_brings_tensorflow_lines_back(tmp_path):
  loud = _main(f'--workdir={tmp_path}', '--tf_info', *TINY, quiet=False)
  assert loud.returncode == 0, loud.stderr[-3000:]
  assert 'Sharding callback' in loud.stderr


@pytest.mark.skipif(not os.path.isdir(input_pipeline.FASHION_MNIST_DIR),
                    reason='Debian package dataset-fashion-mnist is not '
                    'installed')
def test_the_readme_first_command_has_a_quiet_console(tmp_path):
  """The README's first set-up command's main.py line, for 4 steps."""
  with open(os.path.join(ROOT, 'README.md')) as f:
    setup, = [line for line in f if line.startswith(
        'apt-get install -y dataset-fashion-mnist')]
  command, = [part for part in setup.split('&&') if ' main.py ' in part]
  args = [a for a in shlex.split(command)[2:]
          if not a.startswith('--workdir=')]
  run = subprocess.run(
      [sys.executable, 'main.py', *args, f'--workdir={tmp_path}',
       '--config.num_train_steps=4', '--config.steps_per_loop=2'],
      cwd=ROOT, env=dict(os.environ), capture_output=True, text=True,
      timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  assert 'Final test accuracy' in run.stderr
  assert not _loud(run.stderr)
