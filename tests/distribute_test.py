"""Strategy selection, with the TPU resolver faked."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import tensorflow as tf

from sam import distribute
from sam import stopping
from tests.conftest import ROOT
from tests.conftest import TINY


@pytest.fixture(name='machine')
def machine_fixture(monkeypatch):
  """A machine with no TPU devices, no TF_CONFIG, no TPU_NAME, no GPU."""
  devices = []
  monkeypatch.setattr(distribute.glob, 'glob',
                      lambda p: [d for d in devices if d.startswith(p[:9])])
  monkeypatch.delenv('TF_CONFIG', raising=False)
  monkeypatch.delenv('TPU_NAME', raising=False)
  monkeypatch.setattr(tf.config, 'list_physical_devices',
                      lambda kind=None: [])
  return devices


def test_auto_picks_by_machine(machine, monkeypatch):
  assert distribute.resolve_name('auto') == 'default'
  monkeypatch.setattr(tf.config, 'list_physical_devices',
                      lambda kind=None: ['gpu0'] if kind == 'GPU' else [])
  assert distribute.resolve_name('auto') == 'mirrored'
  monkeypatch.setenv('TF_CONFIG', '{"cluster": {}}')
  assert distribute.resolve_name('auto') == 'multi_worker'
  machine.append('/dev/accel0')
  assert distribute.resolve_name('auto') == 'tpu'
  assert distribute.resolve_name('default') == 'default'


@pytest.mark.parametrize('value', ['{"cluster": ', '[1, 2]', 'worker0:2222'])
def test_tf_config_that_is_no_json_object_names_it(machine, monkeypatch,
                                                   value):
  del machine
  monkeypatch.setenv('TF_CONFIG', value)
  with pytest.raises(ValueError, match=r'TF_CONFIG=.* is invalid .*unset it'):
    distribute.resolve_name('auto')


def test_unknown_strategy_names_the_field():
  with pytest.raises(ValueError, match='config.strategy'):
    distribute.resolve_name('horovod')


def test_tpu_on_a_vm_uses_the_local_resolver(machine, monkeypatch):
  machine.append('/dev/vfio/0')
  calls = []

  class FakeResolver:

    def __init__(self, tpu):
      calls.append(('resolver', tpu))

  monkeypatch.setattr(tf.distribute.cluster_resolver, 'TPUClusterResolver',
                      FakeResolver)
  monkeypatch.setattr(tf.config, 'experimental_connect_to_cluster',
                      lambda r: calls.append('connect'))
  monkeypatch.setattr(tf.tpu.experimental, 'initialize_tpu_system',
                      lambda r: calls.append('initialize'))

  class Counted(tuple):
    num_replicas_in_sync = 8

  monkeypatch.setattr(tf.distribute, 'TPUStrategy',
                      lambda r: Counted(('tpu', type(r).__name__)))
  strategy = distribute.create_strategy('auto')
  assert strategy == ('tpu', 'FakeResolver')
  assert calls == [('resolver', 'local'), 'connect', 'initialize']


def test_tpu_init_failure_is_explained(machine, monkeypatch):
  def broken(tpu):
    raise ValueError('Please provide a TPU Name to connect to.')

  monkeypatch.setattr(tf.distribute.cluster_resolver, 'TPUClusterResolver',
                      broken)
  with pytest.raises(ValueError, match="config.tpu='my-tpu'.*runtime version"):
    distribute.create_strategy('tpu', tpu='my-tpu')


@pytest.mark.slow
def test_tpu_requested_here_exits_1_at_once(tmp_path):
  start = time.time()
  run = subprocess.run(
      [sys.executable, 'main.py', '--config=configs/default.py',
       f'--workdir={tmp_path}', '--config.strategy=tpu', *TINY],
      cwd=ROOT, capture_output=True, text=True, timeout=120,
      env={k: v for k, v in os.environ.items()
           if k not in ('TPU_NAME', 'TF_CONFIG')})
  assert run.returncode == 1
  assert 'no TPU VM' in run.stderr and 'Traceback' not in run.stderr
  assert time.time() - start < 60


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _tf_config(ports, index):
  return {'cluster': {'worker': [f'127.0.0.1:{p}' for p in ports]},
          'task': {'type': 'worker', 'index': index}}


def test_peers_that_start_apart_find_each_other():
  ports = [_free_port() for _ in range(3)]
  errors, servers = [], []

  def task(index, delay):
    time.sleep(delay)
    try:
      distribute.wait_for_peers(_tf_config(ports, index), timeout_secs=30)
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)
    # Then TensorFlow's server takes the port over, until all are done.
    servers.append(socket.create_server(('', ports[index])))

  threads = [threading.Thread(target=task, args=(i, 1.5 * i))
             for i in range(3)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=60)
  for server in servers:
    server.close()
  assert not errors and not any(t.is_alive() for t in threads)


def test_a_stale_tf_config_times_out_naming_the_missing_task():
  ports = [_free_port(), _free_port()]
  start = time.monotonic()
  with pytest.raises(distribute.PeersMissingError,
                     match=rf'Waited 1.5 s for the other tasks in TF_CONFIG; '
                     rf'these never answered: worker 1 \(127.0.0.1:{ports[1]}'
                     r'\).*multi_worker_timeout_secs'):
    distribute.wait_for_peers(_tf_config(ports, 0), timeout_secs=1.5)
  assert time.monotonic() - start < 10


def test_a_taken_port_or_a_task_not_in_the_cluster_is_one_line():
  with socket.create_server(('', 0)) as taken:
    port = taken.getsockname()[1]
    with pytest.raises(ValueError, match=f'port {port}, which another'):
      distribute.wait_for_peers(_tf_config([port, _free_port()], 0), 5)
  with pytest.raises(ValueError, match='no such task'):
    distribute.wait_for_peers(_tf_config([_free_port()], 3), 5)
  with pytest.raises(ValueError, match='multi_worker_timeout_secs=0'):
    distribute.wait_for_peers(_tf_config([_free_port()], 0), 0)


def test_sigterm_ends_the_wait_for_peers():
  timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))
  start = time.monotonic()
  with stopping.StopFlag() as signals:
    timer.start()
    with pytest.raises(stopping.Stopped, match='SIGTERM before training'):
      distribute.wait_for_peers(_tf_config([_free_port(), _free_port()], 0),
                                timeout_secs=60, signals=signals)
  assert time.monotonic() - start < 10


@pytest.mark.slow
def test_main_with_a_stale_tf_config_exits_1_or_0_on_sigterm(tmp_path):
  """The whole command: one line and exit 1 at the timeout; SIGTERM: 0."""
  env = dict(os.environ, TF_CONFIG=json.dumps(
      _tf_config([_free_port(), _free_port()], 0)))
  command = [sys.executable, 'main.py', '--config=configs/default.py', *TINY]
  run = subprocess.run(
      [*command, f'--workdir={tmp_path / "a"}',
       '--config.multi_worker_timeout_secs=2'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert run.returncode == 1, run.stderr
  assert 'Traceback' not in run.stderr
  assert run.stderr.strip().splitlines()[-1].startswith(
      'Error: Waited 2 s for the other tasks in TF_CONFIG')
  waiting = subprocess.Popen(
      [*command, f'--workdir={tmp_path / "b"}'], cwd=ROOT, env=env,
      stderr=subprocess.PIPE, text=True)
  for line in waiting.stderr:  # Until it waits for its peer.
    if 'Multi-worker task' in line:
      break
  time.sleep(1)
  waiting.send_signal(signal.SIGTERM)
  _, rest = waiting.communicate(timeout=60)
  assert waiting.returncode == 0, rest
  assert 'Stopped by SIGTERM before training started' in rest
  assert 'Traceback' not in rest
