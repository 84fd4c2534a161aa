"""The headline config on an 8-core TPU's replica count, with 8 virtual CPU
devices standing in for the cores (MirroredStrategy: the same per-replica
batches, cross-replica sums and padded evaluation as TPUStrategy; the TPU
compiler itself is not here)."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

_RUN = r'''
import json, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices('CPU')[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * 8)
from configs import cifar10_sam
from sam import train
config = cifar10_sam.get_config()
# CIFAR-10's shapes; a test set that no eval batch divides. The tiny convnet
# for ResNet-20: the batches are what is under test (8 replicas of ResNet-20
# took 5 minutes here; 2 replicas of it train in train_test).
config.dataset.update(name='synthetic', synthetic_image_shape=(32, 32, 3),
                      synthetic_train_size=512, synthetic_test_size=1003)
config.model.name = 'cnn'
config.num_train_steps = 3
config.steps_per_loop = 2
strategy = tf.distribute.MirroredStrategy(
    [f'/cpu:{i}' for i in range(8)],
    cross_device_ops=tf.distribute.ReductionToOneDevice())
results = train.train_and_evaluate(config, sys.argv[1], strategy)
print('RESULTS', json.dumps({k: v for k, v in results.items()
                              if isinstance(v, (int, float))}))
'''


@pytest.mark.slow
def test_cifar10_sam_trains_and_evaluates_on_8_replicas(tmp_path):
  """configs/cifar10_sam.py's batches as shipped (eval_batch_size 500, batch
  128) on 8 replicas: it trains, and evaluates every test example once."""
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'TF_CPP_MIN_LOG_LEVEL': '2'}
  run = subprocess.run([sys.executable, '-c', _RUN, str(tmp_path)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  line = [x for x in run.stdout.splitlines() if x.startswith('RESULTS ')][-1]
  results = json.loads(line.split(' ', 1)[1])
  assert results['step'] == 3
  assert results['eval/examples'] == 1003
  assert 0 <= results['eval/accuracy'] <= 1
  with open(tmp_path / 'results.json') as f:
    assert json.load(f)['eval/examples'] == 1003
