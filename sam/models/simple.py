"""A tiny convolutional network for quick CPU runs and smoke tests.

Two 3x3 conv layers (32 and 64 filters, ReLU, each followed by 2x2 max
pooling), a flatten, a 128-unit ReLU hidden layer and a dense logits layer:
the classic Keras MNIST convnet, without dropout or batch norm so that it has
no state besides its weights. About 0.4M parameters on 28x28 inputs.
"""

import types

import keras

from sam.models import resnet


def cnn(num_classes: int, input_shape: tuple[int, int, int],
        keras_module: types.ModuleType = keras) -> keras.Model:
  """The tiny convnet.

  Args:
    num_classes: the number of logits.
    input_shape: (height, width, channels), e.g. (28, 28, 1) or (32, 32, 3).
    keras_module: the Keras that builds it (`tf_keras`: a Keras 2 twin).

  Returns:
    A functional model from images to logits, named 'cnn'.
  """
  k = keras_module
  inputs = k.Input(shape=input_shape, name='images')
  x = inputs
  for i, filters in enumerate((32, 64), start=1):
    # With no batch norm after it, the conv keeps its bias.
    x = k.layers.Conv2D(
        filters, 3, padding='same', activation='relu',
        kernel_initializer='he_normal', name=f'conv{i}')(x)
    x = k.layers.MaxPooling2D(2, name=f'pool{i}')(x)
  x = k.layers.Flatten(name='flatten')(x)
  x = k.layers.Dense(
      128, activation='relu', kernel_initializer='he_normal',
      name='hidden')(x)
  outputs = resnet.logits_layer(num_classes, k)(x)
  return k.Model(inputs, outputs, name='cnn')
