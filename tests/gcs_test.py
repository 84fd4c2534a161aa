"""main.py with a gs:// workdir, against a GCS emulator on loopback.

TensorFlow's own gs:// filesystem does the I/O, exactly as on a TPU VM; only
its HTTPS traffic is routed to fake-gcs-server (see tests/gcs_fixture.py).
What landed is read back from the emulator, never through TensorFlow.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import tensorflow as tf

from tests import gcs_fixture
from tests.conftest import ROOT
from tests.conftest import TINY

pytestmark = pytest.mark.slow  # Not in the fast subset (pytest.ini).

# Long enough that SIGTERM lands mid-run: the first loop (tracing) takes
# seconds, the next 290 steps well under one on this model.
_FLAGS = ['--config.num_train_steps=300', '--config.steps_per_loop=10',
          '--config.log_every_steps=10', '--config.schedule.name=constant',
          '--config.checkpoint_every_steps=100000',
          '--config.eval_every_steps=100000']


@pytest.fixture(name='gcs', scope='module')
def gcs_fixture_():
  try:
    with gcs_fixture.start() as gcs:
      yield gcs
  except gcs_fixture.EmulatorUnavailable as e:
    pytest.skip(f'No GCS emulator: {e}')


class _Run:
  """main.py in a subprocess; its output is collected as it comes."""

  def __init__(self, workdir, env, *flags):
    self.process = subprocess.Popen(
        [sys.executable, 'main.py', '--config=configs/default.py',
         f'--workdir={workdir}', *TINY, *flags],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', JAX_PLATFORMS='cpu',
                 **env))
    self._lines = []
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self):
    for line in self.process.stdout:
      self._lines.append(line)

  def wait_for(self, text: str, timeout: float):
    deadline = time.monotonic() + timeout
    while not any(text in line for line in self._lines):
      assert time.monotonic() < deadline, self.output()[-3000:]
      assert self.process.poll() is None, self.output()[-3000:]
      time.sleep(0.02)

  def finish(self, timeout: float = 240) -> str:
    try:
      self.process.wait(timeout=timeout)
    finally:
      self.process.kill()  # A no-op unless the wait timed out.
      self._reader.join(timeout=10)
    return self.output()

  def output(self) -> str:
    return ''.join(self._lines)


def _weights(prefix: str) -> dict[str, np.ndarray]:
  reader = tf.train.load_checkpoint(prefix)
  return {n: reader.get_tensor(n) for n in reader.get_variable_to_shape_map()
          if 'VARIABLE_VALUE' in n and 'save_counter' not in n}


def test_gs_workdir_is_filled_and_resumed_after_sigterm(gcs, tmp_path):
  workdir = gcs.url('run')
  reference = _Run(tmp_path / 'local', {}, *_FLAGS)
  run = _Run(workdir, gcs.env, *_FLAGS)
  run.wait_for('[10] train/', timeout=240)
  run.process.send_signal(signal.SIGTERM)
  out = run.finish()
  assert run.process.returncode == 0, out[-3000:]
  assert 'Stopped by SIGTERM' in out
  names = gcs.objects('run/')
  steps = [int(n.split('-')[-1].split('.')[0]) for n in names
           if n.startswith('run/checkpoints/ckpt-') and n.endswith('.index')]
  assert len(steps) == 1 and 10 <= steps[0] < 300, names
  assert 'run/results.json' not in names
  # The log is uploaded when the run closes it, SIGTERM or not.
  assert 'Stopped by SIGTERM' in gcs.read('run/log.txt').decode()

  resumed = _Run(workdir, gcs.env, *_FLAGS)
  out = resumed.finish()
  assert resumed.process.returncode == 0, out[-3000:]
  assert f'Resumed from {workdir}/checkpoints/ckpt-{steps[0]}' in out
  names = gcs.objects('run/')
  for name in ('run/config.json', 'run/log.txt', 'run/results.json',
               'run/checkpoints/checkpoint',
               'run/checkpoints/ckpt-300.index'):
    assert name in names, names
  assert sum('events.out.tfevents' in n for n in names) == 2, names
  assert json.loads(gcs.read('run/results.json'))['step'] == 300
  assert json.loads(gcs.read('run/config.json'))['num_train_steps'] == 300
  log = gcs.read('run/log.txt').decode()
  assert 'Resumed from' in log and 'Final test accuracy' in log

  # Summaries written through the gs:// filesystem are readable.
  local = gcs.download('run/', str(tmp_path / 'copy'))
  tags = {value.tag
          for name in os.listdir(local) if 'tfevents' in name
          for event in tf.compat.v1.train.summary_iterator(
              os.path.join(local, name))
          for value in event.summary.value}
  assert {'train/loss', 'train/grad_norm', 'eval/accuracy'} <= tags, tags

  # Interrupted on GCS and resumed = never interrupted, on local disk.
  out = reference.finish()
  assert reference.process.returncode == 0, out[-3000:]
  ours = _weights(os.path.join(local, 'checkpoints', 'ckpt-300'))
  theirs = _weights(str(tmp_path / 'local' / 'checkpoints' / 'ckpt-300'))
  assert sorted(ours) == sorted(theirs) and ours
  for name in ours:
    np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-6,
                               atol=1e-7, err_msg=name)


def test_second_run_on_a_live_gs_workdir_is_refused(gcs):
  workdir = gcs.url('locked')
  flags = ['--config.num_train_steps=100000', *_FLAGS[1:]]
  first = _Run(workdir, gcs.env, *flags)
  try:
    first.wait_for('[10] train/', timeout=240)
    lease = json.loads(gcs.read('locked/lock.json'))
    assert lease['owner'].startswith(f'pid {first.process.pid} ')
    config = gcs.read('locked/config.json')
    second = _Run(workdir, gcs.env, *flags, '--config.sam.rho=0')
    out = second.finish(timeout=240)
    assert second.process.returncode == 1, out[-3000:]
    assert (f'Error: --workdir={workdir} is in use by another run (pid '
            f'{first.process.pid} ') in out
    assert 'Traceback' not in out
    assert gcs.read('locked/config.json') == config
  finally:
    first.process.send_signal(signal.SIGTERM)
    out = first.finish()
  assert first.process.returncode == 0, out[-3000:]
  assert 'locked/lock.json' not in gcs.objects('locked/')  # Released.


def test_missing_bucket_fails_fast(gcs):
  run = _Run('gs://no-such-bucket/run', gcs.env)
  out = run.finish(timeout=120)
  assert run.process.returncode == 1, out[-3000:]
  assert ('Error: Cannot write to --workdir=gs://no-such-bucket/run (the '
          'bucket gs://no-such-bucket does not exist)') in out
  assert 'Traceback' not in out


def test_no_network_is_one_line_not_a_missing_bucket(gcs):
  dead_proxy = dict(gcs.env, HTTPS_PROXY='http://127.0.0.1:9')  # discard
  run = _Run('gs://bucket/run', dead_proxy)
  out = run.finish(timeout=120)
  assert run.process.returncode == 1, out[-3000:]
  assert ('Error: Cannot write to --workdir=gs://bucket/run (cannot reach '
          'Cloud Storage through http://127.0.0.1:9') in out
  assert 'Traceback' not in out
