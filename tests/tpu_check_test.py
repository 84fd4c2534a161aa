"""python -m sam.tpu_check: devices, SAM steps on every core, a checkpoint
round trip, one line at the end; on this CPU, on 1 and 8 replicas."""

import os
import subprocess
import sys

import pytest

from configs import cifar10_sam
from sam import tpu_check
from tests.conftest import ROOT

_SMALL = ['--config.model.name=cnn', '--config.batch_size=16']


def _small_config():
  config = cifar10_sam.get_config()
  config.model.name, config.batch_size = 'cnn', 16
  return config


def test_an_unwritable_workdir_is_not_ready(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('')
  ready, line = tpu_check.check(_small_config(), str(blocker / 'run'), 1)
  assert not ready and line.startswith(f'cannot write to --workdir={blocker}')


def test_the_data_set_shapes_are_the_configs():
  config = tpu_check.synthetic_like(cifar10_sam.get_config())
  assert config.dataset.name == 'synthetic'
  assert config.dataset.synthetic_image_shape == (32, 32, 3)
  assert config.dataset.synthetic_num_classes == 10


@pytest.mark.slow
def test_the_command_says_ready_on_this_cpu(tmp_path):
  run = subprocess.run(
      [sys.executable, '-m', 'sam.tpu_check', f'--workdir={tmp_path}',
       '--steps=3', *_SMALL], cwd=ROOT, capture_output=True, text=True,
      timeout=300, env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '2'})
  assert run.returncode == 0, run.stderr[-3000:]
  lines = run.stdout.splitlines()
  assert lines[0].startswith('TensorFlow ') and '1 replicas' in lines[0]
  assert 'Compiled and ran one step of cnn with sam.rho=0.05' in run.stdout
  assert 'Wrote and restored a checkpoint in' in run.stdout
  assert lines[-1].startswith('Ready: 1 replicas train cnn at ')
  assert not (tmp_path / 'tpu_check').exists()  # Cleaned up.


_EIGHT = r'''
import sys
import tensorflow as tf
cpu = tf.config.list_physical_devices('CPU')[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * 8)
from sam import distribute, tpu_check
from tests.tpu_check_test import _small_config
distribute.create_strategy = lambda *a: tf.distribute.MirroredStrategy(
    [f'/cpu:{i}' for i in range(8)],
    cross_device_ops=tf.distribute.ReductionToOneDevice())
print(tpu_check.check(_small_config(), sys.argv[1], 2))
'''


@pytest.mark.slow
def test_eight_replicas_agree_and_are_ready(tmp_path):
  run = subprocess.run(
      [sys.executable, '-c', _EIGHT, str(tmp_path)], cwd=ROOT,
      capture_output=True, text=True, timeout=300,
      env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '2', 'JAX_PLATFORMS': 'cpu'})
  assert run.returncode == 0, run.stderr[-3000:]
  assert 'MirroredStrategy with 8 replicas' in run.stdout
  assert run.stdout.splitlines()[-1].startswith(
      "(True, '8 replicas train cnn at ")
