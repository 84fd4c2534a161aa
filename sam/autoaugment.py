"""AutoAugment with the CIFAR-10 policy, stateless and graph-friendly.

Cubuk et al., "AutoAugment: Learning Augmentation Policies from Data", CVPR
2019 (arXiv:1805.09501). A policy is 25 sub-policies of two (operation,
probability, magnitude) steps; each image gets one sub-policy, drawn
uniformly, and each step applies its operation with its probability.

The operations reproduce those of the authors' PIL code
(tensorflow/models research/autoaugment/augmentation_transforms.py) on uint8
images; tests/autoaugment_test.py compares each with Pillow. Magnitudes
0..9 scale each operation's range by magnitude / 10 (`PARAMETER_MAX = 10`
there), so magnitude 9 is 90% of the maximum. Where this module differs from
that code:

* Posterize keeps 8 - int(m * 4 / 10) bits (8..5), the paper's range [4, 8];
  the code keeps 4 - int(m * 4 / 10) (4..1), outside the paper's range.
* Pixels that an affine operation brings in from outside the image are gray
  128, the fill of the TensorFlow port (tensorflow/tpu, efficientnet's
  autoaugment.py); the PIL code fills them with the data set mean.
* The maximum translation is 10 / 32 of the image side: 10 pixels on CIFAR's
  32, as in the code, and proportionally on other sizes.

Everything is seeded by a `seed` tensor through stateless ops, so the result
is a pure function of (image, seed), and shapes stay static for tf.data.
"""

from collections.abc import Callable
import math

import keras
import tensorflow as tf

# The CIFAR-10 policy: the paper's appendix table (found on reduced
# CIFAR-10), as (operation, probability, magnitude) pairs. Magnitudes of
# AutoContrast, Equalize and Invert are unused.
CIFAR10_POLICY = (
    (('Invert', 0.1, 7), ('Contrast', 0.2, 6)),
    (('Rotate', 0.7, 2), ('TranslateX', 0.3, 9)),
    (('Sharpness', 0.8, 1), ('Sharpness', 0.9, 3)),
    (('ShearY', 0.5, 8), ('TranslateY', 0.7, 9)),
    (('AutoContrast', 0.5, 8), ('Equalize', 0.9, 2)),
    (('ShearY', 0.2, 7), ('Posterize', 0.3, 7)),
    (('Color', 0.4, 3), ('Brightness', 0.6, 7)),
    (('Sharpness', 0.3, 9), ('Brightness', 0.7, 9)),
    (('Equalize', 0.6, 5), ('Equalize', 0.5, 1)),
    (('Contrast', 0.6, 7), ('Sharpness', 0.6, 5)),
    (('Color', 0.7, 7), ('TranslateX', 0.5, 8)),
    (('Equalize', 0.3, 7), ('AutoContrast', 0.4, 8)),
    (('TranslateY', 0.4, 3), ('Sharpness', 0.2, 6)),
    (('Brightness', 0.9, 6), ('Color', 0.2, 8)),
    (('Solarize', 0.5, 2), ('Invert', 0.0, 3)),
    (('Equalize', 0.2, 0), ('AutoContrast', 0.6, 0)),
    (('Equalize', 0.2, 8), ('Equalize', 0.6, 4)),
    (('Color', 0.9, 9), ('Equalize', 0.6, 6)),
    (('AutoContrast', 0.8, 4), ('Solarize', 0.2, 8)),
    (('Brightness', 0.1, 3), ('Color', 0.7, 0)),
    (('Solarize', 0.4, 5), ('AutoContrast', 0.9, 3)),
    (('TranslateY', 0.9, 9), ('TranslateY', 0.7, 9)),
    (('AutoContrast', 0.9, 2), ('Solarize', 0.8, 3)),
    (('Equalize', 0.8, 8), ('Invert', 0.1, 3)),
    (('TranslateY', 0.7, 9), ('AutoContrast', 0.9, 1)),
)
# Magnitudes run over 0..MAX_MAGNITUDE - 1 and are divided by this.
MAX_MAGNITUDE = 10
# Value of the pixels that affine operations bring in from outside.
FILL_VALUE = 128
_MAX_SHEAR = 0.3
# Of the image side: 10 pixels on a 32-pixel image.
_MAX_TRANSLATE = 10 / 32
_MAX_ROTATE_DEGREES = 30
# Enhancement factors run over [_MIN_FACTOR, _MIN_FACTOR + _FACTOR_RANGE).
_MIN_FACTOR = 0.1
_FACTOR_RANGE = 1.8


def _float_level(magnitude: int, maxval: float) -> float:
  return magnitude * maxval / MAX_MAGNITUDE


def _int_level(magnitude: int, maxval: float) -> int:
  return int(magnitude * maxval / MAX_MAGNITUDE)


# Operations. Each maps a uint8 [H, W, C] image (C = 1 or 3) to one of the
# same shape and dtype, like the Pillow function named in its docstring.


def _pil_affine(image: tf.Tensor, matrix) -> tf.Tensor:
  """PIL's `Image.transform(size, AFFINE, matrix, NEAREST, fillcolor=128)`.

  PIL's (a, b, c, d, e, f) maps the centre of output pixel (x, y) to input
  point (a (x + .5) + b (y + .5) + c, d (x + .5) + e (y + .5) + f) and takes
  the pixel there (floor); TensorFlow's transform maps pixel indices and
  rounds, so the offsets shift by half a pixel.
  """
  a, b, c, d, e, f = (tf.cast(v, tf.float32) for v in matrix)
  transform = tf.stack([a, b, c + (a + b - 1) / 2,
                        d, e, f + (d + e - 1) / 2, 0.0, 0.0])
  return keras.ops.image.affine_transform(
      image, transform, interpolation='nearest', fill_mode='constant',
      fill_value=FILL_VALUE, data_format='channels_last')


def shear_x(image: tf.Tensor, shear) -> tf.Tensor:
  """Shears rows: output (x, y) is input (x + shear * y, y)."""
  return _pil_affine(image, (1.0, shear, 0.0, 0.0, 1.0, 0.0))


def shear_y(image: tf.Tensor, shear) -> tf.Tensor:
  """Shears columns: output (x, y) is input (x, y + shear * x)."""
  return _pil_affine(image, (1.0, 0.0, 0.0, shear, 1.0, 0.0))


def translate_x(image: tf.Tensor, pixels) -> tf.Tensor:
  """Moves the image left by `pixels` (right if negative)."""
  return _pil_affine(image, (1.0, 0.0, pixels, 0.0, 1.0, 0.0))


def translate_y(image: tf.Tensor, pixels) -> tf.Tensor:
  """Moves the image up by `pixels` (down if negative)."""
  return _pil_affine(image, (1.0, 0.0, 0.0, 0.0, 1.0, pixels))


def rotate(image: tf.Tensor, degrees) -> tf.Tensor:
  """`Image.rotate(degrees)`: counter-clockwise about the image centre."""
  height, width, _ = image.shape
  angle = -tf.cast(degrees, tf.float32) * (math.pi / 180)
  cos, sin = tf.cos(angle), tf.sin(angle)
  cx, cy = width / 2, height / 2
  return _pil_affine(image, (cos, sin, cx - cos * cx - sin * cy,
                             -sin, cos, cy + sin * cx - cos * cy))


def invert(image: tf.Tensor) -> tf.Tensor:
  """`ImageOps.invert`: 255 - pixel."""
  return 255 - image


def solarize(image: tf.Tensor, threshold) -> tf.Tensor:
  """`ImageOps.solarize`: inverts the pixels >= threshold (256: none)."""
  threshold = tf.cast(threshold, tf.int32)
  return tf.where(tf.cast(image, tf.int32) >= threshold, 255 - image, image)


def posterize(image: tf.Tensor, bits) -> tf.Tensor:
  """`ImageOps.posterize`: keeps the `bits` (1..8) high bits of each pixel."""
  mask = 256 - tf.bitwise.left_shift(1, 8 - tf.cast(bits, tf.int32))
  return tf.bitwise.bitwise_and(image, tf.cast(mask, tf.uint8))


def _apply_luts(image: tf.Tensor, luts: tf.Tensor) -> tf.Tensor:
  """Maps channel c's pixels through luts[c] (int32 [C, 256], 0..255)."""
  channels = tf.transpose(tf.cast(image, tf.int32), [2, 0, 1])
  return tf.cast(tf.transpose(tf.gather(luts, channels, batch_dims=1),
                              [1, 2, 0]), tf.uint8)


def _histograms(image: tf.Tensor) -> tf.Tensor:
  """Per-channel pixel counts, int32 [C, 256]."""
  height, width, channels = image.shape
  pixels = tf.reshape(tf.transpose(tf.cast(image, tf.int32), [2, 0, 1]),
                      [channels, height * width])
  # bincount forgets the static number of channels.
  return tf.ensure_shape(tf.math.bincount(
      pixels, minlength=256, maxlength=256, axis=-1), [channels, 256])


def auto_contrast(image: tf.Tensor) -> tf.Tensor:
  """`ImageOps.autocontrast`: stretches each channel to [0, 255].

  As PIL does, the lookup table is int(v * scale + offset) in double
  precision, and a constant channel stays as it is.
  """
  pixels = tf.reshape(image, [-1, image.shape[-1]])
  lo = tf.cast(tf.reduce_min(pixels, 0), tf.float64)[:, None]
  hi = tf.cast(tf.reduce_max(pixels, 0), tf.float64)[:, None]
  scale = 255.0 / tf.maximum(hi - lo, 1.0)
  values = tf.range(256, dtype=tf.float64)[None, :]
  # Truncation and clipping: int() truncates towards 0, then PIL clips.
  stretched = tf.clip_by_value(tf.floor(values * scale - lo * scale), 0, 255)
  luts = tf.where(hi > lo, stretched, values)
  return _apply_luts(image, tf.cast(luts, tf.int32))


def equalize(image: tf.Tensor) -> tf.Tensor:
  """`ImageOps.equalize`: PIL's histogram equalization of each channel.

  A channel's lookup table is (step // 2 + pixels below v) // step, with
  step = (pixels not at the top value) // 255; channels with one value, or
  step 0, stay as they are.
  """
  hist = _histograms(image)
  top = tf.reduce_max(tf.where(hist > 0, tf.range(256), -1), axis=1)
  step = (tf.reduce_sum(hist, 1) - tf.gather(hist, top, batch_dims=1)) // 255
  below = tf.cumsum(hist, axis=1, exclusive=True)
  safe_step = tf.maximum(step, 1)[:, None]
  equalized = tf.minimum((safe_step // 2 + below) // safe_step, 255)
  keep = (tf.math.count_nonzero(hist, 1) <= 1) | (step == 0)
  luts = tf.where(keep[:, None], tf.range(256)[None, :], equalized)
  return _apply_luts(image, luts)


def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor) -> tf.Tensor:
  """`Image.blend(degenerate, image, factor)`, clipped and truncated."""
  degenerate = tf.cast(degenerate, tf.float32)
  blended = degenerate + tf.cast(factor, tf.float32) * (
      tf.cast(image, tf.float32) - degenerate)
  return tf.cast(tf.floor(tf.clip_by_value(blended, 0.0, 255.0)), tf.uint8)


def _grayscale(image: tf.Tensor) -> tf.Tensor:
  """PIL's convert('L') as int32 [H, W, 1]: ITU-R 601-2 luma, rounded."""
  if image.shape[-1] == 1:
    return tf.cast(image, tf.int32)
  rgb = tf.cast(image, tf.int32)
  weighted = rgb[..., :1] * 19595 + rgb[..., 1:2] * 38470 + rgb[..., 2:] * 7471
  return tf.bitwise.right_shift(weighted + 0x8000, 16)


def color(image: tf.Tensor, factor) -> tf.Tensor:
  """`ImageEnhance.Color`: blends with the grayscale image."""
  gray = tf.broadcast_to(_grayscale(image), image.shape)
  return _blend(gray, image, factor)


def contrast(image: tf.Tensor, factor) -> tf.Tensor:
  """`ImageEnhance.Contrast`: blends with the mean gray level (rounded)."""
  mean = tf.reduce_mean(tf.cast(_grayscale(image), tf.float64))
  return _blend(tf.fill(image.shape, tf.floor(mean + 0.5)), image, factor)


def brightness(image: tf.Tensor, factor) -> tf.Tensor:
  """`ImageEnhance.Brightness`: blends with black."""
  return _blend(tf.zeros(image.shape), image, factor)


def sharpness(image: tf.Tensor, factor) -> tf.Tensor:
  """`ImageEnhance.Sharpness`: blends with PIL's SMOOTH filter of the image.

  SMOOTH is the 3x3 kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13; as in
  PIL, the one-pixel border keeps the original values.
  """
  height, width, channels = image.shape
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, channels, 1])
  pixels = tf.cast(image, tf.float32)
  smooth = tf.nn.depthwise_conv2d(pixels[None], kernel, [1, 1, 1, 1],
                                  'VALID')[0]
  smooth = tf.pad(tf.round(smooth), [[1, 1], [1, 1], [0, 0]])
  interior = tf.pad(tf.ones([height - 2, width - 2], tf.bool),
                    [[1, 1], [1, 1]])
  return _blend(tf.where(interior[:, :, None], smooth, pixels), image,
                factor)


# Operation name -> (function of (image, argument), the argument for a
# magnitude and image shape, whether the argument's sign is random). The
# argument functions follow the authors' code (see the module docstring).
_Op = tuple[Callable[..., tf.Tensor], Callable[[int, tuple], object], bool]


def _factor(magnitude, _):
  return _float_level(magnitude, _FACTOR_RANGE) + _MIN_FACTOR


OPS: dict[str, _Op] = {
    'ShearX': (shear_x, lambda m, _: _float_level(m, _MAX_SHEAR), True),
    'ShearY': (shear_y, lambda m, _: _float_level(m, _MAX_SHEAR), True),
    'TranslateX': (translate_x, lambda m, shape: _int_level(
        m, _MAX_TRANSLATE * shape[1]), True),
    'TranslateY': (translate_y, lambda m, shape: _int_level(
        m, _MAX_TRANSLATE * shape[0]), True),
    'Rotate': (rotate, lambda m, _: _int_level(m, _MAX_ROTATE_DEGREES), True),
    'AutoContrast': (lambda image, _: auto_contrast(image), lambda m, _: 0,
                     False),
    'Equalize': (lambda image, _: equalize(image), lambda m, _: 0, False),
    'Invert': (lambda image, _: invert(image), lambda m, _: 0, False),
    'Solarize': (solarize, lambda m, _: 256 - _int_level(m, 256), False),
    'Posterize': (posterize, lambda m, _: 8 - _int_level(m, 4), False),
    'Color': (color, _factor, False),
    'Contrast': (contrast, _factor, False),
    'Brightness': (brightness, _factor, False),
    'Sharpness': (sharpness, _factor, False),
}


def op_argument(name: str, magnitude: int, image_shape: tuple) -> object:
  """The argument that operation `name` takes for `magnitude` (unsigned)."""
  return OPS[name][1](magnitude, tuple(image_shape))


def _apply_op(image: tf.Tensor, name: str, probability: float,
              magnitude: int, seed: tf.Tensor) -> tf.Tensor:
  """One step of a sub-policy: the operation with its probability."""
  function, argument_of, signed = OPS[name]
  argument = argument_of(magnitude, tuple(image.shape))
  # Two uniforms: whether to apply it, and (if signed) whether to negate.
  apply, negate = tf.unstack(tf.random.stateless_uniform([2], seed))
  if signed:
    argument = tf.where(negate > 0.5, -argument, argument)
  return tf.cond(apply < probability,
                 lambda: tf.ensure_shape(function(image, argument),
                                         image.shape),
                 lambda: image)


def autoaugment(image: tf.Tensor, seed: tf.Tensor,
                policy=CIFAR10_POLICY) -> tf.Tensor:
  """Applies one sub-policy, chosen by `seed`, to one image.

  Args:
    image: uint8 [H, W, C] with C = 1 or 3 and a static shape.
    seed: int32 or int64 [2], the stateless seed; the result is a pure
      function of (image, seed).
    policy: sub-policies, each a sequence of (operation name in OPS,
      probability, magnitude 0..9); the CIFAR-10 policy by default.

  Returns:
    The augmented image, uint8 of the same shape.

  Raises:
    ValueError: if the image is not uint8 with a static 1- or 3-channel
      shape.
  """
  _check_image(image, 'autoaugment')
  choice_seed, *step_seeds = tf.unstack(tf.random.experimental.stateless_split(
      seed, 1 + max(len(s) for s in policy)))
  index = tf.random.stateless_uniform([], choice_seed, 0, len(policy),
                                      tf.int32)

  def branch(sub_policy):
    def apply():
      augmented = image
      for (name, probability, magnitude), step_seed in zip(sub_policy,
                                                           step_seeds):
        augmented = _apply_op(augmented, name, probability, magnitude,
                              step_seed)
      return augmented
    return apply

  augmented = tf.switch_case(index, [branch(s) for s in policy])
  return tf.ensure_shape(augmented, image.shape)


def _check_image(image: tf.Tensor, what: str) -> None:
  if (image.dtype != tf.uint8 or not image.shape.is_fully_defined() or
      image.shape.rank != 3 or image.shape[-1] not in (1, 3)):
    raise ValueError(f'{what} needs a uint8 [H, W, 1 or 3] image of '
                     f'static shape, not {image.dtype.name} {image.shape}.')


# RandAugment's 14 operations: Cubuk et al., "RandAugment: Practical
# automated data augmentation with a reduced search space", NeurIPS 2020,
# Figure 2 (its list of transformations and its sampling code).
RANDAUGMENT_OPS = ('Identity', 'AutoContrast', 'Equalize', 'Rotate',
                   'Solarize', 'Color', 'Posterize', 'Contrast',
                   'Brightness', 'Sharpness', 'ShearX', 'ShearY',
                   'TranslateX', 'TranslateY')


def randaugment(image: tf.Tensor, seed: tf.Tensor, num_layers: int,
                magnitude: int) -> tf.Tensor:
  """RandAugment: `num_layers` operations, each drawn uniformly from
  RANDAUGMENT_OPS (with replacement), all at one `magnitude`.

  The operations and magnitude scale are this module's (AutoAugment's PIL
  code, 0..MAX_MAGNITUDE; signed ones take a random sign). The
  tensorflow/tpu RandAugment (EfficientNet's autoaugment.py) differs: it
  adds Invert, Cutout and SolarizeAdd, has no Identity, and maps its
  magnitudes to other ranges (e.g. translations of up to 100 pixels).

  Args:
    image: uint8 [H, W, C] with C = 1 or 3 and a static shape.
    seed: int32 or int64 [2]; the result is a pure function of (image, seed).
    num_layers: N, the number of operations applied one after the other.
    magnitude: M, in 0..MAX_MAGNITUDE.

  Returns:
    The augmented image, uint8 of the same shape.
  """
  _check_image(image, 'randaugment')
  shape = image.shape
  seeds = tf.unstack(tf.random.experimental.stateless_split(
      seed, 2 * num_layers)) if num_layers else []
  for choice_seed, op_seed in zip(seeds[::2], seeds[1::2]):
    index = tf.random.stateless_uniform([], choice_seed, 0,
                                        len(RANDAUGMENT_OPS), tf.int32)
    branches = [
        (lambda x=image: x) if name == 'Identity' else
        (lambda x=image, name=name, s=op_seed: _apply_op(
            x, name, 1.0, magnitude, s))
        for name in RANDAUGMENT_OPS]
    image = tf.ensure_shape(tf.switch_case(index, branches), shape)
  return image
