"""Tests for PyramidNet with ShakeDrop and Shake-Shake in sam.models.

Parameter counts of every registered model are checked in models_test.py;
here they are summed by hand. Forward passes run only on the smallest
registered models and on tiny ones from the general builders.
"""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

from sam import models
from sam import sam as sam_lib
from sam.models import pyramidnet
from sam.models import shake_shake
from sam.models import true_gradient
from tests import conftest
from tests.conftest import grid
from tests.conftest import requires_xla_cpu

CIFAR = (32, 32, 3)
MNIST = (28, 28, 1)
ODD = (27, 27, 3)  # 27 -> 14 -> 7: padded strides in both models.

_conv = conftest.conv_params
_bn = conftest.bn_params

# One block per stage: a forward pass takes milliseconds.
TINY = {
    'pyramidnet_basic': functools.partial(
        pyramidnet.pyramidnet, 8, 6, block='basic', shakedrop=True),
    'pyramidnet_bottleneck': functools.partial(
        pyramidnet.pyramidnet, 11, 6, block='bottleneck', shakedrop=True),
    'shake_shake': functools.partial(shake_shake.shake_shake, 8, 4),
}

# The smallest registered models with random draws.
SMALL_MODELS = ('pyramidnet110_a48_shakedrop', 'shake_shake_26_2x32d')


def _pyramidnet_params(n: int, alpha: int, bottleneck: bool,
                       classes: int = 10) -> int:
  """Trainable parameters of a PyramidNet on RGB inputs, summed by hand."""
  total = _conv(3, 3, 16) + _bn(16)
  c_in = 16
  for k in range(1, 3 * n + 1):
    c = 16 + alpha * k // (3 * n)  # Han et al., eq. (2), truncated.
    total += _bn(c_in)
    if bottleneck:
      total += (_conv(1, c_in, c) + _bn(c) + _conv(3, c, c) + _bn(c)
                + _conv(1, c, 4 * c) + _bn(4 * c))
      c_in = 4 * c
    else:
      total += _conv(3, c_in, c) + _bn(c) + _conv(3, c, c) + _bn(c)
      c_in = c
  return total + _bn(c_in) + c_in * classes + classes


def _shake_shake_params(n: int, width: int, classes: int = 10) -> int:
  """Trainable parameters of a Shake-Shake ResNet on RGB inputs, by hand."""
  total = _conv(3, 3, 16) + _bn(16)
  c_in = 16
  for c in (width, 2 * width, 4 * width):
    for _ in range(n):
      total += 2 * (_conv(3, c_in, c) + _bn(c) + _conv(3, c, c) + _bn(c))
      if c_in != c:
        total += 2 * _conv(1, c_in, c // 2) + _bn(c)
      c_in = c
  return total + c_in * classes + classes


def _images(input_shape, batch=4, seed=0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(batch, *input_shape)).astype('float32')


def _is_seed(variable) -> bool:
  return variable.path.endswith('seed_generator_state')


@pytest.mark.parametrize('name, expected', [
    ('pyramidnet110_a48', _pyramidnet_params(18, 48, False)),
    ('pyramidnet110_a48_shakedrop', _pyramidnet_params(18, 48, False)),
    ('pyramidnet272_a200', _pyramidnet_params(30, 200, True)),
    ('pyramidnet272_a200_shakedrop', _pyramidnet_params(30, 200, True)),
    ('shake_shake_26_2x32d', _shake_shake_params(4, 32)),
    ('shake_shake_26_2x64d', _shake_shake_params(4, 64)),
    ('shake_shake_26_2x96d', _shake_shake_params(4, 96)),
])
def test_trainable_params_match_hand_count(name, expected):
  assert conftest.TRAINABLE_PARAMS[name] == expected


def test_block_channels():
  # PyramidNet-272, alpha 200: 90 blocks; 16 + 200 * 9 / 90 is exactly 36,
  # which accumulating 200 / 90 in floats would truncate to 35.
  widths = [pyramidnet.block_channels(k, 200, 90) for k in range(1, 91)]
  assert widths[:4] == [18, 20, 22, 24]
  assert widths[8] == 36 and widths[17] == 56
  assert widths[-1] == 216
  # 16 + 5k / 9, truncated or rounded half up.
  assert [pyramidnet.block_channels(k, 5, 9) for k in range(1, 10)] == [
      16, 17, 17, 18, 18, 19, 19, 20, 21]
  assert [pyramidnet.block_channels(k, 5, 9, round_channels=True)
          for k in range(1, 10)] == [17, 17, 18, 18, 19, 19, 20, 20, 21]


def test_round_channels_widens_the_model():
  model = pyramidnet.pyramidnet(20, 5, 10, CIFAR, round_channels=True)
  assert model.get_layer('stage1_block1_conv1').filters == 17
  assert model.get_layer('stage3_block3_add').output.shape[-1] == 21


def test_pyramidnet_output_widths():
  # 16 + alpha channels at the end, times 4 after a bottleneck.
  model = pyramidnet.pyramidnet(11, 6, 10, MNIST, block='bottleneck')
  assert model.get_layer('stage3_block1_add').output.shape == (
      None, 7, 7, 4 * 22)


@pytest.mark.slow  # 110 layers to build: 4 s of the fast subset.
def test_pyramidnet110_a48_output_widths():
  model = models.get_model('pyramidnet110_a48', 10, MNIST)
  assert model.get_layer('stage3_block18_add').output.shape == (
      None, 7, 7, 64)
  # Plain PyramidNets have no ShakeDrop, hence no random state.
  assert not any(isinstance(layer, pyramidnet.ShakeDrop)
                 for layer in model.layers)
  assert not any(_is_seed(v) for v in model.variables)


def test_shake_shake_output_widths():
  model = models.get_model('shake_shake_26_2x32d', 10, MNIST)
  assert model.get_layer('stage1_block4_add').output.shape == (
      None, 28, 28, 32)
  assert model.get_layer('stage3_block4_add').output.shape == (
      None, 7, 7, 128)


def test_shakedrop_survival_probabilities_decay_to_one_half():
  model = pyramidnet.pyramidnet(20, 12, 10, CIFAR, shakedrop=True)
  layers = [layer for layer in model.layers
            if isinstance(layer, pyramidnet.ShakeDrop)]
  assert [layer.name for layer in layers][:2] == [
      'stage1_block1_shakedrop', 'stage1_block2_shakedrop']
  np.testing.assert_allclose(
      [layer.survival_prob for layer in layers],
      [1 - k / 9 * 0.5 for k in range(1, 10)])
  assert layers[-1].survival_prob == 0.5


def _coefficients(layer, inputs, training):
  """The layer's output and the gradient of its sum w.r.t. the inputs."""
  inputs = [tf.constant(x) for x in inputs]
  with tf.GradientTape() as tape:
    tape.watch(inputs)
    outputs = layer(inputs if len(inputs) > 1 else inputs[0],
                    training=training)
  grads = tape.gradient(outputs, inputs)
  return outputs.numpy(), [g.numpy() for g in grads]


def test_shakedrop_forward_and_backward_coefficients():
  # With x = 1, the output is the forward coefficient b + alpha - b alpha
  # and the gradient the backward one, b + beta - b beta, per example.
  n = 20_000
  layer = pyramidnet.ShakeDrop(0.7, seed=1)
  outputs, (grads,) = _coefficients(layer, [np.ones((n, 2), 'float32')],
                                    training=True)
  # One draw per example, shared by its features.
  np.testing.assert_array_equal(outputs[:, 0], outputs[:, 1])
  forward, backward = outputs[:, 0], grads[:, 0]
  kept = forward == 1
  np.testing.assert_array_equal(kept, backward == 1)
  assert abs(kept.mean() - 0.7) < 0.02  # b ~ Bernoulli(0.7)
  alpha, beta = forward[~kept], backward[~kept]
  assert -1 <= alpha.min() < -0.99 and 0.99 < alpha.max() <= 1
  assert 0 <= beta.min() < 0.01 and 0.99 < beta.max() <= 1
  assert abs(np.corrcoef(alpha, beta)[0, 1]) < 0.05
  # E[forward] = p, the scale at inference.
  assert abs(forward.mean() - 0.7) < 0.02
  outputs, (grads,) = _coefficients(layer, [np.ones((3, 2), 'float32')],
                                    training=False)
  np.testing.assert_allclose(outputs, 0.7)
  np.testing.assert_allclose(grads, 0.7)


def test_shake_shake_forward_and_backward_coefficients():
  # With a = 1 and b = 0, the output is alpha and the gradients beta and
  # 1 - beta, per example.
  n = 20_000
  layer = shake_shake.ShakeShake(seed=1)
  a = np.ones((n, 2, 2, 1), 'float32')
  b = np.zeros((n, 2, 2, 1), 'float32')
  outputs, (grad_a, grad_b) = _coefficients(layer, [a, b], training=True)
  # One draw per example, shared by its pixels.
  flat = outputs.reshape(n, -1)
  np.testing.assert_array_equal(flat, flat[:, :1] * np.ones_like(flat))
  alpha, beta = flat[:, 0], grad_a.reshape(n, -1)[:, 0]
  np.testing.assert_allclose(grad_b.reshape(n, -1)[:, 0], 1 - beta,
                             atol=1e-6)
  for draws in (alpha, beta):
    assert 0 <= draws.min() < 0.01 and 0.99 < draws.max() <= 1
    assert abs(draws.mean() - 0.5) < 0.01
  assert abs(np.corrcoef(alpha, beta)[0, 1]) < 0.05
  outputs, (grad_a, grad_b) = _coefficients(layer, [a[:3], 3 * a[:3]],
                                            training=False)
  np.testing.assert_allclose(outputs, 2.0)
  np.testing.assert_allclose(grad_a, 0.5)
  np.testing.assert_allclose(grad_b, 0.5)


@pytest.mark.parametrize('layer,inputs', [
    (lambda: pyramidnet.ShakeDrop(0.5, seed=3),
     lambda n: [np.ones((n, 2), 'float32')]),
    (lambda: shake_shake.ShakeShake(seed=3),
     lambda n: [np.ones((n, 2, 2, 1), 'float32'),
                np.zeros((n, 2, 2, 1), 'float32')])])
def test_true_gradient_backpropagates_the_forward_draws(layer, inputs):
  """Inside true_gradient(), the gradient is the forward coefficient.

  With x = 1 (ShakeDrop) or a = 1, b = 0 (Shake-Shake) the output is the
  forward coefficient and the gradient w.r.t. the first input the backward
  one; the draws are the same inside the context and out.
  """
  n = 1000
  outputs, grads = _coefficients(layer(), inputs(n), training=True)
  with true_gradient.true_gradient():
    true_outputs, true_grads = _coefficients(layer(), inputs(n),
                                             training=True)
  assert not true_gradient.active()
  np.testing.assert_array_equal(true_outputs, outputs)
  forward = outputs.reshape(n, -1)[:, 0]
  np.testing.assert_allclose(true_grads[0].reshape(n, -1)[:, 0], forward,
                             atol=1e-6)
  assert np.abs(grads[0].reshape(n, -1)[:, 0] - forward).max() > 0.1


@pytest.mark.parametrize('name', ['pyramidnet_bottleneck', 'shake_shake'])
def test_true_gradient_is_the_forward_functions(name):
  """A directional derivative by central differences: it is the true one's."""
  keras.utils.set_random_seed(0)
  model = TINY[name](5, MNIST)
  images = _images(MNIST, batch=8)
  labels = tf.constant([0, 1, 2, 3, 4, 0, 1, 2])
  state = [v.value for v in model.non_trainable_variables]
  params = [v.value for v in model.trainable_variables]

  def loss_at(values):
    logits, _ = model.stateless_call(values, state, images, training=True)
    return tf.reduce_mean(
        tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))

  def gradient(true):
    with tf.GradientTape() as tape, true_gradient.true_gradient(true):
      tape.watch(params)
      loss = loss_at(params)
    return tape.gradient(loss, params)

  # Along the true gradient's direction, where the slope is largest.
  true = gradient(True)
  direction = [g / tf.linalg.global_norm(true) for g in true]
  h = 1e-3
  moved = [loss_at([p + sign * h * d for p, d in zip(params, direction)])
           for sign in (1, -1)]
  slope = float(moved[0] - moved[1]) / (2 * h)

  def along(grads):
    return float(sum(tf.reduce_sum(g * d) for g, d in zip(grads, direction)))

  assert along(true) == pytest.approx(slope, rel=0.02)
  assert along(gradient(False)) != pytest.approx(slope, rel=0.1)


@pytest.mark.parametrize(*grid({('shake_shake',)}, name=sorted(TINY)))
def test_same_state_gives_same_draws(name):
  """Two SAM passes (same state) match; the next step's state does not."""
  keras.utils.set_random_seed(0)
  model = TINY[name](5, MNIST)
  images = _images(MNIST)
  params = [v.value for v in model.trainable_variables]
  state = [v.value for v in model.non_trainable_variables]
  first, new_state = model.stateless_call(params, state, images,
                                          training=True)
  second, _ = model.stateless_call(params, state, images, training=True)
  np.testing.assert_array_equal(first, second)

  # Only the seeds advanced: the BN moving statistics do not enter a
  # training-mode pass, so any change comes from new draws.
  seeds = [_is_seed(v) for v in model.non_trainable_variables]
  assert any(seeds)
  for is_seed, old, new in zip(seeds, state, new_state):
    if is_seed:
      assert not np.array_equal(old, new)
  advanced = [new if is_seed else old
              for is_seed, old, new in zip(seeds, state, new_state)]
  third, _ = model.stateless_call(params, advanced, images, training=True)
  assert np.abs(first - third).max() > 1e-3

  inference = model(images, training=False)
  assert np.abs(first - inference).max() > 1e-3


@pytest.mark.parametrize('name', ['pyramidnet_bottleneck', 'shake_shake'])
def test_sam_step_sees_the_same_network_twice(name):
  keras.utils.set_random_seed(0)
  model = TINY[name](5, MNIST)
  images = _images(MNIST, batch=8)
  labels = tf.constant([0, 1, 2, 3, 4, 0, 1, 2])

  def loss_fn_at(state):
    def loss_fn(params):
      logits, new_state = model.stateless_call(params, state, images,
                                               training=True)
      loss = tf.reduce_mean(
          tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
      return loss, new_state
    return loss_fn

  state = [v.value for v in model.non_trainable_variables]
  params = [v.value for v in model.trainable_variables]
  # rho = 0 as a tensor still runs the second pass, at w + 0 = w: with the
  # same draws it reproduces the first exactly.
  out = sam_lib.sam_step(loss_fn_at(state), params, rho=tf.constant(0.0))
  assert float(out.perturbed_loss) == float(out.loss)
  # A small rho moves the loss a little (not rho ||g||: Shake's gradient is
  # not the forward function's).
  out = sam_lib.sam_step(loss_fn_at(state), params, rho=1e-5)
  assert abs(float(out.perturbed_loss - out.loss)) < 1e-3
  # The next step's draws (the first pass's new state) change the loss at w
  # itself far more.
  other, _ = loss_fn_at(out.aux)(params)
  assert abs(float(other - out.loss)) > 1e-2


@pytest.mark.slow
# The basic block's ShakeDrop is the bottleneck's: XLA compiles slowly.
@requires_xla_cpu
@pytest.mark.parametrize('name', ['pyramidnet_bottleneck', 'shake_shake'])
def test_jit_compile(name):
  keras.utils.set_random_seed(0)
  model = TINY[name](5, CIFAR)
  images = _images(CIFAR)
  params = [v.value for v in model.trainable_variables]
  state = [v.value for v in model.non_trainable_variables]
  train = tf.function(
      lambda p, s, x: model.stateless_call(p, s, x, training=True),
      jit_compile=True)
  first, new_state = train(params, state, images)
  second, _ = train(params, state, images)
  # XLA draws other numbers than TensorFlow's kernels from the same seed,
  # but as reproducibly, and advances the seeds as much.
  np.testing.assert_array_equal(first, second)
  _, eager_state = model.stateless_call(params, state, images, training=True)
  for variable, new, eager in zip(model.non_trainable_variables, new_state,
                                  eager_state):
    if _is_seed(variable):
      np.testing.assert_array_equal(new, eager)
  infer = tf.function(lambda x: model(x, training=False), jit_compile=True)
  np.testing.assert_allclose(infer(images), model(images, training=False),
                             rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(*grid({('pyramidnet_basic',)}, name=sorted(TINY)))
def test_draws_are_deterministic(name):
  images = _images(CIFAR)

  def train_outputs(seed):
    keras.utils.set_random_seed(seed)
    model = TINY[name](5, CIFAR)
    return [model(images, training=True).numpy() for _ in range(2)]

  first, second = train_outputs(1), train_outputs(1)
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a, b)
  # Stateful calls advance the seeds.
  assert not np.allclose(first[0], first[1])


def test_checkpoint_restores_the_draws(tmp_path):
  """A resumed run continues the draws where it stopped."""
  keras.utils.set_random_seed(0)
  model = TINY['shake_shake'](5, MNIST)
  images = _images(MNIST)
  checkpoint = tf.train.Checkpoint(model=model)
  path = checkpoint.write(str(tmp_path / 'ckpt'))
  before = model(images, training=True).numpy()
  checkpoint.read(path).assert_consumed()
  np.testing.assert_array_equal(model(images, training=True), before)


@pytest.mark.parametrize(*grid({('pyramidnet_bottleneck',)},
                              name=sorted(TINY)))
def test_save_and_load_round_trip(tmp_path, name):
  keras.utils.set_random_seed(0)
  model = TINY[name](5, MNIST)
  images = _images(MNIST)
  model(images, training=True)  # Advances the seeds.
  path = str(tmp_path / 'model.keras')
  model.save(path)
  loaded = keras.saving.load_model(path)
  assert [v.path for v in loaded.variables] == [
      v.path for v in model.variables]
  np.testing.assert_allclose(loaded(images, training=False),
                             model(images, training=False),
                             rtol=1e-6, atol=1e-6)
  # The seeds were saved too: the next draws match.
  np.testing.assert_allclose(loaded(images, training=True),
                             model(images, training=True),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('make_layer', [
    lambda: pyramidnet.ShakeDrop(0.6, alpha_range=(-0.5, 1.0), seed=3),
    lambda: shake_shake.ShakeShake(seed=4),
    lambda: pyramidnet.ChannelZeroPad(8),
])
def test_layer_config_round_trip(make_layer):
  layer = make_layer()
  config = layer.get_config()
  assert type(layer).from_config(config).get_config() == config
  assert keras.saving.get_registered_name(type(layer)).startswith('sam>')


@pytest.mark.parametrize(*grid(
    {('pyramidnet_basic', ODD), ('pyramidnet_bottleneck', MNIST),
     ('shake_shake', CIFAR)}, name=sorted(TINY),
    input_shape=[CIFAR, MNIST, ODD]))
def test_tiny_forward_pass_shape(name, input_shape):
  model = TINY[name](7, input_shape)
  images = _images(input_shape, batch=2)
  for training in (False, True):
    logits = keras.ops.convert_to_numpy(model(images, training=training))
    assert logits.shape == (2, 7)
    assert np.all(np.isfinite(logits))


@pytest.mark.slow
# MNIST shapes: the tiny models above and the output widths tests.
@pytest.mark.parametrize('name', SMALL_MODELS)
def test_small_forward_pass_shape(name):
  model = models.get_model(name, 7, CIFAR)
  images = _images(CIFAR, batch=2)
  for training in (False, True):
    logits = keras.ops.convert_to_numpy(model(images, training=training))
    assert logits.shape == (2, 7)
    assert np.all(np.isfinite(logits))


@pytest.mark.parametrize('name', SMALL_MODELS)
def test_layer_conventions(name):
  conftest.assert_layer_conventions(models.get_model(name, 10, CIFAR))


@pytest.mark.parametrize('name', sorted(TINY))
def test_variable_paths_do_not_depend_on_build_order(name):
  first = TINY[name](10, CIFAR)
  second = TINY[name](10, CIFAR)
  assert [v.path for v in first.variables] == [
      v.path for v in second.variables]
  # Each seed appears once among the model's state.
  paths = [v.path for v in first.non_trainable_variables]
  assert len(paths) == len(set(paths))


def test_shake_shake_projection_reads_both_pixel_grids():
  # The stride-2 projection from 4 to 8 channels, on a 4x4 input that is
  # zero except at pixel (1, 1): the first path (even rows and columns)
  # sees nothing, the second (shifted right and down) sees it at (1, 1).
  model = shake_shake.shake_shake(8, 4, 2, (4, 4, 3))
  block = keras.Model(model.get_layer('stage2_block1_shortcut_relu').input,
                      model.get_layer('stage2_block1_shortcut_concat').output)
  image = np.zeros((1, 4, 4, 4), 'float32')
  image[0, 1, 1, :] = 1.0
  out = keras.ops.convert_to_numpy(block(image))
  assert out.shape == (1, 2, 2, 8)
  np.testing.assert_array_equal(out[..., :4], 0)
  assert np.all(out[0, 1, 1, 4:] != 0)
  np.testing.assert_array_equal(out[0, 0, :, 4:], 0)
  np.testing.assert_array_equal(out[0, :, 0, 4:], 0)


def test_pyramidnet_shortcut_pools_and_pads_after():
  x = np.arange(2 * 4 * 4 * 3, dtype='float32').reshape(2, 4, 4, 3)
  pooled = keras.layers.AveragePooling2D(2, strides=2, padding='same')(x)
  layer = pyramidnet.ChannelZeroPad(5)
  y = keras.ops.convert_to_numpy(layer(pooled))
  assert y.shape == (2, 2, 2, 5)
  assert layer.compute_output_shape((None, 2, 2, 3)) == (None, 2, 2, 5)
  np.testing.assert_array_equal(y[..., :3], pooled)
  np.testing.assert_array_equal(y[..., 3:], 0)


@pytest.mark.parametrize('kwargs, match', [
    (dict(depth=21, alpha=10, block='bottleneck'), '9n \\+ 2'),
    (dict(depth=11, alpha=10, block='basic'), '6n \\+ 2'),
    (dict(depth=20, alpha=10, block='wide'), 'block'),
    (dict(depth=20, alpha=-1, block='basic'), 'alpha'),
])
def test_pyramidnet_rejects_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    pyramidnet.pyramidnet(num_classes=10, input_shape=CIFAR, **kwargs)


@pytest.mark.parametrize('depth, width, match', [
    (24, 32, '6n \\+ 2'), (2, 32, '6n \\+ 2'), (26, 33, 'even'),
    (26, 0, 'even')])
def test_shake_shake_rejects_bad_arguments(depth, width, match):
  with pytest.raises(ValueError, match=match):
    shake_shake.shake_shake(depth, width, 10, CIFAR)


@pytest.mark.parametrize('prob', [-0.1, 1.5])
def test_shakedrop_rejects_bad_probability(prob):
  with pytest.raises(ValueError, match='survival_prob'):
    pyramidnet.ShakeDrop(prob)


def test_channel_zero_pad_rejects_fewer_channels():
  with pytest.raises(ValueError, match='cannot reduce'):
    pyramidnet.ChannelZeroPad(2)(np.zeros((1, 4, 4, 3), 'float32'))
