"""MLP-Mixers, as Keras 3 functional models.

Tolstikhin et al., "MLP-Mixer: An all-MLP Architecture for Vision", NeurIPS
2021, Figure 1 and eq. 1: non-overlapping p x p patches linearly
embedded (a p x p conv with stride p) into S tokens of C channels, then
`depth` blocks of a token-mixing MLP (LayerNorm, across the S tokens:
Dense(D_S), GELU, Dense(S), residual) and a channel-mixing MLP (LayerNorm,
across the C channels: Dense(D_C), GELU, Dense(C), residual), a final
LayerNorm, the mean over the tokens and a dense head. S/16 and B/16, the
sizes Chen et al. 2022 (When Vision Transformers Outperform ResNets...)
train with SAM, as big_vision's models/mlp_mixer.py sizes them (S: C 512, 8
blocks, D_S 256, D_C 2048; B: 768, 12, 384, 3072) and initializes them:
LeCun-normal kernels (flax's default), zero biases, the head zero, LayerNorm
epsilon 1e-6; no dropout or stochastic depth. One difference: flax's GELU
is its tanh approximation, this the exact GELU (as this zoo's ViTs; the two
differ by under 1e-3 anywhere). 18,528,264 (S/16) and 59,880,472 (B/16)
trainable parameters for 1000 classes at 224 x 224 (a test checks the hand
count): the 59.9M published for Mixer-B/16.
"""

import keras

from sam.models import vit

# name -> (channels C, blocks, token MLP width D_S, channel MLP width D_C).
SIZES = {'s': (512, 8, 256, 2048), 'b': (768, 12, 384, 3072)}
LN_EPSILON = 1e-6
_INIT = 'lecun_normal'


def _mlp(x, hidden: int, name: str):
  """Dense(hidden), GELU, Dense back to x's last dimension."""
  out = x.shape[-1]
  x = keras.layers.Dense(hidden, activation='gelu', kernel_initializer=_INIT,
                         name=f'{name}1')(x)
  return keras.layers.Dense(out, kernel_initializer=_INIT,
                            name=f'{name}2')(x)


def _block(x, token_width: int, channel_width: int, name: str):
  y = keras.layers.LayerNormalization(epsilon=LN_EPSILON,
                                      name=f'{name}_ln1')(x)
  y = keras.layers.Permute((2, 1), name=f'{name}_to_channels')(y)
  y = _mlp(y, token_width, f'{name}_token_mlp')
  y = keras.layers.Permute((2, 1), name=f'{name}_to_tokens')(y)
  x = keras.layers.Add(name=f'{name}_add1')([x, y])
  y = keras.layers.LayerNormalization(epsilon=LN_EPSILON,
                                      name=f'{name}_ln2')(x)
  y = _mlp(y, channel_width, f'{name}_channel_mlp')
  return keras.layers.Add(name=f'{name}_add2')([x, y])


def mixer(size: str, patch: int, num_classes: int,
          input_shape: tuple[int, int, int]) -> keras.Model:
  """Mixer-{size}/{patch} from (batch, *input_shape) images to logits.

  Args:
    size: 's' or 'b' (see SIZES).
    patch: the patch size, e.g. 16.
    num_classes: the number of logits.
    input_shape: (height, width, channels), both sides multiples of `patch`
      (the token MLP's output width is the number of patches).

  Returns:
    The model, named e.g. 'mixer_b16'.

  Raises:
    ValueError: if the image does not divide into patches.
  """
  channels, depth, token_width, channel_width = SIZES[size]
  inputs, x = vit.patch_tokens(input_shape, patch, channels, 'Mixer', _INIT)
  for i in range(depth):
    x = _block(x, token_width, channel_width, f'block{i + 1}')
  x = keras.layers.LayerNormalization(epsilon=LN_EPSILON, name='final_ln')(x)
  x = keras.layers.GlobalAveragePooling1D(name='token_mean')(x)
  return keras.Model(inputs, vit.zero_logits(x, num_classes),
                     name=f'mixer_{size}{patch}')
