"""Streamed TFDS data sets ('tfds:NAME'): read from real files on disk."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from sam import autoaugment
from sam import config_checks
from sam import image_folder
from sam import input_pipeline
from sam import streaming
from sam import train
from sam import versions
from tests.conftest import ROOT
from tests.conftest import tiny_config
from tests.train_test import _train

tfds = versions.import_tfds()

TRAIN_SIZE, TEST_SIZE = 37, 11


def _pixel(index: int) -> int:
  """Each example's images are flat in this grey value (JPEG keeps it)."""
  return 5 * index + 10


def prepare_tiny_images(data_dir: str) -> None:
  """The data set 'tiny_images', through a user's path: JPEG files of
  several sizes in FOLDER/SPLIT/CLASS/ (example i flat in _pixel(i), of
  class i % 3) prepared by sam.image_folder."""
  folder = os.path.join(data_dir, 'folder')
  for i in range(TRAIN_SIZE + TEST_SIZE):
    split = 'train' if i < TRAIN_SIZE else 'test'
    os.makedirs(os.path.join(folder, split, f'c{i % 3}'), exist_ok=True)
    image = np.full((20 + i % 7, 24 + i % 5, 3), _pixel(i), np.uint8)
    tf.io.write_file(os.path.join(folder, split, f'c{i % 3}', f'{i}.jpg'),
                     tf.io.encode_jpeg(image))
  assert image_folder.prepare(folder, 'tiny_images', data_dir) == {
      'train': TRAIN_SIZE, 'test': TEST_SIZE}


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tfds'))
  prepare_tiny_images(path)
  return path


def _config(data_dir, **overrides):
  return tiny_config(**{
      'dataset.name': 'tfds:tiny_images', 'dataset.data_dir': data_dir,
      'dataset.image_size': 8, 'dataset.augment': 'none',
      'dataset.shuffle_buffer': 16, 'batch_size': 8, **overrides})


def _context(num_pipelines, pipeline):
  return tf.distribute.InputContext(num_pipelines, pipeline, num_pipelines)


def _indices(images, data):
  """The example index behind each (flat) image of an 'none' stream."""
  pixels = (np.asarray(images) * data.std + data.mean) * 255
  return np.rint((pixels.mean(axis=(1, 2, 3)) - 10) / 5).astype(int)


def test_load_reads_the_splits_and_features(data_dir):
  data = input_pipeline.load(_config(data_dir))
  assert (len(data.train), len(data.test)) == (TRAIN_SIZE, TEST_SIZE)
  assert (data.num_classes, data.image_shape) == (3, (8, 8, 3))
  assert input_pipeline.steps_per_epoch(data, 8) == 4


def test_two_pipelines_read_each_example_once_per_epoch(data_dir):
  config = _config(data_dir)
  data = input_pipeline.load(config)
  epochs = {0: [], 1: []}
  for pipeline in range(2):
    ds = input_pipeline.train_dataset(data, config, _context(2, pipeline))
    batches = [_indices(images, data) for images, _ in ds.take(8)]
    parts = streaming.part_size(data, 'train', _context(2, pipeline))
    assert parts == (19, 18)[pipeline]
    for epoch in range(2):  # 4 batches of 4 per epoch and pipeline.
      epochs[epoch].append(np.concatenate(batches[4 * epoch:4 * epoch + 4]))
  # The parts of the split that the two pipelines read (in file order).
  parts = [{int(e['image'][0, 0, 0] - 10) // 5 for e in tfds.as_numpy(
      data.builder.as_dataset(split=split))}
           for split in tfds.even_splits('train', 2)]
  assert not parts[0] & parts[1]
  assert parts[0] | parts[1] == set(range(TRAIN_SIZE))
  for seen in epochs.values():
    # 16 examples of each part per epoch (4 steps of the global batch of
    # 8; 5 of the 37 are dropped), each once.
    for part, indices in zip(parts, seen):
      assert len(set(indices)) == len(indices) == 16
      assert set(indices) <= part
  assert list(epochs[0][0]) != list(epochs[1][0])  # Reshuffled.


def test_each_epoch_reads_the_blocks_in_an_order_of_its_own(data_dir):
  """Blocks of 4 consecutive records (in file order): each read whole,
  one after another, in another order in the next epoch."""
  config = _config(data_dir, **{'dataset.shuffle_buffer': 4})
  data = input_pipeline.load(config)
  file_order = [int(e['image'][0, 0, 0] - 10) // 5 for e in tfds.as_numpy(
      data.builder.as_dataset(split='train', shuffle_files=False))]
  block_of = {index: position // 4
              for position, index in enumerate(file_order)}
  ds = input_pipeline.train_dataset(data, config, _context(1, 0))
  seen = np.concatenate([_indices(images, data) for images, _ in ds.take(8)])
  orders = []
  for epoch in (seen[:32], seen[32:]):  # 4 steps of 8 per epoch.
    blocks = [block_of[i] for i in epoch]
    runs = [b for k, b in enumerate(blocks) if k == 0 or b != blocks[k - 1]]
    assert len(runs) == len(set(runs)) >= 8  # Each block in one run.
    orders.append(runs)
  assert orders[0] != orders[1]


def test_too_many_blocks_is_one_line(data_dir, monkeypatch):
  monkeypatch.setattr(streaming, 'MAX_BLOCKS', 5)
  config = _config(data_dir, **{'dataset.shuffle_buffer': 4})
  data = input_pipeline.load(config)
  with pytest.raises(ValueError, match=r'shuffle_buffer=4 cuts the 37 '
                     r'examples .* over 5 blocks.*use at least 8\.'):
    input_pipeline.train_dataset(data, config, _context(1, 0))


def test_labels_come_with_their_images(data_dir):
  config = _config(data_dir)
  data = input_pipeline.load(config)
  ds = input_pipeline.train_dataset(data, config, _context(1, 0))
  for images, labels in ds.take(3):
    np.testing.assert_array_equal(labels, _indices(images, data) % 3)


@pytest.mark.parametrize('start', [2, 5])
def test_a_stream_started_at_a_step_is_the_uninterrupted_one(data_dir, start):
  config = _config(data_dir, **{'dataset.augment': 'inception_crop'})
  data = input_pipeline.load(config)
  whole = list(input_pipeline.train_dataset(
      data, config, _context(1, 0)).take(start + 3))
  resumed = list(input_pipeline.train_dataset(
      data, config, _context(1, 0), start).take(3))
  for (x, y), (rx, ry) in zip(whole[start:], resumed):
    np.testing.assert_array_equal(x, rx)
    np.testing.assert_array_equal(y, ry)


def test_two_pipelines_evaluate_each_example_once(data_dir):
  config = _config(data_dir, eval_batch_size=6)
  data = input_pipeline.load(config)
  steps = input_pipeline.num_eval_steps(data, 6)
  seen = []
  for pipeline in range(2):
    batches = list(input_pipeline.eval_dataset(data, config,
                                               _context(2, pipeline)))
    assert len(batches) == steps == 2
    for images, labels, mask in batches:
      kept = np.asarray(mask) == 1
      indices = _indices(images, data)[kept]
      np.testing.assert_array_equal(np.asarray(labels)[kept], indices % 3)
      seen.extend(indices)
  assert sorted(seen) == list(range(TRAIN_SIZE, TRAIN_SIZE + TEST_SIZE))


def _png(image):
  return tf.io.encode_png(tf.constant(image))


def test_evaluation_takes_the_central_crop():
  """40 x 48 image at image_size 8: the central 35 (of the shorter 40 side:
  8 / (8 + 32)) rows and columns, resized to 8 x 8."""
  data = streaming.Data(None, None, None, 10, (8, 8, 3),
                        np.zeros(3, np.float32), np.ones(3, np.float32))
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (40, 48, 3)).astype(np.uint8)
  got = streaming.preprocess(_png(image), None, data, 'none')
  side = 40 * 8 // 40
  top, left = (40 - side + 1) // 2, (48 - side + 1) // 2
  want = tf.image.resize(image[top:top + side, left:left + side], [8, 8])
  np.testing.assert_allclose(got * 255, want, atol=1e-3)
  # A JPEG decodes only the window, to the pixels of a whole decode but in
  # the last column: libjpeg upsamples its colour there without the right
  # neighbour (up to 16 of 255 on this noise).
  jpeg = tf.io.encode_jpeg(tf.constant(image), quality=95)
  decoded = tf.io.decode_jpeg(jpeg).numpy()
  want = tf.image.resize(decoded[top:top + side, left:left + side], [8, 8])
  got = streaming.preprocess(jpeg, None, data, 'none') * 255
  np.testing.assert_allclose(got[:, :-1], want[:, :-1], atol=1e-3)


def test_inception_crop_is_seeded_and_varies():
  data = streaming.Data(None, None, None, 10, (16, 16, 3),
                        np.zeros(3, np.float32), np.ones(3, np.float32))
  image = np.random.default_rng(1).integers(0, 256, (64, 80, 3)).astype(
      np.uint8)
  crops = [streaming.preprocess(_png(image), tf.constant([0, s], tf.int64),
                                data, 'inception_crop').numpy()
           for s in (0, 0, 1, 2)]
  assert crops[0].shape == (16, 16, 3)
  np.testing.assert_array_equal(crops[0], crops[1])
  assert not np.allclose(crops[1], crops[2])
  assert not np.allclose(crops[2], crops[3])


def test_randaugment_follows_the_inception_crop():
  """On the crop rounded to uint8: the same as RandAugment applied there by
  hand with the example's seed folded with 1."""
  data = streaming.Data(None, None, None, 10, (16, 16, 3),
                        np.zeros(3, np.float32), np.full(3, 1 / 255,
                                                          np.float32))
  image = np.random.default_rng(2).integers(0, 256, (64, 80, 3)).astype(
      np.uint8)
  seed = tf.constant([0, 3], tf.int64)
  crop = streaming.preprocess(_png(image), seed, data, 'inception_crop')
  got = streaming.preprocess(_png(image), seed, data, 'inception_crop',
                             (2, 9))
  want = autoaugment.randaugment(
      tf.cast(tf.clip_by_value(tf.round(crop), 0, 255), tf.uint8),
      tf.random.experimental.stateless_fold_in(seed, 1), 2, 9)
  # (Rounding the normalized crop back can move a pixel at .5 by one.)
  assert np.mean(np.abs(got - tf.cast(want, tf.float32)) > 0.5) < 0.02
  np.testing.assert_allclose(got, np.round(got), atol=1e-3)  # Integers.
  assert np.mean(np.abs(got - crop) > 0.5) > 0.5


def test_imagenet2012_records_decode_through_the_preprocessing():
  """tfds.testing.mock_data's imagenet2012 (random JPEGs from the builder's
  code): the features streaming reads, and its records preprocessed for
  training and evaluation at 224. (The mock ignores sub-splits and has no
  split sizes, so the parts and resume are tested on tiny_images.)"""
  with tfds.testing.mock_data(num_examples=4,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    builder = tfds.builder('imagenet2012')
    features = builder.info.features
    assert features['label'].num_classes == 1000
    assert features['image'].shape == (None, None, 3)
    records = builder.as_dataset(
        split='train', decoders={'image': tfds.decode.SkipDecoding()})
    data = streaming.Data(builder, None, None, 1000, (224, 224, 3),
                          streaming.IMAGENET_MEAN, streaming.IMAGENET_STD)
    for i, record in enumerate(records.take(4)):
      assert tf.io.is_jpeg(record['image'])
      for augment, seed in (('inception_crop', [0, i]), ('none', None)):
        image = streaming.preprocess(
            record['image'], seed and tf.constant(seed, tf.int64), data,
            augment)
        assert image.shape == (224, 224, 3)
        assert np.isfinite(image.numpy()).all()


def test_sam_trains_on_a_stream(data_dir):
  config = _config(data_dir, **{'dataset.augment': 'inception_crop',
                                'sam.rho': 0.05})
  trainer = _train(config, tf.distribute.get_strategy(), 3)
  assert int(trainer.state.optimizer.iterations) == 3


def _checkpoint_weights(workdir, step):
  reader = tf.train.load_checkpoint(f'{workdir}/checkpoints/ckpt-{step}')
  return {n: reader.get_tensor(n) for n in reader.get_variable_to_shape_map()
          if 'trainable' in n and 'VARIABLE_VALUE' in n}


@pytest.mark.slow  # Fast: the stream started at a step, above.
def test_a_run_resumed_mid_epoch_is_the_uninterrupted_run(data_dir, tmp_path,
                                                          mirrored, caplog):
  """Stopped at step 6 (mid-epoch 1 of 4 steps) and resumed to 10, on 2
  replicas: the same weights as 10 steps in one go."""
  def config(steps):
    return _config(data_dir, **{
        'dataset.augment': 'inception_crop', 'sam.rho': 0.05,
        'num_train_steps': steps, 'checkpoint_every_steps': 3})
  whole, parts = str(tmp_path / 'whole'), str(tmp_path / 'parts')
  train.train_and_evaluate(config(10), whole, mirrored(2))
  train.train_and_evaluate(config(6), parts, mirrored(2))
  caplog.set_level('INFO')
  results = train.train_and_evaluate(config(10), parts, mirrored(2))
  assert results['step'] == 10
  assert f'Resumed from {parts}/checkpoints/ckpt-6 at step 6' in caplog.text
  want = _checkpoint_weights(whole, 10)
  got = _checkpoint_weights(parts, 10)
  assert sorted(got) == sorted(want) and want
  for name, value in want.items():
    np.testing.assert_array_equal(got[name], value, err_msg=name)


@pytest.mark.parametrize('field,value,message', [
    ('dataset.augment', 'basic', "dataset.augment='basic' is invalid"),
    ('dataset.label_noise', 0.4, 'do not support it yet: set it to 0.0'),
    ('dataset.validation_size', 10, 'do not support it yet: set it to 0'),
    ('dataset.name', 'tfds:', "name the TFDS data set after 'tfds:'"),
    ('probe.every_steps', 5, 'set it to 0 for streams')])
def test_what_streams_do_not_support_is_one_line(data_dir, field, value,
                                                 message):
  with pytest.raises(ValueError, match=message):
    config_checks.validate_config(_config(data_dir, **{field: value}), 1)


def test_an_unknown_data_set_is_one_line(tmp_path):
  with pytest.raises(input_pipeline.DataNotFoundError,
                     match="tfds knows no data set 'no_such_images'"):
    input_pipeline.load(_config(str(tmp_path), **{
        'dataset.name': 'tfds:no_such_images'}))


def test_a_data_set_that_is_not_prepared_says_how(tmp_path):
  with pytest.raises(input_pipeline.DataNotFoundError,
                     match='tfds build mnist --data_dir=DIR'):
    input_pipeline.load(_config(str(tmp_path), **{
        'dataset.name': 'tfds:mnist'}))


class NoiseImages(tfds.core.GeneratorBasedBuilder):
  """4,000 JPEGs of noise, 224 x 224: about 228 MiB of records."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(224, 224, 3),
                                         encoding_format='jpeg'),
            'label': tfds.features.ClassLabel(num_classes=2)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples(4000),
            'test': self._generate_examples(4)}

  def _generate_examples(self, n):
    rng = np.random.default_rng(0)
    for i in range(n):
      yield i, {'image': rng.integers(0, 256, (224, 224, 3), np.uint8),
                'label': i % 2}


_STREAM_TWO_EPOCHS = '''
import sys
from sam import input_pipeline
from tests.streaming_test import _config
import tensorflow as tf

def status_mib(key):  # VmRSS: resident now; VmHWM: the peak so far.
  with open('/proc/self/status') as f:
    return next(int(l.split()[1]) // 1024 for l in f if l.startswith(key))

config = _config(sys.argv[1], **{'dataset.name': 'tfds:noise_images',
                                 'dataset.shuffle_buffer': 50,
                                 'batch_size': 50})
data = input_pipeline.load(config)
ds = input_pipeline.train_dataset(data, config, tf.distribute.InputContext())
iterator = iter(ds)
next(iterator)
before = status_mib('VmRSS:')
for _ in range(2 * len(data.train) // 50):  # Two epochs.
  next(iterator)
print('peak RSS grew by', status_mib('VmHWM:') - before, 'MiB')
'''


@pytest.mark.slow
def test_streaming_keeps_memory_bounded(tmp_path):
  """Two epochs of 228 MiB of records in blocks of 50 (3 MiB): the peak RSS
  grows by about 25 MiB (buffers); holding the records would add them (a
  cache() of the records fails this test). With glibc's default of a malloc
  arena per thread, RSS creeps up epoch after epoch (fragmentation: +180 MiB
  after 6 epochs here); MALLOC_ARENA_MAX=2 keeps it flat (docs/imagenet.md)."""
  NoiseImages(data_dir=str(tmp_path)).download_and_prepare()
  records = sum(f.stat().st_size
                for f in tmp_path.glob('noise_images/*/*-train*'))
  assert records > 200 * 2**20
  out = subprocess.run(
      [sys.executable, '-c', _STREAM_TWO_EPOCHS, str(tmp_path)], cwd=ROOT,
      capture_output=True, text=True, check=True,
      env=dict(os.environ, MALLOC_ARENA_MAX='2'))
  grown = int(re.search(r'grew by (\d+) MiB', out.stdout).group(1))
  print(f'records {records / 2**20:.0f} MiB, peak RSS grew by {grown} MiB')
  assert grown < records / 2**20 / 4
