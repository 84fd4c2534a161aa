"""AutoAugment: each operation against Pillow, the policy, the seeding."""

import numpy as np
from PIL import Image
from PIL import ImageEnhance
from PIL import ImageOps
import pytest
import tensorflow as tf

from sam import autoaugment
from sam import input_pipeline
from tests.conftest import tiny_config

_FILL = (autoaugment.FILL_VALUE,) * 3


def _images():
  """Small test images: full range, narrow range, with a constant channel."""
  rng = np.random.default_rng(0)
  wide = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
  narrow = rng.integers(60, 120, (12, 16, 3), dtype=np.uint8)
  narrow[..., 1] = 77  # One value: autocontrast and equalize leave it be.
  # Two values, mostly one of them: equalize's step is 0.
  two = np.where(rng.random((12, 16, 3)) < 0.02, 200, 10).astype(np.uint8)
  return [wide, narrow, two]


def _check(ours: tf.Tensor, theirs: Image.Image, max_diff: int = 0,
           max_fraction: float = 0.0):
  """Values differ by at most max_diff, at most max_fraction of them."""
  ours = ours.numpy()
  theirs = np.asarray(theirs).reshape(ours.shape)
  assert ours.dtype == np.uint8
  diff = np.abs(ours.astype(int) - theirs.astype(int))
  assert diff.max() <= max_diff and np.mean(diff > 0) <= max_fraction, (
      f'{np.mean(diff > 0):.3f} of the values differ, by up to {diff.max()}')


# Exact: lookup-table operations match Pillow bit for bit.
@pytest.mark.parametrize('name,ours,theirs', [
    ('invert', autoaugment.invert, ImageOps.invert),
    ('auto_contrast', autoaugment.auto_contrast, ImageOps.autocontrast),
    ('equalize', autoaugment.equalize, ImageOps.equalize),
])
def test_lookup_ops_match_pillow_exactly(name, ours, theirs):
  del name  # For the test id.
  for image in _images():
    _check(ours(tf.constant(image)), theirs(Image.fromarray(image)))


def test_solarize_and_posterize_match_pillow_exactly():
  for image in _images():
    pil = Image.fromarray(image)
    for threshold in (0, 26, 128, 255, 256):
      _check(autoaugment.solarize(tf.constant(image), threshold),
             ImageOps.solarize(pil, threshold))
    for bits in range(1, 9):
      _check(autoaugment.posterize(tf.constant(image), bits),
             ImageOps.posterize(pil, bits))


def test_one_channel_images_match_pillow():
  gray = _images()[0][..., :1]
  pil = Image.fromarray(gray[..., 0])
  _check(autoaugment.equalize(tf.constant(gray)), ImageOps.equalize(pil))
  _check(autoaugment.auto_contrast(tf.constant(gray)),
         ImageOps.autocontrast(pil))
  for ours, enhancer in ((autoaugment.color, ImageEnhance.Color),
                         (autoaugment.contrast, ImageEnhance.Contrast),
                         (autoaugment.sharpness, ImageEnhance.Sharpness)):
    _check(ours(tf.constant(gray), 1.72), enhancer(pil).enhance(1.72),
           max_diff=1, max_fraction=0.01)


# Within 1, for at most 1% of the values: blends are float32 here, double or
# float in Pillow, both then truncated, so a value on an integer may land one
# below. (On these images they match exactly.)
@pytest.mark.parametrize('ours,enhancer', [
    (autoaugment.color, ImageEnhance.Color),
    (autoaugment.contrast, ImageEnhance.Contrast),
    (autoaugment.brightness, ImageEnhance.Brightness),
    (autoaugment.sharpness, ImageEnhance.Sharpness),
], ids=['color', 'contrast', 'brightness', 'sharpness'])
def test_enhance_ops_match_pillow_within_one(ours, enhancer):
  for image in _images():
    for factor in (0.1, 0.46, 1.0, 1.72, 1.9):
      _check(ours(tf.constant(image), factor),
             enhancer(Image.fromarray(image)).enhance(factor), max_diff=1,
             max_fraction=0.01)


# At most 1% of the values differ: the input pixel is found by flooring in
# Pillow and by rounding half a pixel lower here, which can differ where a
# coordinate falls on a pixel edge. (On these images they match exactly.)
@pytest.mark.parametrize('name,values,pil_matrix', [
    ('shear_x', (-0.3, -0.09, 0.27), lambda v: (1, v, 0, 0, 1, 0)),
    ('shear_y', (-0.3, -0.09, 0.27), lambda v: (1, 0, 0, v, 1, 0)),
    ('translate_x', (-10, -3, 9), lambda v: (1, 0, v, 0, 1, 0)),
    ('translate_y', (-10, -3, 9), lambda v: (1, 0, 0, 0, 1, v)),
])
def test_affine_ops_match_pillow_nearest_with_gray_fill(name, values,
                                                        pil_matrix):
  image = _images()[0]
  height, width, _ = image.shape
  for value in values:
    theirs = Image.fromarray(image).transform(
        (width, height), Image.AFFINE, pil_matrix(value), Image.NEAREST,
        fillcolor=_FILL)
    _check(getattr(autoaugment, name)(tf.constant(image), value), theirs,
           max_diff=255, max_fraction=0.01)


def test_rotate_matches_pillow_nearest_with_gray_fill():
  image = _images()[0]
  for degrees in (-30, -6, 17, 30):
    theirs = Image.fromarray(image).rotate(degrees, Image.NEAREST,
                                           fillcolor=_FILL)
    _check(autoaugment.rotate(tf.constant(image), degrees), theirs,
           max_diff=255, max_fraction=0.01)
  # Gray comes in at the corners.
  rotated = autoaugment.rotate(tf.constant(image), 30).numpy()
  assert np.all(rotated[0, 0] == autoaugment.FILL_VALUE)


def test_policy_is_the_papers_cifar10_table():
  policy = autoaugment.CIFAR10_POLICY
  assert len(policy) == 25
  for sub_policy in policy:
    assert len(sub_policy) == 2
    for name, probability, magnitude in sub_policy:
      assert name in autoaugment.OPS
      assert 0.0 <= probability <= 1.0
      assert isinstance(magnitude, int) and 0 <= magnitude <= 9
  assert policy[0] == (('Invert', 0.1, 7), ('Contrast', 0.2, 6))
  assert policy[5] == (('ShearY', 0.2, 7), ('Posterize', 0.3, 7))
  assert policy[24] == (('TranslateY', 0.7, 9), ('AutoContrast', 0.9, 1))
  # 13 of the 14 operations of the search space appear (no ShearX).
  used = {name for sub_policy in policy for name, _, _ in sub_policy}
  assert used == set(autoaugment.OPS) - {'ShearX'}


@pytest.mark.parametrize('name,magnitude,expected', [
    ('ShearX', 9, 0.27), ('ShearY', 0, 0.0),
    ('TranslateX', 9, 9), ('TranslateY', 3, 3),  # On 32 pixels.
    ('Rotate', 2, 6), ('Rotate', 9, 27),
    ('Solarize', 0, 256), ('Solarize', 2, 205), ('Solarize', 9, 26),
    ('Posterize', 0, 8), ('Posterize', 7, 6), ('Posterize', 9, 5),
    ('Color', 0, 0.1), ('Sharpness', 9, 1.72),
])
def test_magnitudes_map_as_in_the_authors_code(name, magnitude, expected):
  assert autoaugment.op_argument(name, magnitude, (32, 32, 3)) == (
      pytest.approx(expected))


def _augmented(image, seeds, policy=autoaugment.CIFAR10_POLICY):
  """autoaugment over seeds (0, s), inside tf.data.Dataset.map."""
  ds = tf.data.Dataset.from_tensor_slices(
      tf.stack([tf.zeros_like(seeds), seeds], axis=1))
  return ds.map(lambda seed: autoaugment.autoaugment(tf.constant(image), seed,
                                                     policy))


def _augment_many(image, seeds, policy=autoaugment.CIFAR10_POLICY):
  return np.stack([x.numpy() for x in _augmented(image, seeds, policy)])


@pytest.mark.slow
def test_runs_in_dataset_map_and_is_a_function_of_the_seed():
  # Not the full range, so that AutoContrast changes it too.
  image = np.random.default_rng(1).integers(40, 200, (32, 32, 3), np.uint8)
  seeds = tf.range(32, dtype=tf.int64)
  ds = _augmented(image, seeds)
  first, second = (np.stack([x.numpy() for x in ds]) for _ in range(2))
  assert first.shape == (32, 32, 32, 3) and first.dtype == np.uint8
  np.testing.assert_array_equal(first, second)
  # Different seeds, different images; but 22% of the draws change nothing on
  # average, and many make the same change (AutoContrast then Equalize, say):
  # here 7 are the image itself and 16 are distinct.
  unchanged = np.all(first == image, axis=(1, 2, 3))
  assert 1 <= unchanged.sum() <= 14
  assert len({x.tobytes() for x in first}) >= 12
  eager = autoaugment.autoaugment(tf.constant(image),
                                  tf.constant([0, 3], tf.int64))
  np.testing.assert_array_equal(eager, first[3])


def test_probabilities_and_random_signs():
  image = np.random.default_rng(2).integers(0, 256, (8, 8, 3), np.uint8)
  seeds = tf.range(64, dtype=tf.int64)
  always = _augment_many(image, seeds, ((('Invert', 1.0, 0),
                                         ('Invert', 0.0, 0)),))
  np.testing.assert_array_equal(always, np.broadcast_to(255 - image,
                                                        always.shape))
  half = _augment_many(image, seeds, ((('Invert', 0.5, 0),),))
  inverted = np.all(half == 255 - image, axis=(1, 2, 3))
  assert np.all(inverted | np.all(half == image, axis=(1, 2, 3)))
  assert 16 <= inverted.sum() <= 48
  # TranslateX by 2 pixels (magnitude 9 on 8 pixels), to either side.
  moved = _augment_many(image, seeds, ((('TranslateX', 1.0, 9),),))
  left = np.all(moved[:, :, :-2] == image[:, 2:], axis=(1, 2, 3))
  right = np.all(moved[:, :, 2:] == image[:, :-2], axis=(1, 2, 3))
  assert np.all(left ^ right) and 16 <= left.sum() <= 48


def test_rejects_images_it_cannot_augment():
  with pytest.raises(ValueError, match='uint8'):
    autoaugment.autoaugment(tf.zeros([8, 8, 3]), tf.constant([0, 0]))
  with pytest.raises(ValueError, match='uint8'):
    autoaugment.autoaugment(tf.zeros([8, 8, 4], tf.uint8),
                            tf.constant([0, 0]))


@pytest.mark.slow
def test_train_dataset_with_autoaugment():
  config = tiny_config(**{'dataset.augment': 'autoaugment',
                          'dataset.cutout_size': 4})
  context = tf.distribute.InputContext(1, 0, 1)
  data = input_pipeline.load(config)
  ds = input_pipeline.train_dataset(data, config, context)
  images, labels = next(iter(ds))
  assert images.shape == (16, 8, 8, 3) and images.dtype == tf.float32
  assert labels.shape == (16,)
  assert np.all(np.isfinite(images))
  again = next(iter(ds))[0]  # A new iterator: the stream from its start.
  np.testing.assert_array_equal(images, again)
  # The policy changes what basic_cutout alone gives, and a square is cut.
  cutout = next(iter(input_pipeline.train_dataset(
      data, tiny_config(**{'dataset.augment': 'basic_cutout',
                           'dataset.cutout_size': 4}), context)))[0]
  assert not np.allclose(images, cutout)
  assert np.all(np.any(np.all(images.numpy() == 0, axis=-1), axis=(1, 2)))


def _candidates(image, magnitude):
  """RandAugment's operations at `magnitude`, both signs: name -> images."""
  shape = image.shape
  out = {'Identity': [image]}
  for name in autoaugment.RANDAUGMENT_OPS[1:]:
    function, argument_of, signed = autoaugment.OPS[name]
    argument = argument_of(magnitude, shape)
    out[name] = [function(tf.constant(image), a).numpy()
                 for a in ((argument, -argument) if signed else (argument,))]
  return out


def test_randaugment_layer_is_one_of_its_operations_at_the_magnitude():
  """Each draw of one layer is one of the 14 operations, applied always."""
  image = np.random.default_rng(3).integers(40, 200, (16, 16, 3), np.uint8)
  candidates = _candidates(image, 7)
  draw = tf.function(lambda seed: autoaugment.randaugment(
      tf.constant(image), seed, 1, 7))
  seen = []
  for i in range(112):
    got = draw(tf.constant([5, i], tf.int64)).numpy()
    names = [n for n, images in candidates.items()
             if any(np.array_equal(got, x) for x in images)]
    assert names, f'seed {i}: not one of the operations'
    seen.append(names[0])
  # 112 draws of 14 (8 each on average): every operation comes up.
  assert set(seen) == set(autoaugment.RANDAUGMENT_OPS)


def test_randaugment_layers_compose_and_follow_the_seed():
  image = np.random.default_rng(4).integers(0, 256, (8, 8, 3), np.uint8)
  seed = tf.constant([1, 2], tf.int64)
  np.testing.assert_array_equal(
      autoaugment.randaugment(tf.constant(image), seed, 0, 9), image)
  two = autoaugment.randaugment(tf.constant(image), seed, 2, 9)
  np.testing.assert_array_equal(
      two, autoaugment.randaugment(tf.constant(image), seed, 2, 9))
  assert two.dtype == tf.uint8 and two.shape == image.shape
  with pytest.raises(ValueError, match='randaugment needs a uint8'):
    autoaugment.randaugment(tf.zeros([8, 8, 3]), seed, 2, 9)


def test_train_dataset_with_randaugment():
  config = tiny_config(**{'dataset.augment': 'basic',
                          'dataset.randaugment_layers': 2})
  context = tf.distribute.InputContext(1, 0, 1)
  data = input_pipeline.load(config)
  ds = input_pipeline.train_dataset(data, config, context)
  images = next(iter(ds))[0]
  np.testing.assert_array_equal(images, next(iter(ds))[0])
  config.dataset.randaugment_layers = 0
  basic = next(iter(input_pipeline.train_dataset(data, config, context)))[0]
  assert not np.allclose(images, basic)
