"""Shake-Shake ResNets (Gastaldi, 2017), as Keras 3 functional models.

Gastaldi, "Shake-Shake regularization", arXiv:1705.07485 (2017), and the
author's Torch code: a ResNet-(6n + 2) "2xWd" has a 3x3 stem conv with 16
filters and batch norm, then three stages of n blocks with W, 2W and 4W
filters (the first block of stages 2 and 3 halves the resolution), a ReLU,
global average pooling and a dense layer. A block adds two residual
branches, each ReLU-conv3x3-BN-ReLU-conv3x3-BN, to its shortcut. Where a
block changes the shape, its shortcut is a ReLU, then two 1x1 convs with
W' / 2 filters each, one on the input subsampled at the block's stride and
one on the input shifted by one pixel right and down, so that it sees the
other pixels; their concatenation goes through batch norm. Elsewhere the
shortcut is the identity.

"Shake-Shake-Image": in training, each example's branches are mixed as
alpha a + (1 - alpha) b in the forward pass and with beta instead of alpha
in the backward pass, alpha and beta ~ U[0, 1] drawn independently per
example and per block; at inference, (a + b) / 2. The paper's ResNet-26
2x32d, 2x64d and 2x96d have 2.9M, 11.7M and 26.2M parameters; the SAM paper
(Table 1) trains 2x96d.

The SAM code (google-research/sam, after the AutoAugment code) omits the
shortcut's ReLU and shifts left and up instead; parameters are the same.
"""

from typing import Any

import keras

from sam.models import resnet
from sam.models import true_gradient


@keras.saving.register_keras_serializable(package='sam')
class ShakeShake(keras.layers.Layer):
  """Mixes two residual branches, with per-example forward/backward draws.

  Called on [a, b]; in training, returns alpha a + (1 - alpha) b with the
  gradient of beta a + (1 - beta) b (of alpha a + (1 - alpha) b inside
  `sam.models.true_gradient.true_gradient()`). Randomness comes from a
  `keras.random.SeedGenerator` whose state is a non-trainable variable of
  this layer: `model.stateless_call` with the same non-trainable state draws
  the same alpha and beta, which SAM needs for its two passes at w and
  w + eps to see the same network; the returned state advances the seed.
  The state is also a non-trainable weight, `seed_state`, so that
  checkpoints and saved models hold it.

  Args:
    seed: the seed of the draws; None draws one from Python's `random`,
      which `keras.utils.set_random_seed` makes reproducible.
    **kwargs: passed to `keras.layers.Layer`.
  """

  def __init__(self, seed: int | None = None, **kwargs: Any):
    super().__init__(**kwargs)
    self.seed = seed
    # Named after the layer: the default name is numbered process-wide, so
    # the state's path would depend on what was built before.
    self.seed_generator = keras.random.SeedGenerator(
        seed, name=f'{self.name}_seed')
    # Also a non-trainable weight: Keras does not track seed generators for
    # `tf.train.Checkpoint` or `model.save`, and a resumed run must continue
    # the draws where it stopped.
    self.seed_state = self.seed_generator.state

  def call(self, inputs: Any, training: bool | None = None) -> Any:
    a, b = inputs
    if not training:
      return 0.5 * (a + b)
    # One draw per example, broadcast over the other axes.
    shape = (keras.ops.shape(a)[0],) + (1,) * (len(a.shape) - 1)
    alpha = keras.ops.cast(
        keras.random.uniform(shape, seed=self.seed_generator), a.dtype)
    beta = keras.ops.cast(
        keras.random.uniform(shape, seed=self.seed_generator), a.dtype)
    if true_gradient.active():  # SAM's ascent pass (drawn all the same).
      beta = alpha
    difference = a - b
    backward = b + beta * difference
    # Forward value b + alpha (a - b), gradient that of `backward`: the
    # stop_gradient term has no gradient.
    return backward + keras.ops.stop_gradient((alpha - beta) * difference)

  def compute_output_shape(
      self, input_shape: list[tuple[int | None, ...]]
  ) -> tuple[int | None, ...]:
    return tuple(input_shape[0])

  def get_config(self) -> dict[str, Any]:
    config = super().get_config()
    config.update(seed=self.seed)
    return config


def _branch(x: keras.KerasTensor, filters: int, strides: int,
            name: str) -> keras.KerasTensor:
  """ReLU-conv-BN-ReLU-conv-BN."""
  y = keras.layers.ReLU(name=f'{name}_relu1')(x)
  y = resnet.conv2d(filters, 3, strides, name=f'{name}_conv1')(y)
  y = resnet.batch_norm(name=f'{name}_bn1')(y)
  y = keras.layers.ReLU(name=f'{name}_relu2')(y)
  y = resnet.conv2d(filters, 3, 1, name=f'{name}_conv2')(y)
  return resnet.batch_norm(name=f'{name}_bn2')(y)


def _projection_shortcut(x: keras.KerasTensor, filters: int, strides: int,
                         name: str) -> keras.KerasTensor:
  """ReLU, two 1x1 convs on differently subsampled pixels, concat, BN."""
  x = keras.layers.ReLU(name=f'{name}_relu')(x)
  # A 1x1 'same' conv with stride s reads rows and columns 0, s, 2s, ...:
  # the paper's 1x1 average pooling with stride s, then a 1x1 conv.
  path1 = resnet.conv2d(filters // 2, 1, strides, name=f'{name}_conv1')(x)
  # Shifted one pixel right and down (a zero row and column enter at the
  # top and left), so that with stride 2 the second path reads the odd rows
  # and columns the first one skips.
  shifted = keras.layers.ZeroPadding2D(((1, 0), (1, 0)),
                                       name=f'{name}_shift_pad')(x)
  shifted = keras.layers.Cropping2D(((0, 1), (0, 1)),
                                    name=f'{name}_shift_crop')(shifted)
  path2 = resnet.conv2d(filters // 2, 1, strides,
                        name=f'{name}_conv2')(shifted)
  y = keras.layers.Concatenate(name=f'{name}_concat')([path1, path2])
  return resnet.batch_norm(name=f'{name}_bn')(y)


def _shake_shake_block(x: keras.KerasTensor, filters: int, strides: int,
                       name: str) -> keras.KerasTensor:
  """Two branches mixed by `ShakeShake`, plus the shortcut (no final ReLU)."""
  a = _branch(x, filters, strides, name=f'{name}_branch1')
  b = _branch(x, filters, strides, name=f'{name}_branch2')
  y = ShakeShake(name=f'{name}_shake')([a, b])
  if strides != 1 or x.shape[-1] != filters:
    x = _projection_shortcut(x, filters, strides, name=f'{name}_shortcut')
  return keras.layers.Add(name=f'{name}_add')([x, y])


def shake_shake(
    depth: int,
    width: int,
    num_classes: int,
    input_shape: tuple[int, int, int],
) -> keras.Model:
  """A Shake-Shake ResNet-depth 2x`width`d.

  Args:
    depth: the number of weighted layers along a path through one branch of
      each block, 6n + 2 (26 for n = 4 blocks per stage).
    width: W, the filters of the first stage (32, 64 or 96 in the paper);
      even, since the projection shortcuts split it in halves.
    num_classes: the number of logits.
    input_shape: (height, width, channels), e.g. (32, 32, 3) or (28, 28, 1).

  Returns:
    A functional model from images to logits, named e.g.
    'shake_shake_26_2x96d'.

  Raises:
    ValueError: if `depth` is not 6n + 2 or `width` is not positive and even.
  """
  if depth < 8 or (depth - 2) % 6:
    raise ValueError(
        f'Shake-Shake depth must be 6n + 2 with n >= 1, got {depth}.')
  if width < 2 or width % 2:
    raise ValueError(
        f'Shake-Shake width must be positive and even, got {width}.')
  blocks_per_stage = (depth - 2) // 6

  inputs = keras.Input(shape=input_shape, name='images')
  x = resnet.conv2d(16, 3, 1, name='stem_conv')(inputs)
  # No ReLU: the branches and projections start with one.
  x = resnet.batch_norm(name='stem_bn')(x)
  for stage, filters in enumerate((width, 2 * width, 4 * width), start=1):
    for block in range(1, blocks_per_stage + 1):
      strides = 2 if stage > 1 and block == 1 else 1
      x = _shake_shake_block(x, filters, strides,
                             name=f'stage{stage}_block{block}')
  x = keras.layers.ReLU(name='final_relu')(x)
  x = keras.layers.GlobalAveragePooling2D(name='pool')(x)
  outputs = resnet.logits_layer(num_classes)(x)
  return keras.Model(inputs, outputs, name=f'shake_shake_{depth}_2x{width}d')
