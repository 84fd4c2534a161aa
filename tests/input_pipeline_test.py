"""Input pipelines: determinism from (seed, step), sharding, full eval."""

import gzip
import os

import numpy as np
import pytest
import tensorflow as tf

from sam import download
from sam import input_pipeline
from tests.conftest import tiny_config
from tests.conftest import write_idx


def _context(num_pipelines=1, pipeline=0, replicas=1):
  return tf.distribute.InputContext(num_pipelines, pipeline, replicas)


def _labels(ds, n):
  return np.concatenate([y.numpy() for _, y in ds.take(n)])


def test_stream_resumes_exactly():
  config = tiny_config(**{'dataset.augment': 'basic'})
  data = input_pipeline.load(config)
  full = list(input_pipeline.train_dataset(data, config, _context()).take(9))
  tail = list(input_pipeline.train_dataset(data, config, _context(),
                                           start_step=5).take(4))
  for (xa, ya), (xb, yb) in zip(full[5:], tail):
    np.testing.assert_array_equal(xa, xb)
    np.testing.assert_array_equal(ya, yb)


def test_epochs_are_permutations_and_differ():
  config = tiny_config()
  data = input_pipeline.load(config)
  steps = input_pipeline.steps_per_epoch(data, config.batch_size)
  ds = input_pipeline.train_dataset(data, config, _context())
  images = np.concatenate([x.numpy() for x, _ in ds.take(2 * steps)])
  first, second = images[:len(images) // 2], images[len(images) // 2:]

  def flat(a):
    return sorted(map(bytes, a.reshape(len(a), -1)))

  assert flat(first) == flat(second)  # Each epoch sees every example once...
  assert not np.array_equal(first, second)  # ...in a new order.


def test_pipelines_split_the_global_batch():
  config = tiny_config()
  data = input_pipeline.load(config)
  one = _labels(input_pipeline.train_dataset(data, config, _context()), 4)
  parts = [_labels(input_pipeline.train_dataset(
      data, config, _context(2, p, 2)), 4) for p in range(2)]
  assert sorted(one) == sorted(np.concatenate(parts))


@pytest.mark.parametrize('num_pipelines', [1, 2])
def test_eval_counts_every_example_once(num_pipelines):
  config = tiny_config()  # 40 test examples, eval batches of 16.
  data = input_pipeline.load(config)
  seen, total = [], 0
  for p in range(num_pipelines):
    ds = input_pipeline.eval_dataset(
        data, config, _context(num_pipelines, p, num_pipelines))
    batches = list(ds)
    assert len(batches) == input_pipeline.num_eval_steps(
        data, config.eval_batch_size)
    for _, y, mask in batches:
      seen.append(y.numpy()[mask.numpy() == 1])
      total += mask.numpy().sum()
  assert total == len(data.test)
  assert sorted(np.concatenate(seen)) == sorted(data.test.labels)


@pytest.mark.skipif(
    not os.path.exists(input_pipeline.FASHION_MNIST_DIR),
    reason='Debian package dataset-fashion-mnist is not installed')
def test_real_fashion_mnist_files():
  config = tiny_config(**{'dataset.name': 'fashion_mnist'})
  data = input_pipeline.load(config)
  assert data.train.images.shape == (60000, 28, 28, 1)
  assert data.test.images.shape == (10000, 28, 28, 1)
  assert data.train.images.dtype == np.uint8
  assert np.bincount(data.train.labels).tolist() == [6000] * 10
  np.testing.assert_allclose(data.mean, [0.286], atol=1e-3)


def test_train_subset_is_fixed_by_seed():
  config = tiny_config(**{'dataset.train_subset': 32})
  a, b = input_pipeline.load(config), input_pipeline.load(config)
  assert len(a.train) == 32
  np.testing.assert_array_equal(a.train.images, b.train.images)


@pytest.mark.parametrize('name,num_classes', [('cifar10', 10),
                                              ('cifar100', 100)])
def test_tfds_datasets_load_with_mock_data(tmp_path, name, num_classes,
                                          monkeypatch):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  # mock_data stands in for the download; asking its host first (offline
  # here) is download_test.py's.
  monkeypatch.setattr(download, 'check_reachable', lambda *args: None)
  config = tiny_config(**{'dataset.name': name, 'dataset.download': True,
                          'dataset.data_dir': str(tmp_path)})
  with tfds.testing.mock_data(num_examples=24):
    data = input_pipeline.load(config)
  assert data.num_classes == num_classes
  assert data.image_shape == (32, 32, 3)
  assert len(data.train) == 24 and data.train.images.dtype == np.uint8


def test_tfds_not_prepared_says_how_to_prepare(tmp_path):
  config = tiny_config(**{'dataset.name': 'cifar10',
                          'dataset.data_dir': str(tmp_path)})
  with pytest.raises(input_pipeline.DataNotFoundError,
                     match='tfds build cifar10') as e:
    input_pipeline.load(config)
  assert str(tmp_path) in str(e.value)
  assert 'config.dataset.download' in str(e.value)


def test_label_noise_flips_exactly_the_fraction_of_train_labels():
  clean = input_pipeline.load(tiny_config(**{
      'dataset.synthetic_train_size': 1000}))
  config = tiny_config(**{'dataset.synthetic_train_size': 1000,
                          'dataset.label_noise': 0.4})
  noisy = input_pipeline.load(config)
  changed = noisy.train.labels != clean.train.labels
  assert changed.sum() == 400  # Every changed label is a wrong class.
  np.testing.assert_array_equal(noisy.train.images, clean.train.images)
  np.testing.assert_array_equal(noisy.test.labels, clean.test.labels)
  # Symmetric: the wrong labels spread over all other classes.
  assert len(np.unique(noisy.train.labels[changed])) == 10
  again = input_pipeline.load(config)
  np.testing.assert_array_equal(again.train.labels, noisy.train.labels)
  # The flipped examples are known, and the stream carries them.
  np.testing.assert_array_equal(noisy.train.flipped, changed)
  assert clean.train.flipped is None
  # An epoch in one batch: both streams take the examples in one order.
  config.batch_size = 1000
  (_, labels, flipped), = input_pipeline.train_dataset(
      noisy, config, _context()).take(1)
  (_, clean_labels), = input_pipeline.train_dataset(
      clean, tiny_config(**{'dataset.synthetic_train_size': 1000,
                            'batch_size': 1000}), _context()).take(1)
  np.testing.assert_array_equal(flipped, labels != clean_labels)
  assert flipped.numpy().sum() == 400


def test_validation_split_is_held_out_and_evaluated_once():
  config = tiny_config(**{'dataset.validation_size': 24})
  data = input_pipeline.load(config)
  assert len(data.validation) == 24 and len(data.train) == 64 - 24
  whole = sorted(map(bytes, input_pipeline.load(tiny_config()).train.images))
  parts = sorted(map(bytes, np.concatenate(
      [data.train.images, data.validation.images])))
  assert whole == parts
  ds = input_pipeline.eval_dataset(data, config, _context(), 'validation')
  assert sum(m.numpy().sum() for _, _, m in ds) == 24


def test_cutout_zeroes_one_square():
  config = tiny_config(**{'dataset.augment': 'basic_cutout',
                          'dataset.cutout_size': 4,
                          'dataset.synthetic_image_shape': (16, 16, 3)})
  data = input_pipeline.load(config)
  images, _ = next(iter(input_pipeline.train_dataset(data, config,
                                                     _context())))
  zero = np.all(images.numpy() == 0, axis=-1)  # [batch, 16, 16]
  for mask in zero:
    rows, cols = np.nonzero(mask)
    assert 1 <= len(rows) <= 16  # At most 4x4, cut by the border.
    assert rows.max() - rows.min() < 4 and cols.max() - cols.min() < 4


def test_crop_brightness_changes_brightness_deterministically():
  config = tiny_config(**{'dataset.augment': 'crop_brightness'})
  data = input_pipeline.load(config)
  a = next(iter(input_pipeline.train_dataset(data, config, _context())))[0]
  b = next(iter(input_pipeline.train_dataset(data, config, _context())))[0]
  np.testing.assert_array_equal(a, b)
  plain = next(iter(input_pipeline.train_dataset(
      data, tiny_config(), _context())))[0]
  assert not np.allclose(a, plain)


def _fashion_mnist_dir(tmp_path):
  for prefix, n in (('train', 32), ('t10k', 8)):
    write_idx(tmp_path / f'{prefix}-images-idx3-ubyte.gz',
              np.zeros((n, 28, 28)))
    write_idx(tmp_path / f'{prefix}-labels-idx1-ubyte.gz', np.arange(n) % 10)
  return tiny_config(**{'dataset.name': 'fashion_mnist',
                        'dataset.data_dir': str(tmp_path)})


@pytest.mark.parametrize('damage,message', [
    ('truncated', 'is no complete gzip file'),
    ('not gzip', 'is no complete gzip file'),
    ('short data', r'holds 5000 bytes of data, not the 32 x 28 x 28'),
    ('no header', 'is not a uint8 IDX file'),
    ('more labels', r'holds \(32, 28, 28\) images and .* \(33,\) labels'),
    ('fewer labels', r'holds \(32, 28, 28\) images and .* \(31,\) labels'),
    ('other shape', r'the train images are \(32, 32, 1\) and the test '
     r'images \(28, 28, 1\); both splits must hold images of one shape'),
])
def test_damaged_idx_files_are_named(tmp_path, damage, message):
  config = _fashion_mnist_dir(tmp_path)
  images = tmp_path / 'train-images-idx3-ubyte.gz'
  labels = tmp_path / 'train-labels-idx1-ubyte.gz'
  if damage == 'truncated':
    images.write_bytes(images.read_bytes()[:-20])
  elif damage == 'not gzip':
    images.write_bytes(b'<html>not found</html>')
  elif damage == 'short data':
    with gzip.open(images) as f:
      raw = f.read()
    with gzip.open(images, 'wb') as f:
      f.write(raw[:16 + 5000])
  elif damage == 'no header':
    with gzip.open(images, 'wb') as f:
      f.write(b'\x01')
  elif damage == 'other shape':  # CIFAR-sized training images, say.
    write_idx(images, np.zeros((32, 32, 32)))
  else:
    write_idx(labels, np.zeros(33 if damage == 'more labels' else 31))
  with pytest.raises(ValueError, match=message):
    input_pipeline.load(config)
