"""CIFAR ResNets (He et al., 2016), as Keras 3 functional models.

He, Zhang, Ren and Sun, "Deep Residual Learning for Image Recognition",
CVPR 2016, section 4.2: a 3x3 stem conv with 16 filters, then three stages
of n basic blocks each with 16, 32 and 64 filters (the first block of stages
2 and 3 halves the resolution), global average pooling and a dense layer:
6n + 2 weighted layers in all (ResNet-20, -32, -56 for n = 3, 5, 9).

Where a block changes the shape, its shortcut is either
  option A: the identity, subsampled with stride 2 and zero-padded to the new
    number of channels (parameter-free, the paper's choice for CIFAR), or
  option B: a 1x1 convolution with stride 2, followed by batch norm.

The conv and batch-norm factories here are shared with `wide_resnet`.
"""

import types
from typing import Any

import keras
import tensorflow as tf

# Batch-norm settings of the PyTorch and flax CIFAR references: Keras'
# momentum is the weight of the old moving average, so 0.9 here is PyTorch's
# momentum=0.1; epsilon 1e-5 instead of Keras' default 1e-3.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

SHORTCUTS = ('A', 'B')


def conv2d(
    filters: int, kernel_size: int, strides: int, name: str,
    keras_module: types.ModuleType = keras
) -> keras.layers.Conv2D:
  """A bias-free 'same' convolution with He-normal initialization.

  No bias since every conv here feeds a batch norm whose beta supersedes it,
  and no kernel regularizer since the trainer applies weight decay itself.

  Args:
    filters: the number of output channels.
    kernel_size: the (square) kernel size.
    strides: the (square) stride.
    name: the layer name, unique within the model.
    keras_module: the Keras that builds it (`tf_keras` for a Keras 2 twin).

  Returns:
    The layer.
  """
  return keras_module.layers.Conv2D(
      filters, kernel_size, strides=strides, padding='same', use_bias=False,
      kernel_initializer='he_normal', name=name)


@keras.saving.register_keras_serializable(package='sam')
class FusedBatchNormalization(keras.layers.BatchNormalization):
  """Keras 3 batch norm that trains with TensorFlow's fused kernel.

  Keras 3 normalizes with separate moment and normalization ops, which cost
  a ResNet-20 training step about a fifth of its time on a CPU
  (docs/speed.md); TensorFlow's FusedBatchNormV3, which Keras 2 used, does the
  forward and the backward pass in one kernel each (XLA compiles it too,
  tested; on a GPU it is cuDNN's, not measured here). The results are the
  parent's up to float32 rounding: normalization by the batch statistics,
  moving averages of the batch mean and the population (not Bessel-corrected)
  batch variance. Inference, masks, cross-replica (synchronized) statistics
  and anything but 4-D channels-last inputs use the parent's code (Keras
  3.13 added batch renormalization; older Keras has no `renorm`).
  """

  def call(self, inputs, training=None, mask=None):
    rank = len(inputs.shape)
    if (not (training and self.trainable) or mask is not None or rank != 4 or
        self.axis % rank != 3 or getattr(self, 'renorm', False) or
        self.synchronized or
        not (self.scale and self.center)):
      return super().call(inputs, training=training, mask=mask)
    # float32 statistics under mixed precision too, as the parent's.
    x = tf.cast(inputs, tf.float32)
    y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
        x, tf.cast(self.gamma, tf.float32), tf.cast(self.beta, tf.float32),
        epsilon=self.epsilon, data_format='NHWC', is_training=True)
    # The kernel returns the Bessel-corrected variance n/(n-1) * var.
    n = tf.cast(tf.size(x) // tf.shape(x)[-1], tf.float32)
    variance *= (n - 1.0) / n
    for moving, batch in ((self.moving_mean, mean),
                          (self.moving_variance, variance)):
      moving.assign(tf.cast(moving, tf.float32) * self.momentum +
                    batch * (1.0 - self.momentum))
    return tf.cast(y, self.compute_dtype)


def batch_norm(
    name: str, keras_module: types.ModuleType = keras
) -> keras.layers.BatchNormalization:
  """Batch norm over channels-last inputs with the CIFAR reference settings.

  Args:
    name: the layer name, unique within the model.
    keras_module: the Keras that builds it; another Keras than Keras 3
      (`tf_keras`) gets its own batch norm, which is fused in training.

  Returns:
    The layer (fused in training, see `FusedBatchNormalization`).
  """
  if keras_module is not keras:
    return keras_module.layers.BatchNormalization(
        momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=name)
  return FusedBatchNormalization(
      momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=name)


def logits_layer(
    num_classes: int, keras_module: types.ModuleType = keras
) -> keras.layers.Dense:
  """The final dense layer, which outputs logits (no softmax).

  Args:
    num_classes: the number of output units.
    keras_module: the Keras that builds it.

  Returns:
    The layer.
  """
  # float32 even under a mixed-precision policy: the loss and its gradient
  # are numerically sensitive to the logits' precision (as the Keras
  # mixed-precision guide recommends); a no-op under the default policy.
  return keras_module.layers.Dense(num_classes, dtype='float32',
                                   name='logits')


@keras.saving.register_keras_serializable(package='sam')
class ZeroPadShortcut(keras.layers.Layer):
  """The option-A shortcut: strided subsampling, then zero channel padding.

  Maps an input of shape (batch, h, w, c) to (batch, ceil(h / strides),
  ceil(w / strides), filters), with the input's channels in the middle and
  the zeros split evenly before and after them, as in the common reference
  implementations (the half before gets the smaller share if odd).
  Parameter-free. Subsampling keeps rows and columns 0, s, 2s, ... for
  strides s, the ones the option-B shortcut (a 1x1 'same' conv with stride s)
  reads, so that both options see the same pixels.

  Args:
    filters: the number of output channels, at least the input's.
    strides: the subsampling factor along height and width.
    **kwargs: passed to `keras.layers.Layer`.
  """

  def __init__(self, filters: int, strides: int = 1, **kwargs: Any):
    super().__init__(**kwargs)
    self.filters = filters
    self.strides = strides

  def _padding(self, channels: int) -> tuple[int, int]:
    extra = self.filters - channels
    if extra < 0:
      raise ValueError(
          f'ZeroPadShortcut cannot reduce {channels} channels to '
          f'{self.filters}.')
    return extra // 2, extra - extra // 2

  def build(self, input_shape: tuple[int | None, ...]) -> None:
    # Fail at model construction rather than at the first call.
    self._padding(input_shape[-1])

  def call(self, inputs: Any) -> Any:
    x = inputs
    if self.strides > 1:
      x = x[:, ::self.strides, ::self.strides, :]
    before, after = self._padding(x.shape[-1])
    if before or after:
      x = keras.ops.pad(x, [[0, 0], [0, 0], [0, 0], [before, after]])
    return x

  def compute_output_shape(
      self, input_shape: tuple[int | None, ...]
  ) -> tuple[int | None, ...]:
    def subsample(size: int | None) -> int | None:
      return None if size is None else -(-size // self.strides)

    batch, height, width, _ = input_shape
    return batch, subsample(height), subsample(width), self.filters

  def get_config(self) -> dict[str, Any]:
    config = super().get_config()
    config.update(filters=self.filters, strides=self.strides)
    return config


def _basic_block(
    x: keras.KerasTensor, filters: int, strides: int, shortcut: str,
    name: str, k: types.ModuleType
) -> keras.KerasTensor:
  """conv-BN-ReLU-conv-BN, plus the shortcut, then ReLU (post-activation)."""
  y = conv2d(filters, 3, strides, f'{name}_conv1', k)(x)
  y = batch_norm(f'{name}_bn1', k)(y)
  y = k.layers.ReLU(name=f'{name}_relu1')(y)
  y = conv2d(filters, 3, 1, f'{name}_conv2', k)(y)
  y = batch_norm(f'{name}_bn2', k)(y)
  if strides != 1 or x.shape[-1] != filters:
    if shortcut == 'A':
      x = ZeroPadShortcut(filters, strides, name=f'{name}_shortcut')(x)
    else:
      x = conv2d(filters, 1, strides, f'{name}_shortcut_conv', k)(x)
      x = batch_norm(f'{name}_shortcut_bn', k)(x)
  y = k.layers.Add(name=f'{name}_add')([x, y])
  return k.layers.ReLU(name=f'{name}_out')(y)


def resnet(
    depth: int,
    num_classes: int,
    input_shape: tuple[int, int, int],
    shortcut: str = 'A',
    keras_module: types.ModuleType = keras,
) -> keras.Model:
  """A CIFAR ResNet of the given depth.

  Args:
    depth: the number of weighted layers, 6n + 2 (20, 32, 44, 56, 110, ...).
    num_classes: the number of logits.
    input_shape: (height, width, channels), e.g. (32, 32, 3) or (28, 28, 1).
    shortcut: 'A' (zero-padding identity) or 'B' (1x1 conv projection + BN)
      for the blocks that change the shape; other shortcuts are identities.
    keras_module: the Keras that builds it: `tf_keras` builds the same
      architecture with Keras 2 layers (option B only), e.g. for the
      benchmark's Keras 2 rows.

  Returns:
    A functional model from images to logits, named e.g. 'resnet20'
    (option A) or 'resnet20_b' (option B).

  Raises:
    ValueError: if `depth` is not 6n + 2 or `shortcut` is not 'A' or 'B'.
  """
  if depth < 8 or (depth - 2) % 6:
    raise ValueError(f'ResNet depth must be 6n + 2 with n >= 1, got {depth}.')
  if shortcut not in SHORTCUTS:
    raise ValueError(f'ResNet shortcut must be one of {SHORTCUTS}, got '
                     f'{shortcut!r}.')
  if shortcut == 'A' and keras_module is not keras:
    raise ValueError('Option-A shortcuts are Keras 3 layers: build option B '
                     'with another Keras.')
  k = keras_module
  blocks_per_stage = (depth - 2) // 6

  inputs = k.Input(shape=input_shape, name='images')
  x = conv2d(16, 3, 1, 'stem_conv', k)(inputs)
  x = batch_norm('stem_bn', k)(x)
  x = k.layers.ReLU(name='stem_relu')(x)
  for stage, filters in enumerate((16, 32, 64), start=1):
    for block in range(1, blocks_per_stage + 1):
      strides = 2 if stage > 1 and block == 1 else 1
      x = _basic_block(x, filters, strides, shortcut,
                       f'stage{stage}_block{block}', k)
  x = k.layers.GlobalAveragePooling2D(name='pool')(x)
  outputs = logits_layer(num_classes, k)(x)
  suffix = '' if shortcut == 'A' else '_b'
  return k.Model(inputs, outputs, name=f'resnet{depth}{suffix}')
