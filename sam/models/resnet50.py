"""ResNet-50 v1.5 for ImageNet-sized images, as a Keras 3 functional model.

He, Zhang, Ren and Sun, "Deep Residual Learning for Image Recognition",
CVPR 2016, Table 1 (50-layer): a 7x7/2 stem conv with 64 filters, 3x3/2 max
pooling, four stages of 3, 4, 6 and 3 bottleneck blocks (1x1, 3x3, 1x1 convs
with 64, 128, 256 and 512 filters, the last expanded 4x), global average
pooling and a dense layer. "v1.5" as torchvision, the TF TPU ResNet and
flax's examples/imagenet: a stage's first block downsamples in its 3x3 conv
(v1 does so in the first 1x1). Projection shortcuts (1x1 conv + BN) where
the shape changes. The last batch norm of each block starts at gamma = 0
(Goyal et al. 2017; the TF TPU ResNet's init_zero, flax's zeros scale_init),
so every block starts as the identity. 25,557,032 trainable parameters for
1000 classes (a test checks), the 25.6M of the paper.
"""

import keras

from sam.models import resnet

STAGES = ((64, 3), (128, 4), (256, 6), (512, 3))  # (width, blocks).
EXPANSION = 4


def _bottleneck(x, width: int, strides: int, name: str):
  shortcut = x
  if strides != 1 or x.shape[-1] != width * EXPANSION:
    shortcut = resnet.conv2d(width * EXPANSION, 1, strides, f'{name}_proj')(x)
    shortcut = resnet.batch_norm(f'{name}_proj_bn')(shortcut)
  for i, (filters, kernel, stride) in enumerate(
      ((width, 1, 1), (width, 3, strides))):
    x = resnet.conv2d(filters, kernel, stride, f'{name}_conv{i + 1}')(x)
    x = resnet.batch_norm(f'{name}_bn{i + 1}')(x)
    x = keras.layers.ReLU(name=f'{name}_relu{i + 1}')(x)
  x = resnet.conv2d(width * EXPANSION, 1, 1, f'{name}_conv3')(x)
  x = resnet.FusedBatchNormalization(
      momentum=resnet.BN_MOMENTUM, epsilon=resnet.BN_EPSILON,
      gamma_initializer='zeros', name=f'{name}_bn3')(x)
  x = keras.layers.Add(name=f'{name}_add')([x, shortcut])
  return keras.layers.ReLU(name=f'{name}_out')(x)


def resnet50(num_classes: int,
             input_shape: tuple[int, int, int]) -> keras.Model:
  """ResNet-50 v1.5 from (batch, *input_shape) images to logits.

  Args:
    num_classes: the number of logits.
    input_shape: (height, width, channels), e.g. (224, 224, 3); any size of
      at least 32 x 32 (the resolution is divided by 32).

  Returns:
    The model, named 'resnet50'.
  """
  inputs = keras.Input(shape=input_shape, name='images')
  x = resnet.conv2d(64, 7, 2, 'stem_conv')(inputs)
  x = resnet.batch_norm('stem_bn')(x)
  x = keras.layers.ReLU(name='stem_relu')(x)
  x = keras.layers.MaxPooling2D(3, 2, padding='same', name='stem_pool')(x)
  for stage, (width, blocks) in enumerate(STAGES, start=1):
    for block in range(blocks):
      strides = 2 if stage > 1 and block == 0 else 1
      x = _bottleneck(x, width, strides, f'stage{stage}_block{block + 1}')
  x = keras.layers.GlobalAveragePooling2D(name='pool')(x)
  outputs = resnet.logits_layer(num_classes)(x)
  return keras.Model(inputs, outputs, name='resnet50')
