"""Test set-up: four virtual CPU devices stand in for TPU cores or GPUs."""

import importlib.metadata
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position
import tensorflow as tf  # pylint: disable=g-import-not-at-top,wrong-import-position

NUM_VIRTUAL_DEVICES = 4

_cpu = tf.config.list_physical_devices('CPU')[0]
tf.config.set_logical_device_configuration(
    _cpu, [tf.config.LogicalDeviceConfiguration()] * NUM_VIRTUAL_DEVICES)


def _tensorflow_tpu_wheel() -> bool:
  try:
    importlib.metadata.distribution('tensorflow-tpu')
    return True
  except importlib.metadata.PackageNotFoundError:
    return False


# The tensorflow-tpu wheel runs on a CPU (with TPU_LOAD_LIBRARY=0) but has no
# XLA CPU backend: 'could not find registered transfer manager for platform
# Host'. On a TPU, XLA is the TPU's own compiler.
requires_xla_cpu = pytest.mark.skipif(
    _tensorflow_tpu_wheel(),
    reason='the tensorflow-tpu wheel cannot jit_compile on a CPU')


def mirrored(num_replicas: int) -> tf.distribute.Strategy:
  """MirroredStrategy over the first `num_replicas` virtual CPUs.

  Reductions go through one device: CPU collectives remember their groups per
  process, so strategies of different sizes in one process would clash.
  """
  return tf.distribute.MirroredStrategy(
      [f'/cpu:{i}' for i in range(num_replicas)],
      cross_device_ops=tf.distribute.ReductionToOneDevice())


@pytest.fixture(name='mirrored')
def mirrored_fixture():
  return mirrored


def requirement_lines(filename: str) -> list[str]:
  """Requirement lines of a requirements file, following `-r` includes."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  lines = []
  with open(os.path.join(root, filename)) as f:
    for line in f:
      line = line.split('#', 1)[0].strip()
      if line.startswith('-r'):
        lines += requirement_lines(line[2:].strip())
      elif line:
        lines.append(line)
  return lines
