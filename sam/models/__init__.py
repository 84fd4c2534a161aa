"""The model zoo: Keras 3 functional models from images to logits.

`get_model(name, num_classes, input_shape)` builds one by the name that
`config.model.name` holds; `MODELS` lists the names. All models output
logits (no softmax), use bias-free He-normal convs before batch norm
(momentum 0.9, epsilon 1e-5) and no kernel regularizer: weight decay is the
trainer's business. The general builders are `resnet.resnet(depth, ...)`,
`wide_resnet.wide_resnet(depth, width, ...)`, `pyramidnet.pyramidnet(depth,
alpha, ...)` and `shake_shake.shake_shake(depth, width, ...)`. Every layer
has a fixed name, so two models built in one process have the same weight
paths.

ShakeDrop and Shake-Shake draw their per-example coefficients in training
from seed generators whose states are non-trainable variables: the two SAM
passes of a step, `model.stateless_call`s with the same state, draw the same
coefficients, and the state returned by the first advances them.

  cnn                         a tiny convnet for quick CPU runs
  resnet20, resnet32,         CIFAR ResNets (He et al., 2016), option-A
  resnet56                    (zero-padding identity) shortcuts
  resnet20_b, resnet32_b,     the same with option-B (1x1 conv + BN
  resnet56_b                  projection) shortcuts
  wrn16_4, wrn16_8, wrn28_10  WideResNets (Zagoruyko & Komodakis, 2016)
  pyramidnet110_a48,          PyramidNets (Han et al., 2017): 110 layers
  pyramidnet272_a200          with basic blocks and alpha 48 (1.7M
                              parameters); 272 with bottlenecks and alpha
                              200 (26.0M)
  pyramidnet110_a48_shakedrop,
  pyramidnet272_a200_shakedrop
                              the same with ShakeDrop (Yamada et al., 2018);
                              the SAM paper's Table 1 trains the 272 one
  shake_shake_26_2x32d,       Shake-Shake-Image ResNet-26s (Gastaldi, 2017)
  shake_shake_26_2x64d,       with 2.9M, 11.7M and 26.2M parameters; the
  shake_shake_26_2x96d        SAM paper's Table 1 trains 2x96d
  resnet50                    ResNet-50 v1.5 for ImageNet-sized images
                              (25.6M parameters)
  vit_ti16, vit_s16, vit_b16, Vision Transformers Ti/16, S/16, B/16, S/32,
  vit_s32, vit_b32            B/32 (Dosovitskiy et al., 2021; 22.1M for S/16,
                              86.6M for B/16)
  mixer_s16, mixer_b16        MLP-Mixers S/16 and B/16 (Tolstikhin et al.,
                              2021; 18.5M and 59.9M)
"""

from collections.abc import Callable
import functools
import types

import keras

# Modules, not their builder functions: a package attribute named `resnet`
# must stay the submodule. Importing `resnet` also registers its custom layer
# for `keras.saving.load_model`, as do `pyramidnet` and `shake_shake`.
from sam.models import mixer
from sam.models import pyramidnet
from sam.models import resnet
from sam.models import resnet50
from sam.models import shake_shake
from sam.models import simple
from sam.models import vit
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
    'pyramidnet110_a48': functools.partial(
        pyramidnet.pyramidnet, 110, 48, block='basic'),
    'pyramidnet110_a48_shakedrop': functools.partial(
        pyramidnet.pyramidnet, 110, 48, block='basic', shakedrop=True),
    'pyramidnet272_a200': functools.partial(
        pyramidnet.pyramidnet, 272, 200, block='bottleneck'),
    'pyramidnet272_a200_shakedrop': functools.partial(
        pyramidnet.pyramidnet, 272, 200, block='bottleneck', shakedrop=True),
    'shake_shake_26_2x32d': functools.partial(shake_shake.shake_shake, 26, 32),
    'shake_shake_26_2x64d': functools.partial(shake_shake.shake_shake, 26, 64),
    'shake_shake_26_2x96d': functools.partial(shake_shake.shake_shake, 26, 96),
    'resnet50': resnet50.resnet50,
    **{f'vit_{size}{patch}': functools.partial(vit.vit, size, patch)
       for size, patch in (('ti', 16), ('s', 16), ('b', 16), ('s', 32),
                           ('b', 32))},
    'mixer_s16': functools.partial(mixer.mixer, 's', 16),
    'mixer_b16': functools.partial(mixer.mixer, 'b', 16),
}

MODELS: tuple[str, ...] = tuple(_REGISTRY)

# The models that another Keras (`tf_keras`) can build too, through
# `get_model(..., keras_module=tf_keras)`: the others use Keras 3 layers of
# their own (option-A shortcuts, ShakeDrop, Shake-Shake).
KERAS2_MODELS: tuple[str, ...] = tuple(
    n for n in MODELS if n == 'cnn' or n.startswith('wrn') or
    (n.startswith('resnet') and n.endswith('_b')))

__all__ = ['KERAS2_MODELS', 'MODELS', 'get_model']


def get_model(
    name: str, num_classes: int, input_shape: tuple[int, int, int],
    keras_module: types.ModuleType = keras,
) -> keras.Model:
  """Builds a model of the zoo.

  Deterministic given `keras.utils.set_random_seed`, and with a static input
  shape except for the batch dimension.

  Args:
    name: one of `MODELS`, e.g. 'resnet20' or 'wrn28_10'.
    num_classes: the number of logits.
    input_shape: (height, width, channels) of one image, e.g. (32, 32, 3)
      or (28, 28, 1).
    keras_module: the Keras that builds it; `tf_keras` builds a Keras 2
      twin of one of `KERAS2_MODELS` (same architecture and layer names).

  Returns:
    An uncompiled functional model mapping a (batch, *input_shape) batch of
    images to (batch, num_classes) logits.

  Raises:
    ValueError: if `name` is not one of `MODELS`, or not one of
      `KERAS2_MODELS` with another Keras.
  """
  try:
    builder = _REGISTRY[name]
  except KeyError:
    raise ValueError(
        f'Unknown model {name!r} (config.model.name); valid names: '
        f'{", ".join(MODELS)}.') from None
  if keras_module is keras:
    return builder(num_classes, tuple(input_shape))
  if name not in KERAS2_MODELS:
    raise ValueError(f'{name!r} is built with Keras 3 layers only; another '
                     f'Keras builds {", ".join(KERAS2_MODELS)}.')
  return builder(num_classes, tuple(input_shape), keras_module=keras_module)
