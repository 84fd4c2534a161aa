"""Tests for the model zoo in sam.models."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from sam import models
from sam.models import resnet
from sam.models import wide_resnet
from tests.conftest import assert_layer_conventions
from tests.conftest import bn_params
from tests.conftest import conv_params
from tests.conftest import TRAINABLE_PARAMS

CIFAR = (32, 32, 3)
MNIST = (28, 28, 1)

# As the papers and the usual tables round them.
PARAMS_IN_MILLIONS = {
    'resnet20': 0.27,
    'resnet32': 0.46,
    'resnet56': 0.85,
    'wrn16_4': 2.7,
    'wrn16_8': 11.0,
    'wrn28_10': 36.5,
    # Han et al. (2017), CIFAR results.
    'pyramidnet110_a48': 1.7,
    'pyramidnet110_a48_shakedrop': 1.7,
    'pyramidnet272_a200': 26.0,
    'pyramidnet272_a200_shakedrop': 26.0,
    # Gastaldi (2017), CIFAR-10 results.
    'shake_shake_26_2x32d': 2.9,
    'shake_shake_26_2x64d': 11.7,
    'shake_shake_26_2x96d': 26.2,
}

# Cheap enough to run forward on CPU in a test.
SMALL_MODELS = ('cnn', 'resnet20', 'resnet20_b', 'wrn16_4')


def _trainable_params(model: keras.Model) -> int:
  return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def _resnet_params(n: int, shortcut: str, classes: int = 10) -> int:
  """Trainable parameters of ResNet-(6n+2) on RGB inputs, summed by hand."""
  total = conv_params(3, 3, 16) + bn_params(16)
  c_in = 16
  for c in (16, 32, 64):
    for _ in range(n):
      total += conv_params(3, c_in, c) + conv_params(3, c, c) + 2 * bn_params(c)
      if shortcut == 'B' and c_in != c:
        total += conv_params(1, c_in, c) + bn_params(c)
      c_in = c
  return total + 64 * classes + classes


def _wrn_params(n: int, k: int, classes: int = 10) -> int:
  """Trainable parameters of WRN-(6n+4)-k on RGB inputs, summed by hand."""
  total = conv_params(3, 3, 16)
  c_in = 16
  for c in (16 * k, 32 * k, 64 * k):
    for _ in range(n):
      total += (bn_params(c_in) + conv_params(3, c_in, c) + bn_params(c) +
                conv_params(3, c, c))
      if c_in != c:
        total += conv_params(1, c_in, c)
      c_in = c
  return total + bn_params(c_in) + c_in * classes + classes


def test_models_lists_every_name():
  assert set(models.MODELS) == set(TRAINABLE_PARAMS)


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(TRAINABLE_PARAMS))
def test_trainable_params(name):
  model = models.get_model(name, 10, CIFAR)
  count = _trainable_params(model)
  assert count == TRAINABLE_PARAMS[name]
  if name in PARAMS_IN_MILLIONS:
    digits = 2 if count < 1e6 else 1
    assert round(count / 1e6, digits) == PARAMS_IN_MILLIONS[name]


@pytest.mark.parametrize('name, expected', [
    ('resnet20', _resnet_params(3, 'A')),
    ('resnet32', _resnet_params(5, 'A')),
    ('resnet56', _resnet_params(9, 'A')),
    ('resnet20_b', _resnet_params(3, 'B')),
    ('resnet32_b', _resnet_params(5, 'B')),
    ('resnet56_b', _resnet_params(9, 'B')),
    ('wrn16_4', _wrn_params(2, 4)),
    ('wrn16_8', _wrn_params(2, 8)),
    ('wrn28_10', _wrn_params(4, 10)),
])
def test_trainable_params_match_hand_count(name, expected):
  assert TRAINABLE_PARAMS[name] == expected


def test_batch_norm_statistics_are_not_trainable():
  model = models.get_model('resnet20', 10, CIFAR)
  # Moving mean and variance of 1 + 3 * 3 * 2 batch norms; 688 channels.
  assert sum(int(np.prod(w.shape)) for w in model.non_trainable_weights) == (
      2 * (16 + 6 * (16 + 32 + 64)))


@pytest.mark.parametrize('input_shape', [CIFAR, MNIST])
@pytest.mark.parametrize('name', SMALL_MODELS)
def test_forward_pass_shape(name, input_shape):
  model = models.get_model(name, 7, input_shape)
  images = np.random.default_rng(0).normal(size=(2, *input_shape))
  for training in (False, True):
    logits = model(images.astype('float32'), training=training)
    assert tuple(logits.shape) == (2, 7)
    assert np.all(np.isfinite(keras.ops.convert_to_numpy(logits)))


@pytest.mark.parametrize('name', ('resnet56', 'resnet56_b', 'wrn16_8'))
def test_builds_for_mnist(name):
  model = models.get_model(name, 10, MNIST)
  assert model.input_shape == (None, *MNIST)
  assert model.output_shape == (None, 10)


def test_static_shapes():
  model = models.get_model('resnet20', 10, MNIST)
  # 28 -> 14 -> 7 through the two stride-2 stages.
  assert model.get_layer('stage3_block3_out').output.shape == (None, 7, 7, 64)


def test_layer_conventions():
  for name in ('resnet20', 'resnet20_b', 'wrn16_4'):
    assert_layer_conventions(models.get_model(name, 10, CIFAR))


def test_option_a_shortcut_is_parameter_free():
  model = models.get_model('resnet20', 10, CIFAR)
  shortcuts = [layer for layer in model.layers
               if isinstance(layer, resnet.ZeroPadShortcut)]
  assert [layer.name for layer in shortcuts] == [
      'stage2_block1_shortcut', 'stage3_block1_shortcut']
  assert all(not layer.weights for layer in shortcuts)


def test_zero_pad_shortcut_values():
  x = np.arange(2 * 7 * 7 * 3, dtype='float32').reshape(2, 7, 7, 3)
  layer = resnet.ZeroPadShortcut(8, strides=2)
  y = keras.ops.convert_to_numpy(layer(x))
  assert y.shape == (2, 4, 4, 8)
  assert layer.compute_output_shape((None, 7, 7, 3)) == (None, 4, 4, 8)
  # 5 zero channels: 2 before the input's 3, 3 after.
  np.testing.assert_array_equal(y[..., 2:5], x[:, ::2, ::2, :])
  np.testing.assert_array_equal(y[..., :2], 0)
  np.testing.assert_array_equal(y[..., 5:], 0)


def test_zero_pad_shortcut_rejects_fewer_channels():
  with pytest.raises(ValueError, match='cannot reduce'):
    resnet.ZeroPadShortcut(2)(np.zeros((1, 4, 4, 3), 'float32'))


def test_build_is_deterministic():
  def build_weights(seed):
    keras.utils.set_random_seed(seed)
    return models.get_model('resnet20', 10, CIFAR).get_weights()

  first, second, other = build_weights(1), build_weights(1), build_weights(2)
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, c) for a, c in zip(first, other))


def test_layer_names_do_not_depend_on_build_order():
  first = models.get_model('resnet20_b', 10, CIFAR)
  second = models.get_model('resnet20_b', 10, CIFAR)
  assert [w.path for w in first.weights] == [w.path for w in second.weights]


def test_save_and_load_round_trip(tmp_path):
  model = models.get_model('resnet20', 10, MNIST)
  path = str(tmp_path / 'resnet20.keras')
  model.save(path)
  loaded = keras.saving.load_model(path)
  images = np.random.default_rng(0).normal(size=(2, *MNIST)).astype('float32')
  np.testing.assert_allclose(
      keras.ops.convert_to_numpy(loaded(images, training=False)),
      keras.ops.convert_to_numpy(model(images, training=False)),
      rtol=1e-6, atol=1e-6)


def test_unknown_name_raises():
  with pytest.raises(ValueError, match='config.model.name') as error:
    models.get_model('resnet18', 10, CIFAR)
  for name in models.MODELS:
    assert name in str(error.value)


@pytest.mark.parametrize('depth', [18, 2, 0])
def test_resnet_rejects_bad_depth(depth):
  with pytest.raises(ValueError, match='6n \\+ 2'):
    resnet.resnet(depth, 10, CIFAR)


def test_resnet_rejects_bad_shortcut():
  with pytest.raises(ValueError, match='shortcut'):
    resnet.resnet(20, 10, CIFAR, shortcut='C')


@pytest.mark.parametrize('depth', [20, 4])
def test_wide_resnet_rejects_bad_depth(depth):
  with pytest.raises(ValueError, match='6n \\+ 4'):
    wide_resnet.wide_resnet(depth, 2, 10, CIFAR)


@pytest.mark.parametrize('policy', ['float32', 'mixed_bfloat16'])
def test_fused_batch_norm_matches_keras_batch_norm(policy):
  """Same output, gradients and moving statistics as the Keras 3 layer."""
  rng = np.random.default_rng(0)
  x = rng.normal(3.0, 2.0, size=(8, 5, 5, 4)).astype('float32')
  # A loss with no zero gradient (a sum of y's entries would give gamma none).
  loss_weights = rng.normal(size=x.shape).astype('float32')
  layers = []
  for cls in (keras.layers.BatchNormalization,
              resnet.FusedBatchNormalization):
    layer = cls(momentum=0.9, epsilon=1e-5, dtype=policy)
    layer.build(x.shape)
    layer.gamma.assign(rng.uniform(0.5, 1.5, 4))
    layer.beta.assign(rng.normal(size=4))
    layers.append(layer)
  layers[1].set_weights(layers[0].get_weights())
  results = []
  for layer in layers:
    trainable = [v.value for v in layer.trainable_variables]
    state = [v.value for v in layer.non_trainable_variables]
    inputs = tf.constant(x)
    with tf.GradientTape() as tape:
      tape.watch([inputs, *trainable])
      y, new_state = layer.stateless_call(trainable, state, inputs,
                                          training=True)
      loss = tf.reduce_sum(tf.cast(y, tf.float32) * loss_weights)
    grads = tape.gradient(loss, [inputs, *trainable])
    results.append([y, *new_state, *grads])
  tolerance = 1e-5 if policy == 'float32' else 1e-2
  for keras_value, fused_value in zip(*results):
    np.testing.assert_allclose(np.asarray(tf.cast(fused_value, tf.float32)),
                               np.asarray(tf.cast(keras_value, tf.float32)),
                               rtol=tolerance, atol=tolerance)
  # Moving statistics moved (the test would pass vacuously otherwise).
  assert not np.allclose(results[0][1], 0.0)


def test_models_train_with_the_fused_batch_norm_kernel():
  model = models.get_model('resnet20_b', 10, CIFAR)
  graph = tf.function(lambda x: model(x, training=True)).get_concrete_function(
      tf.TensorSpec([2, *CIFAR])).graph
  ops = {op.type for op in graph.get_operations()}
  assert 'FusedBatchNormV3' in ops
  # Not Keras 3's unfused moments (tf.nn.moments' SquaredDifference).
  assert 'SquaredDifference' not in ops


def test_keras2_twins_have_the_same_architecture():
  # The benchmark's Keras 2 rows build these; tf_keras is a benchmark extra.
  tf_keras = pytest.importorskip('tf_keras')
  assert models.KERAS2_MODELS == (
      'cnn', 'resnet20_b', 'resnet32_b', 'resnet56_b', 'wrn16_4', 'wrn16_8',
      'wrn28_10')
  for name in ('cnn', 'resnet20_b', 'wrn16_4'):
    ours = models.get_model(name, 10, (32, 32, 3))
    twin = models.get_model(name, 10, (32, 32, 3), keras_module=tf_keras)
    assert isinstance(twin, tf_keras.Model)
    assert [(v.path.split('/')[0], tuple(v.shape)) for v in ours.weights] == [
        (v.name.split('/')[0], tuple(v.shape)) for v in twin.weights], name
    assert ours.count_params() == twin.count_params()
    assert isinstance(twin.get_layer('logits'), tf_keras.layers.Dense)
  for name in ('resnet20', 'pyramidnet110_a48', 'shake_shake_26_2x32d'):
    with pytest.raises(ValueError, match='Keras 3 layers only'):
      models.get_model(name, 10, (32, 32, 3), keras_module=tf_keras)
