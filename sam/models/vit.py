"""Vision Transformers (ViT), as Keras 3 functional models.

Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image
Recognition at Scale", ICLR 2021, Table 1 and eq. 1-4: non-overlapping
p x p patches linearly embedded (a p x p conv with stride p), a learned
class token, learned position embeddings, `depth` pre-norm encoder blocks
(LayerNorm, multi-head self-attention, residual; LayerNorm, MLP of 4x the
width with GELU, residual), a final LayerNorm, and a dense head on the class
token. Ti/S/B as in Steiner et al. 2021 (How to train your ViT) and Chen et
al. 2022 (When Vision Transformers Outperform ResNets...), which train them
with SAM: widths 192/384/768, 3/6/12 heads, 12 blocks. LayerNorm epsilon
1e-6, the head initialized to zero and the position embeddings from
N(0, 0.02), as the big_vision and google-research/vision_transformer code.
No dropout (SAM's ViT recipes use none for these sizes). 22,050,664 (S/16)
and 86,567,656 (B/16) trainable parameters for 1000 classes at 224 x 224
(a test checks): the 22.1M and 86.6M of the papers.
"""

import keras

# name -> (width, heads); every size here has 12 blocks and MLP ratio 4.
SIZES = {'ti': (192, 3), 's': (384, 6), 'b': (768, 12)}
DEPTH = 12
LN_EPSILON = 1e-6


@keras.saving.register_keras_serializable(package='sam')
class ClassTokenAndPositions(keras.layers.Layer):
  """Prepends a learned class token and adds learned position embeddings."""

  def build(self, input_shape):
    _, tokens, width = input_shape
    self.class_token = self.add_weight(
        shape=(1, 1, width), initializer='zeros', name='class_token')
    self.positions = self.add_weight(
        shape=(1, tokens + 1, width),
        initializer=keras.initializers.RandomNormal(stddev=0.02),
        name='positions')

  def call(self, patches):
    batch = keras.ops.shape(patches)[0]
    token = keras.ops.broadcast_to(
        keras.ops.cast(self.class_token, patches.dtype),
        (batch, 1, patches.shape[-1]))
    return (keras.ops.concatenate([token, patches], axis=1) +
            keras.ops.cast(self.positions, patches.dtype))


@keras.saving.register_keras_serializable(package='sam')
class FirstToken(keras.layers.Layer):
  """The class token's output: (batch, tokens, width) -> (batch, width)."""

  def call(self, tokens):
    return tokens[:, 0]


def _block(x, width: int, heads: int, name: str):
  y = keras.layers.LayerNormalization(epsilon=LN_EPSILON,
                                      name=f'{name}_ln1')(x)
  y = keras.layers.MultiHeadAttention(heads, width // heads,
                                      name=f'{name}_attention')(y, y)
  x = keras.layers.Add(name=f'{name}_add1')([x, y])
  y = keras.layers.LayerNormalization(epsilon=LN_EPSILON,
                                      name=f'{name}_ln2')(x)
  y = keras.layers.Dense(4 * width, activation='gelu', name=f'{name}_mlp1')(y)
  y = keras.layers.Dense(width, name=f'{name}_mlp2')(y)
  return keras.layers.Add(name=f'{name}_add2')([x, y])


def patch_tokens(input_shape: tuple[int, int, int], patch: int, width: int,
                 model: str, kernel_initializer: str = 'glorot_uniform'):
  """The images' input and its p x p patches embedded: (batch, tokens, width).

  Raises:
    ValueError: naming `model`, if the image does not divide into patches.
  """
  height, width_px, _ = input_shape
  if height % patch or width_px % patch:
    raise ValueError(f'{model} with {patch}x{patch} patches needs image sides '
                     f'that are multiples of {patch}, got {input_shape[:2]}.')
  inputs = keras.Input(shape=input_shape, name='images')
  x = keras.layers.Conv2D(width, patch, strides=patch,
                          kernel_initializer=kernel_initializer,
                          name='patches')(inputs)
  return inputs, keras.layers.Reshape((-1, width), name='tokens')(x)


def zero_logits(x, num_classes: int):
  """The head, zero-initialized; float32 logits under a mixed policy, as
  resnet.logits_layer."""
  return keras.layers.Dense(num_classes, kernel_initializer='zeros',
                            dtype='float32', name='logits')(x)


def vit(size: str, patch: int, num_classes: int,
        input_shape: tuple[int, int, int]) -> keras.Model:
  """ViT-{size}/{patch} from (batch, *input_shape) images to logits.

  Args:
    size: 'ti', 's' or 'b' (see SIZES).
    patch: the patch size, e.g. 16 or 32.
    num_classes: the number of logits.
    input_shape: (height, width, channels), both sides multiples of `patch`.

  Returns:
    The model, named e.g. 'vit_s16'.

  Raises:
    ValueError: if the image does not divide into patches.
  """
  width, heads = SIZES[size]
  inputs, x = patch_tokens(input_shape, patch, width, 'ViT')
  x = ClassTokenAndPositions(name='embedding')(x)
  for i in range(DEPTH):
    x = _block(x, width, heads, f'block{i + 1}')
  x = keras.layers.LayerNormalization(epsilon=LN_EPSILON, name='final_ln')(x)
  x = FirstToken(name='class_output')(x)
  return keras.Model(inputs, zero_logits(x, num_classes),
                     name=f'vit_{size}{patch}')
