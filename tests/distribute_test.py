"""Strategy selection, with the TPU resolver faked."""

import os
import subprocess
import sys
import time

import pytest
import tensorflow as tf

from sam import distribute
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
