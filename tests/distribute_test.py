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

from configs import default
from sam import config_checks
from sam import distribute
from sam import environment
from sam import stopping
from sam import trainer
from tests.conftest import ROOT
from tests.conftest import TINY


@pytest.fixture(name='machine')
def machine_fixture(monkeypatch):
  """A machine with no TPU devices, no TF_CONFIG, no TPU_NAME, no GPU, and
  no GCE metadata server (tests add devices and metadata)."""
  devices = []
  monkeypatch.setattr(environment.glob, 'glob',
                      lambda p: [d for d in devices if d.startswith(p[:9])])
  monkeypatch.delenv('TF_CONFIG', raising=False)
  monkeypatch.delenv('TPU_NAME', raising=False)
  monkeypatch.setattr(tf.config, 'list_physical_devices',
                      lambda kind=None: [])
  monkeypatch.setattr(distribute, 'tpu_vm_metadata', METADATA.get)
  METADATA.clear()
  return devices


# The fake GCE metadata server's attributes.
METADATA = {}


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


@pytest.fixture(name='fake_tpu')
def fake_tpu_fixture(monkeypatch):
  """A fake TPUClusterResolver and TPUStrategy; the calls that reach them."""
  calls = []

  class FakeResolver:
    task_type, task_id = 'worker', 0

    def __init__(self, tpu):
      calls.append(('resolver', tpu))

  class FakeTPUStrategy:
    num_replicas_in_sync = 8

    def __init__(self, resolver):
      self.cluster_resolver = resolver

  class Topology:
    num_tasks = 1

  monkeypatch.setattr(tf.distribute.cluster_resolver, 'TPUClusterResolver',
                      FakeResolver)
  monkeypatch.setattr(tf.config, 'experimental_connect_to_cluster',
                      lambda r: calls.append('connect'))
  monkeypatch.setattr(tf.tpu.experimental, 'initialize_tpu_system',
                      lambda r: calls.append('initialize') or Topology())
  monkeypatch.setattr(tf.distribute, 'TPUStrategy', FakeTPUStrategy)
  # The Cloud TPU API client, installed (requirements-tpu-client.txt).
  find_spec = distribute.importlib.util.find_spec
  monkeypatch.setattr(
      distribute.importlib.util, 'find_spec',
      lambda name: (name in ('googleapiclient', 'oauth2client') or
                    find_spec(name)))
  return calls


def test_tpu_on_a_vm_uses_the_local_resolver(machine, fake_tpu):
  machine.append('/dev/vfio/0')
  METADATA.update({'accelerator-type': 'v5litepod-8',
                   'agent-worker-number': '0',
                   'worker-network-endpoints': 'w0:u:10.0.0.2'})
  strategy = distribute.create_strategy('auto')
  assert isinstance(strategy, tf.distribute.TPUStrategy)
  assert fake_tpu == [('resolver', 'local'), 'connect', 'initialize']
  assert distribute.is_chief(strategy)


@pytest.mark.parametrize('tpu,env', [('my-pod', None), ('', 'my-pod'),
                                     ('my-pod', 'other')])
def test_a_named_pod_slice_is_driven_from_this_one_process(
    machine, fake_tpu, monkeypatch, tpu, env):
  """--config.tpu, else TPU_NAME, reaches the resolver; on no TPU VM at all
  (the client may run anywhere), without asking which worker this is."""
  del machine
  if env:
    monkeypatch.setenv('TPU_NAME', env)
  METADATA.update({'worker-network-endpoints': 'a,b,c,d',
                   'agent-worker-number': '1'})  # Ignored: a name is given.
  strategy = distribute.create_strategy('auto', tpu=tpu)
  assert fake_tpu == [('resolver', 'my-pod'), 'connect', 'initialize']
  assert distribute.is_chief(strategy)
  strategy.cluster_resolver.task_id = 1
  assert not distribute.is_chief(strategy)


@pytest.mark.parametrize('worker,says', [
    ('0', 'name the slice here'), ('3', 'do not start it here')])
def test_a_pod_host_without_a_tpu_name_is_one_line(machine, fake_tpu,
                                                   worker, says):
  machine.append('/dev/accel0')
  METADATA.update({'accelerator-type': 'v4-32', 'agent-worker-number': worker,
                   'worker-network-endpoints': 'a,b,c,d'})
  with pytest.raises(ValueError, match=(
      f'^This VM is worker {worker} of v4-32 \\(4 hosts\\), and no TPU is '
      f'named.*on worker 0 .*{says}.*--worker=0 .*TPU_NAME=TPU_NAME '
      'TPU_LOAD_LIBRARY=0')):
    distribute.create_strategy('auto')
  assert not fake_tpu  # Refused before TensorFlow touched the TPU.


def test_naming_a_tpu_without_its_api_client_is_one_line(machine, fake_tpu,
                                                         monkeypatch):
  del machine
  find_spec = distribute.importlib.util.find_spec
  monkeypatch.setattr(
      distribute.importlib.util, 'find_spec',
      lambda name: None if name == 'oauth2client' else find_spec(name))
  with pytest.raises(ValueError, match=(
      "TPU 'my-pod'.*needs oauth2client: pip install -r "
      'requirements-tpu-client.txt')):
    distribute.create_strategy('tpu', tpu='my-pod')
  assert not fake_tpu


def test_the_tpu_client_packages_are_on_both_tpu_paths():
  with open(os.path.join(ROOT, 'requirements-tpu.txt')) as f:
    assert '-r requirements-tpu-client.txt' in f.read().split('\n')
  with open(os.path.join(ROOT, 'tools', 'update_constraints.sh')) as f:
    assert 'tf2.16.txt "$tmp/tf216.in" requirements-tpu-client.txt' in f.read()


@pytest.mark.parametrize('accelerator,replicas', [
    ('v2-8', 8), ('v3-8', 8), ('v3-32', 32), ('v4-8', 4), ('v4-32', 16),
    ('v5p-8', 4), ('v5litepod-8', 8), ('v5litepod-256', 256), ('v6e-8', 8),
    ('v6e-1', 1)])
def test_expected_replicas_per_slice(accelerator, replicas):
  assert distribute.expected_replicas(accelerator) == replicas


def test_tpu_init_failure_is_explained(machine, monkeypatch):
  del machine

  def broken(tpu):
    raise ValueError(f'Could not connect to {tpu}.')

  monkeypatch.setattr(tf.distribute.cluster_resolver, 'TPUClusterResolver',
                      broken)
  with pytest.raises(ValueError, match=(
      "TPU_NAME: 'grpc://10.0.0.2:8470'.*connect to grpc.*runtime version")):
    distribute.create_strategy('tpu', tpu='grpc://10.0.0.2:8470')


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


def test_float16_is_refused_on_a_tpu_before_any_compute():
  config = default.get_config()
  config.dtype_policy = 'mixed_float16'
  config_checks.validate_config(config, 8)  # GPUs: loss scaling.
  with pytest.raises(ValueError, match=(
      r"^config.dtype_policy='mixed_float16' is invalid: TPUs compute in "
      r'bfloat16.*--config.dtype_policy=mixed_bfloat16')):
    config_checks.validate_config(config, 8, tpu=True)
  config.dtype_policy = 'mixed_bfloat16'
  config_checks.validate_config(config, 8, tpu=True)


@pytest.mark.parametrize('setting', ['auto', 'true', 'false'])
def test_tpu_replication_compiles_the_replica_step(fake_tpu, setting):
  """No jit_compile of our own inside the TPU program: None leaves it to
  the replication (False would ask for a step outside XLA)."""
  del fake_tpu
  assert trainer.use_xla(setting, tf.distribute.TPUStrategy(None)) is None


def test_the_preflight_logs_replicas_against_the_slice(machine, fake_tpu,
                                                       monkeypatch):
  """A v4-32 host has 16 TensorFlow devices in its slice; 8 started is
  worth a warning (a client that opened only its own chips, say)."""
  del fake_tpu
  machine.append('/dev/accel0')
  METADATA.update({'accelerator-type': 'v4-32', 'agent-worker-number': '0'})
  monkeypatch.setenv('NEXT_PLUGGABLE_DEVICE_USE_C_API', 'true')
  lines = []
  monkeypatch.setattr(distribute.logging, 'info',
                      lambda fmt, *a: lines.append(fmt % a))
  monkeypatch.setattr(distribute.logging, 'warning',
                      lambda fmt, *a: lines.append(fmt % a))
  distribute.create_strategy('tpu')
  assert ('TPU of this VM: 8 replicas on 1 hosts (v4-32 has 16); PJRT: '
          'NEXT_PLUGGABLE_DEVICE_USE_C_API=true.') in lines
  assert any('is the slice healthy?' in line for line in lines)
