"""Wide ResNets (Zagoruyko & Komodakis, 2016), as Keras 3 functional models.

Zagoruyko and Komodakis, "Wide Residual Networks", BMVC 2016: WRN-d-k has a
3x3 stem conv with 16 filters, then three groups of n = (d - 4) / 6
pre-activation basic blocks (BN-ReLU-conv3x3-BN-ReLU-conv3x3) with 16k, 32k
and 64k filters (the first block of groups 2 and 3 halves the resolution),
a final BN-ReLU, global average pooling and a dense layer. Where a block
changes the shape, its shortcut is a 1x1 convolution of the block's
pre-activated input; elsewhere it is the identity. No dropout.
"""

import types

import keras

from sam.models import resnet


def _preact_block(
    x: keras.KerasTensor, filters: int, strides: int, name: str,
    k: types.ModuleType
) -> keras.KerasTensor:
  """BN-ReLU-conv-BN-ReLU-conv, plus the shortcut (pre-activation)."""
  preact = resnet.batch_norm(f'{name}_bn1', k)(x)
  preact = k.layers.ReLU(name=f'{name}_relu1')(preact)
  y = resnet.conv2d(filters, 3, strides, f'{name}_conv1', k)(preact)
  y = resnet.batch_norm(f'{name}_bn2', k)(y)
  y = k.layers.ReLU(name=f'{name}_relu2')(y)
  y = resnet.conv2d(filters, 3, 1, f'{name}_conv2', k)(y)
  if strides != 1 or x.shape[-1] != filters:
    # The projection reads the pre-activated input, as in the authors' code:
    # the un-normalized sum then only flows on through identity shortcuts.
    x = resnet.conv2d(filters, 1, strides, f'{name}_shortcut_conv', k)(
        preact)
  return k.layers.Add(name=f'{name}_add')([x, y])


def wide_resnet(
    depth: int,
    width: int,
    num_classes: int,
    input_shape: tuple[int, int, int],
    keras_module: types.ModuleType = keras,
) -> keras.Model:
  """A WRN-depth-width.

  Args:
    depth: the number of weighted layers not counting the projection
      shortcuts, 6n + 4 (16, 22, 28, 40, ...).
    width: the widening factor k.
    num_classes: the number of logits.
    input_shape: (height, width, channels), e.g. (32, 32, 3) or (28, 28, 1).
    keras_module: the Keras that builds it (`tf_keras`: a Keras 2 twin).

  Returns:
    A functional model from images to logits, named e.g. 'wrn28_10'.

  Raises:
    ValueError: if `depth` is not 6n + 4 or `width` is not positive.
  """
  if depth < 10 or (depth - 4) % 6:
    raise ValueError(
        f'WideResNet depth must be 6n + 4 with n >= 1, got {depth}.')
  if width < 1:
    raise ValueError(f'WideResNet width must be positive, got {width}.')
  blocks_per_group = (depth - 4) // 6

  k = keras_module
  inputs = k.Input(shape=input_shape, name='images')
  x = resnet.conv2d(16, 3, 1, 'stem_conv', k)(inputs)
  for group, filters in enumerate((16 * width, 32 * width, 64 * width),
                                  start=1):
    for block in range(1, blocks_per_group + 1):
      strides = 2 if group > 1 and block == 1 else 1
      x = _preact_block(x, filters, strides, f'group{group}_block{block}', k)
  # The last block's sum is not yet normalized (pre-activation).
  x = resnet.batch_norm('final_bn', k)(x)
  x = k.layers.ReLU(name='final_relu')(x)
  x = k.layers.GlobalAveragePooling2D(name='pool')(x)
  outputs = resnet.logits_layer(num_classes, k)(x)
  return k.Model(inputs, outputs, name=f'wrn{depth}_{width}')
