"""Test set-up: four virtual CPU devices stand in for TPU cores or GPUs."""

import functools
import gzip
import importlib.metadata
import itertools
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

from sam import start_up  # pylint: disable=g-import-not-at-top,wrong-import-position

# TensorFlow's notices as it loads, off the console (as in main.py).
_LOADING = start_up.Held()

import allpairspy  # pylint: disable=g-import-not-at-top,wrong-import-position
import keras  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position
import tensorflow as tf  # pylint: disable=g-import-not-at-top,wrong-import-position

from configs import default  # pylint: disable=g-import-not-at-top,wrong-import-position

_LOADING.lines()

NUM_VIRTUAL_DEVICES = 4
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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


def grid(fast, **axes):
  """`parametrize` arguments for every pair of values of `axes`.

  The cases are those in `fast` and, marked slow, an all-pairs set
  (allpairspy) that puts each value of every axis beside each value of every
  other axis at least once: the fast subset runs the cases that can catch a
  bug on their own, the whole suite every pair. Two axes are their whole
  cross product; with three or more, a bug that needs three values at once
  (a variant, a replica count and a compiler) is not in every case (the
  full product of the variants' harness was 240 cases, 278 s of the suite's
  test time at 7f27c5d). An axis value may be a `pytest.param` with marks.
  """
  marks = [dict(map(_unmarked, axis)) for axis in axes.values()]
  values = [list(axis) for axis in marks]
  unknown = {case for case in fast
             if len(case) != len(values) or not all(
                 v in axis for v, axis in zip(case, values))}
  assert not unknown, f'fast cases not in the grid: {unknown}'
  fast_first = sorted(fast, key=repr)
  pairs = (allpairspy.AllPairs(values, previously_tested=[
      list(case) for case in fast_first]) if len(values) > 2 else
           itertools.product(*values))
  return ','.join(axes), [
      pytest.param(*case, marks=[m for value, axis in zip(case, marks)
                                 for m in axis[value]] +
                   ([] if case in fast else [pytest.mark.slow]))
      for case in dict.fromkeys([*fast_first, *map(tuple, pairs)])]


def _unmarked(value):
  """(value, its marks) of an axis value or a `pytest.param` of one."""
  if isinstance(value, type(pytest.param(None))):
    return value.values[0], list(value.marks)
  return value, []


@pytest.fixture(name='mirrored')
def mirrored_fixture():
  return mirrored


@pytest.fixture
def shallow_imagenet_models(monkeypatch):
  """ResNet-50, the ViTs and the Mixers with 1 or 2 blocks a stage.

  Every kind of layer and block stays (ResNet-50's projection and identity
  blocks, strided and not): what replicas or XLA could change is in a layer,
  not in how many there are. Tracing and compiling the full depth took
  about 8 minutes of the suite's time on 2 cores.
  """
  # pylint: disable=g-import-not-at-top
  from sam.models import mixer
  from sam.models import resnet50
  from sam.models import vit
  monkeypatch.setattr(resnet50, 'STAGES',
                      ((64, 2), (128, 1), (256, 1), (512, 1)))
  monkeypatch.setattr(vit, 'DEPTH', 2)
  monkeypatch.setattr(mixer, 'SIZES', {
      name: (channels, 2, *widths)
      for name, (channels, _, *widths) in mixer.SIZES.items()})


@pytest.fixture
def shallow_resnet20(monkeypatch):
  """'resnet20' built at depth 8: one block a stage, not three.

  Every kind of layer and block stays (batch norm, option-A shortcuts,
  strided and not), so what replicas, float16 or a skipped step could change
  is still there; a third of the graph to trace and compile.
  """
  # pylint: disable=g-import-not-at-top
  from sam import models
  from sam.models import resnet
  monkeypatch.setitem(models._REGISTRY, 'resnet20',  # pylint: disable=protected-access
                      functools.partial(resnet.resnet, 8, shortcut='A'))


def requirement_lines(filename: str) -> list[str]:
  """Requirement lines of a requirements file, following `-r` includes."""
  lines = []
  with open(os.path.join(ROOT, filename)) as f:
    for line in f:
      line = line.split('#', 1)[0].strip()
      if line.startswith('-r'):
        lines += requirement_lines(line[2:].strip())
      elif line:
        lines.append(line)
  return lines


# The tiny runs: in process (tiny_config) and as main.py flags (TINY).


def tiny_config(**overrides):
  """Synthetic 8x8 data, a tiny model, constant learning rate."""
  config = default.get_config()
  config.dataset.name = 'synthetic'
  config.dataset.augment = 'none'
  config.dataset.synthetic_image_shape = (8, 8, 3)
  config.dataset.synthetic_train_size = 64
  config.dataset.synthetic_test_size = 40  # Not a multiple of the batch.
  config.model.name = 'cnn'
  config.schedule.name = 'constant'
  config.schedule.learning_rate = 0.05
  config.batch_size = 16
  config.eval_batch_size = 16
  config.num_train_steps = 4
  config.steps_per_loop = 2
  config.log_every_steps = 1
  config.progress_every_secs = 0.0
  for key, value in overrides.items():
    node = config
    *path, leaf = key.split('.')
    for name in path:
      node = node[name]
    node[leaf] = value
  return config


TINY = [
    '--config.dataset.name=synthetic', '--config.dataset.augment=none',
    '--config.dataset.synthetic_image_shape=(8, 8, 3)',
    '--config.dataset.synthetic_train_size=64',
    '--config.dataset.synthetic_test_size=32', '--config.model.name=cnn',
    '--config.batch_size=16', '--config.eval_batch_size=16',
    '--config.num_train_steps=2', '--config.steps_per_loop=1',
]


def write_idx(path, array) -> None:
  """Writes a gzipped uint8 IDX file (Fashion-MNIST's format)."""
  header = bytes([0, 0, 8, array.ndim]) + b''.join(
      int(d).to_bytes(4, 'big') for d in array.shape)
  with gzip.open(path, 'wb') as f:
    f.write(header + array.astype(np.uint8).tobytes())


# The model zoo (models_test.py, models_shake_test.py).

# Trainable parameters for 10 classes on 32x32x3 inputs: conv kernels, BN
# gamma and beta, dense kernel and bias (BN moving statistics excluded).
#
# ResNet-20, option A, by hand (n = 3 blocks per stage):
#   stem         3*3*3*16 + 2*16                                  =     464
#   stage 1      3 * (2 * 3*3*16*16 + 2 * 2*16)                   =  14,016
#   stage 2      (3*3*16*32 + 3*3*32*32 + 2 * 2*32)
#                  + 2 * (2 * 3*3*32*32 + 2 * 2*32)               =  51,072
#   stage 3      (3*3*32*64 + 3*3*64*64 + 2 * 2*64)
#                  + 2 * (2 * 3*3*64*64 + 2 * 2*64)               = 203,520
#   logits       64*10 + 10                                       =     650
#   total                                                         = 269,722
# i.e. the paper's 0.27M. Option B adds 16*32 + 2*32 + 32*64 + 2*64 = 2,752
# for the two projection shortcuts (272,474). `_resnet_params` and
# `_wrn_params` of models_test.py generalize these sums; WRN-28-10's
# 36,479,194 is the figure of the authors' code.
TRAINABLE_PARAMS = {
    'cnn': 545_098,
    'resnet20': 269_722,
    'resnet32': 464_154,
    'resnet56': 853_018,
    'resnet20_b': 272_474,
    'resnet32_b': 466_906,
    'resnet56_b': 855_770,
    'wrn16_4': 2_748_890,
    'wrn16_8': 10_961_370,
    'wrn28_10': 36_479_194,
    # Hand counts in models_shake_test.py. PyramidNet widths truncated as
    # in its paper; ShakeDrop adds no parameters.
    'pyramidnet110_a48': 1_739_730,
    'pyramidnet110_a48_shakedrop': 1_739_730,
    'pyramidnet272_a200': 26_049_562,
    'pyramidnet272_a200_shakedrop': 26_049_562,
    'shake_shake_26_2x32d': 2_923_162,
    'shake_shake_26_2x64d': 11_653_978,
    'shake_shake_26_2x96d': 26_192_922,
    # Hand counts in models_imagenet_test.py (at 32 x 32: ViTs and Mixers
    # of 4 or 1 patches).
    'resnet50': 23_528_522,
    'vit_ti16': 5_489_482,
    'vit_s16': 21_595_786,
    'vit_b16': 85_658_890,
    'vit_s32': 22_479_370,
    'vit_b32': 87_426_058,
    'mixer_s16': 17_232_426,
    'mixer_b16': 57_347_386,
}


def conv_params(k: int, c_in: int, c_out: int) -> int:
  """A bias-free k x k convolution's kernel."""
  return k * k * c_in * c_out


def bn_params(c: int) -> int:
  """A batch norm's trainable parameters."""
  return 2 * c  # gamma and beta


def assert_layer_conventions(model: keras.Model) -> None:
  """Bias-free He-normal convs, CIFAR batch norm, plain float logits."""
  for layer in model.layers:
    if isinstance(layer, keras.layers.Conv2D):
      assert not layer.use_bias, layer.name
      assert layer.kernel_regularizer is None, layer.name
      assert isinstance(layer.kernel_initializer,
                        keras.initializers.HeNormal), layer.name
    if isinstance(layer, keras.layers.BatchNormalization):
      assert layer.momentum == 0.9, layer.name
      assert layer.epsilon == 1e-5, layer.name
  logits = model.get_layer('logits')
  assert logits.activation is keras.activations.linear
  assert logits.kernel_regularizer is None
