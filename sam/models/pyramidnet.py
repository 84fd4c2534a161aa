"""PyramidNets (Han et al., 2017), optionally with ShakeDrop (Yamada et al.).

Han, Kim and Kim, "Deep Pyramidal Residual Networks", CVPR 2017: a 3x3 stem
conv with 16 filters and batch norm, then three stages of n residual blocks
(the first block of stages 2 and 3 halves the resolution), a final
BN-ReLU, global average pooling and a dense layer. Instead of doubling at
each stage, the width grows by alpha / N at every one of the N = 3n blocks,
so that block k (1-based, across stages) has 16 + floor(alpha k / N)
channels (times 4 at the output of a bottleneck block). The blocks are
  basic (depth 6n + 2): BN-conv3x3-BN-ReLU-conv3x3-BN, and
  bottleneck (depth 9n + 2): BN-conv1x1-BN-ReLU-conv3x3-BN-ReLU-conv1x1-BN,
with the stride in the first 3x3 conv. The shortcut is
parameter-free: 2x2 average pooling where the resolution halves, then zero
channels appended after the input's.

Yamada, Iwamura, Akiba and Kise, "ShakeDrop Regularization for Deep Residual
Learning", IEEE Access 2019 (arXiv:1802.02375): block l of L scales its
residual branch F(x) by b + alpha - b alpha in the forward pass and by
b + beta - b beta in the backward pass, with b ~ Bernoulli(p_l),
alpha ~ U[-1, 1] and beta ~ U[0, 1] drawn per example, and the survival
probability p_l = 1 - (l / L)(1 - p_L) decaying linearly to p_L = 0.5. At
inference the branch is scaled by the expectation, p_l + E[alpha](1 - p_l).

The SAM paper's Table 1 trains PyramidNet-272 (bottleneck, alpha = 200) with
ShakeDrop. Its code (google-research/sam, after the AutoAugment code) rounds
the widths instead of truncating them (`round_channels=True`
here), which gives 26.2M parameters instead of the PyramidNet paper's 26.0M.
"""

from typing import Any

import keras

from sam.models import resnet
from sam.models import true_gradient

BLOCKS = ('basic', 'bottleneck')

# p_L, the survival probability of the last block (the ShakeDrop paper's
# choice, also that of the SAM and AutoAugment code).
FINAL_SURVIVAL_PROB = 0.5


@keras.saving.register_keras_serializable(package='sam')
class ShakeDrop(keras.layers.Layer):
  """ShakeDrop on a residual branch, with per-example draws.

  Randomness comes from a `keras.random.SeedGenerator` whose state is a
  non-trainable variable of this layer. `model.stateless_call` with the same
  non-trainable state therefore draws the same b, alpha and beta, which SAM
  needs for its two passes at w and w + eps to see the same network; the
  returned state advances the seed for the next step. The state is also a
  non-trainable weight, `seed_state`, so that checkpoints and saved models
  hold it.

  Args:
    survival_prob: p, the probability that b = 1 (the branch passes
      unchanged in the forward and backward pass).
    alpha_range: (min, max) of the uniform forward coefficient alpha.
    beta_range: (min, max) of the uniform backward coefficient beta.
    seed: the seed of the draws; None draws one from Python's `random`,
      which `keras.utils.set_random_seed` makes reproducible.
    **kwargs: passed to `keras.layers.Layer`.
  """

  def __init__(self, survival_prob: float,
               alpha_range: tuple[float, float] = (-1.0, 1.0),
               beta_range: tuple[float, float] = (0.0, 1.0),
               seed: int | None = None, **kwargs: Any):
    super().__init__(**kwargs)
    if not 0 <= survival_prob <= 1:
      raise ValueError(
          f'ShakeDrop survival_prob must be in [0, 1], got {survival_prob}.')
    self.survival_prob = float(survival_prob)
    self.alpha_range = tuple(float(a) for a in alpha_range)
    self.beta_range = tuple(float(b) for b in beta_range)
    self.seed = seed
    # Named after the layer: the default name is numbered process-wide, so
    # the state's path would depend on what was built before.
    self.seed_generator = keras.random.SeedGenerator(
        seed, name=f'{self.name}_seed')
    # Also a non-trainable weight: Keras does not track seed generators for
    # `tf.train.Checkpoint` or `model.save`, and a resumed run must continue
    # the draws where it stopped.
    self.seed_state = self.seed_generator.state

  @property
  def expected_scale(self) -> float:
    """E[b + alpha - b alpha], the branch's scale at inference."""
    p = self.survival_prob
    mean_alpha = sum(self.alpha_range) / 2
    return p + mean_alpha - p * mean_alpha

  def call(self, inputs: Any, training: bool | None = None) -> Any:
    if not training:
      return inputs * self.expected_scale
    # One draw per example, broadcast over the other axes.
    shape = (keras.ops.shape(inputs)[0],) + (1,) * (len(inputs.shape) - 1)
    kept = (keras.random.uniform(shape, seed=self.seed_generator)
            < self.survival_prob)
    alpha = keras.random.uniform(shape, *self.alpha_range,
                                 seed=self.seed_generator)
    beta = keras.random.uniform(shape, *self.beta_range,
                                seed=self.seed_generator)
    if true_gradient.active():  # SAM's ascent pass (drawn all the same).
      beta = alpha
    # b + alpha - b alpha is 1 where b = 1 and alpha where b = 0; `where`
    # gives the 1 exactly.
    forward = keras.ops.cast(keras.ops.where(kept, 1.0, alpha), inputs.dtype)
    backward = keras.ops.cast(keras.ops.where(kept, 1.0, beta), inputs.dtype)
    # Forward value inputs * forward, gradient backward: the stop_gradient
    # term has no gradient.
    return inputs * backward + keras.ops.stop_gradient(
        inputs * (forward - backward))

  def compute_output_shape(
      self, input_shape: tuple[int | None, ...]
  ) -> tuple[int | None, ...]:
    return input_shape

  def get_config(self) -> dict[str, Any]:
    config = super().get_config()
    config.update(survival_prob=self.survival_prob,
                  alpha_range=self.alpha_range, beta_range=self.beta_range,
                  seed=self.seed)
    return config


@keras.saving.register_keras_serializable(package='sam')
class ChannelZeroPad(keras.layers.Layer):
  """Appends zero channels after the input's, up to `filters` channels.

  The PyramidNet shortcut: the new channels of a block get no identity.

  Args:
    filters: the number of output channels, at least the input's.
    **kwargs: passed to `keras.layers.Layer`.
  """

  def __init__(self, filters: int, **kwargs: Any):
    super().__init__(**kwargs)
    self.filters = filters

  def _extra(self, channels: int) -> int:
    extra = self.filters - channels
    if extra < 0:
      raise ValueError(f'ChannelZeroPad cannot reduce {channels} channels '
                       f'to {self.filters}.')
    return extra

  def build(self, input_shape: tuple[int | None, ...]) -> None:
    # Fail at model construction rather than at the first call.
    self._extra(input_shape[-1])

  def call(self, inputs: Any) -> Any:
    extra = self._extra(inputs.shape[-1])
    if not extra:
      return inputs
    rank = len(inputs.shape)
    return keras.ops.pad(inputs, [[0, 0]] * (rank - 1) + [[0, extra]])

  def compute_output_shape(
      self, input_shape: tuple[int | None, ...]
  ) -> tuple[int | None, ...]:
    return (*input_shape[:-1], self.filters)

  def get_config(self) -> dict[str, Any]:
    config = super().get_config()
    config.update(filters=self.filters)
    return config


def block_channels(k: int, alpha: int, total_blocks: int,
                   round_channels: bool = False) -> int:
  """The width of block k (1-based) of N: 16 + alpha k / N, made integral.

  In integers, so that no float error can move a width across an integer.

  Args:
    k: the block's index over all stages, from 1 to `total_blocks`.
    alpha: the total widening.
    total_blocks: N, the number of blocks in all stages.
    round_channels: round half up instead of truncating.

  Returns:
    The number of channels of the block's convs (before a bottleneck's x4).
  """
  if round_channels:
    return 16 + (2 * alpha * k + total_blocks) // (2 * total_blocks)
  return 16 + alpha * k // total_blocks


def _residual_branch(x: keras.KerasTensor, channels: int, strides: int,
                     block: str, name: str) -> keras.KerasTensor:
  """The basic or bottleneck branch, ending in batch norm (no ReLU)."""
  y = resnet.batch_norm(name=f'{name}_bn1')(x)
  if block == 'basic':
    y = resnet.conv2d(channels, 3, strides, name=f'{name}_conv1')(y)
    y = resnet.batch_norm(name=f'{name}_bn2')(y)
    y = keras.layers.ReLU(name=f'{name}_relu1')(y)
    y = resnet.conv2d(channels, 3, 1, name=f'{name}_conv2')(y)
    return resnet.batch_norm(name=f'{name}_bn3')(y)
  y = resnet.conv2d(channels, 1, 1, name=f'{name}_conv1')(y)
  y = resnet.batch_norm(name=f'{name}_bn2')(y)
  y = keras.layers.ReLU(name=f'{name}_relu1')(y)
  y = resnet.conv2d(channels, 3, strides, name=f'{name}_conv2')(y)
  y = resnet.batch_norm(name=f'{name}_bn3')(y)
  y = keras.layers.ReLU(name=f'{name}_relu2')(y)
  y = resnet.conv2d(4 * channels, 1, 1, name=f'{name}_conv3')(y)
  return resnet.batch_norm(name=f'{name}_bn4')(y)


def _pyramid_block(x: keras.KerasTensor, channels: int, strides: int,
                   block: str, survival_prob: float | None,
                   name: str) -> keras.KerasTensor:
  """A residual branch (with ShakeDrop unless `survival_prob` is None)."""
  y = _residual_branch(x, channels, strides, block, name)
  if survival_prob is not None:
    y = ShakeDrop(survival_prob, name=f'{name}_shakedrop')(y)
  if strides != 1:
    x = keras.layers.AveragePooling2D(
        2, strides=strides, padding='same', name=f'{name}_shortcut_pool')(x)
  if x.shape[-1] != y.shape[-1]:
    x = ChannelZeroPad(y.shape[-1], name=f'{name}_shortcut_pad')(x)
  # No ReLU after the sum: the next block starts with batch norm.
  return keras.layers.Add(name=f'{name}_add')([x, y])


def pyramidnet(
    depth: int,
    alpha: int,
    num_classes: int,
    input_shape: tuple[int, int, int],
    block: str = 'basic',
    shakedrop: bool = False,
    round_channels: bool = False,
) -> keras.Model:
  """A PyramidNet of the given depth and widening, optionally with ShakeDrop.

  Args:
    depth: the number of weighted layers, 6n + 2 for basic blocks (110, ...)
      or 9n + 2 for bottleneck blocks (164, 272, ...).
    alpha: the total widening: the last block has 16 + alpha channels
      (4 (16 + alpha) at the output of a bottleneck).
    num_classes: the number of logits.
    input_shape: (height, width, channels), e.g. (32, 32, 3) or (28, 28, 1).
    block: 'basic' or 'bottleneck'.
    shakedrop: whether each residual branch goes through `ShakeDrop`, with
      survival probabilities decaying linearly to 0.5 at the last block.
    round_channels: round the widths half up, as the SAM and AutoAugment
      code do, instead of truncating them as the PyramidNet paper does.

  Returns:
    A functional model from images to logits, named e.g.
    'pyramidnet272_a200_shakedrop'.

  Raises:
    ValueError: if `block` is unknown, `depth` does not fit it or `alpha` is
      negative.
  """
  if block not in BLOCKS:
    raise ValueError(f'PyramidNet block must be one of {BLOCKS}, got '
                     f'{block!r}.')
  layers_per_block = 2 if block == 'basic' else 3
  if depth < 3 * layers_per_block + 2 or (depth - 2) % (3 * layers_per_block):
    raise ValueError(
        f'PyramidNet depth with {block} blocks must be '
        f'{3 * layers_per_block}n + 2 with n >= 1, got {depth}.')
  if alpha < 0:
    raise ValueError(f'PyramidNet alpha must be >= 0, got {alpha}.')
  blocks_per_stage = (depth - 2) // (3 * layers_per_block)
  total_blocks = 3 * blocks_per_stage

  inputs = keras.Input(shape=input_shape, name='images')
  x = resnet.conv2d(16, 3, 1, name='stem_conv')(inputs)
  # No ReLU: the first block starts with batch norm.
  x = resnet.batch_norm(name='stem_bn')(x)
  k = 0
  for stage in range(1, 4):
    for index in range(1, blocks_per_stage + 1):
      k += 1
      survival_prob = None
      if shakedrop:
        survival_prob = 1 - k / total_blocks * (1 - FINAL_SURVIVAL_PROB)
      x = _pyramid_block(
          x, block_channels(k, alpha, total_blocks, round_channels),
          strides=2 if stage > 1 and index == 1 else 1, block=block,
          survival_prob=survival_prob, name=f'stage{stage}_block{index}')
  # The last block's sum is not yet normalized (pre-activation).
  x = resnet.batch_norm(name='final_bn')(x)
  x = keras.layers.ReLU(name='final_relu')(x)
  x = keras.layers.GlobalAveragePooling2D(name='pool')(x)
  outputs = resnet.logits_layer(num_classes)(x)
  suffix = '_shakedrop' if shakedrop else ''
  return keras.Model(inputs, outputs,
                     name=f'pyramidnet{depth}_a{alpha}{suffix}')
