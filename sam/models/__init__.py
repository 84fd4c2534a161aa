"""The model zoo: Keras 3 functional models from images to logits.

`get_model(name, num_classes, input_shape)` builds one by the name that
`config.model.name` holds; `MODELS` lists the names. All models output
logits (no softmax), use bias-free He-normal convs before batch norm
(momentum 0.9, epsilon 1e-5) and no kernel regularizer: weight decay is the
trainer's business. The general builders are `resnet.resnet(depth, ...)`
and `wide_resnet.wide_resnet(depth, width, ...)`. Every layer has a fixed
name, so two models built in one process have the same weight paths.

  cnn                         a tiny convnet for quick CPU runs
  resnet20, resnet32,         CIFAR ResNets (He et al., 2016), option-A
  resnet56                    (zero-padding identity) shortcuts
  resnet20_b, resnet32_b,     the same with option-B (1x1 conv + BN
  resnet56_b                  projection) shortcuts
  wrn16_4, wrn16_8, wrn28_10  WideResNets (Zagoruyko & Komodakis, 2016)
"""

import functools
from typing import Callable

import keras

# Modules, not their builder functions: a package attribute named `resnet`
# must stay the submodule. Importing `resnet` also registers its custom layer
# for `keras.saving.load_model`.
from sam.models import resnet
from sam.models import simple
from sam.models import wide_resnet

# Each builder takes (num_classes, input_shape).
_Builder = Callable[[int, tuple[int, int, int]], keras.Model]

_REGISTRY: dict[str, _Builder] = {
    'cnn': simple.cnn,
    'resnet20': functools.partial(resnet.resnet, 20, shortcut='A'),
    'resnet32': functools.partial(resnet.resnet, 32, shortcut='A'),
    'resnet56': functools.partial(resnet.resnet, 56, shortcut='A'),
    'resnet20_b': functools.partial(resnet.resnet, 20, shortcut='B'),
    'resnet32_b': functools.partial(resnet.resnet, 32, shortcut='B'),
    'resnet56_b': functools.partial(resnet.resnet, 56, shortcut='B'),
    'wrn16_4': functools.partial(wide_resnet.wide_resnet, 16, 4),
    'wrn16_8': functools.partial(wide_resnet.wide_resnet, 16, 8),
    'wrn28_10': functools.partial(wide_resnet.wide_resnet, 28, 10),
}

MODELS: tuple[str, ...] = tuple(_REGISTRY)

__all__ = ['MODELS', 'get_model']


def get_model(
    name: str, num_classes: int, input_shape: tuple[int, int, int]
) -> keras.Model:
  """Builds a model of the zoo.

  Deterministic given `keras.utils.set_random_seed`, and with a static input
  shape except for the batch dimension.

  Args:
    name: one of `MODELS`, e.g. 'resnet20' or 'wrn28_10'.
    num_classes: the number of logits.
    input_shape: (height, width, channels) of one image, e.g. (32, 32, 3)
      or (28, 28, 1).

  Returns:
    An uncompiled functional model mapping a (batch, *input_shape) batch of
    images to (batch, num_classes) logits.

  Raises:
    ValueError: if `name` is not one of `MODELS`.
  """
  try:
    builder = _REGISTRY[name]
  except KeyError:
    raise ValueError(
        f'Unknown model {name!r} (config.model.name); valid names: '
        f'{", ".join(MODELS)}.') from None
  return builder(num_classes, tuple(input_shape))
