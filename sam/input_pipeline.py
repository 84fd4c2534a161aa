"""Input pipelines: data sets in memory, a deterministic stream, sharding.

Every data set here fits in host memory (CIFAR-10/100: 150 MB, Fashion-MNIST:
47 MB), so each host loads its split into NumPy once and builds `tf.data`
pipelines from index permutations. That buys two properties the trainer
relies on:

* The training stream is a pure function of (seed, step): epoch e visits the
  examples in `stateless_shuffle(range(N), seed=(seed, e))` order, each
  example's augmentation is seeded by (seed, epoch, index), and a pipeline
  started at step s yields exactly what an uninterrupted one would have
  yielded from step s on. So resuming needs no iterator checkpoint.
* Batches never straddle epochs: each epoch uses its first
  `steps_per_epoch * global_batch` examples of the permutation.

With several hosts, pipeline p takes every P-th example of each epoch's
permutation and of the test set; its replicas take consecutive per-replica
batches (`distribute_datasets_from_function`). Data sets too large for
memory (ImageNet, `dataset.name='tfds:NAME'`) stream from their TFDS files
(sam/streaming.py) behind the same functions.
"""

import dataclasses
import gzip
import os
import zlib

from absl import logging
import ml_collections
import numpy as np
import tensorflow as tf

from sam import autoaugment
from sam import download
from sam import streaming
from sam import versions

DATASETS = ('cifar10', 'cifar100', 'fashion_mnist', 'synthetic')
# basic: pad 4, random crop, horizontal flip (the SAM paper's basic
# augmentation); basic_cutout: and a cutout square (DeVries & Taylor 2017);
# crop_brightness: pad-and-crop plus random brightness (the original TF SAM
# notebook's choice); autoaugment: basic, then a sub-policy of AutoAugment's
# CIFAR-10 policy (Cubuk et al. 2019, sam/autoaugment.py), then cutout, the
# order of that paper.
AUGMENTATIONS = ('none', 'basic', 'basic_cutout', 'crop_brightness',
                 'autoaugment')
# Largest brightness change of crop_brightness, in [0, 1] pixel units.
_MAX_BRIGHTNESS_DELTA = 0.2

# Where Debian's `dataset-fashion-mnist` package installs the IDX files.
FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
_IDX_FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}
_NUM_CLASSES = {'cifar10': 10, 'cifar100': 100, 'fashion_mnist': 10}
# Padding of the basic augmentation (pad by 4 and crop back, as in the paper).
_CROP_PADDING = 4


DataNotFoundError = streaming.DataNotFoundError


@dataclasses.dataclass(frozen=True)
class Split:
  """One split held in memory: uint8 images [N, H, W, C] and int labels.

  `flipped` marks the labels that config.dataset.label_noise changed (None
  without label noise).
  """
  images: np.ndarray
  labels: np.ndarray
  flipped: np.ndarray | None = None

  def __len__(self) -> int:
    return len(self.labels)


@dataclasses.dataclass(frozen=True)
class Data:
  """A data set in memory, with what the model and the pipelines need."""
  train: Split
  test: Split
  num_classes: int
  # Held out from the training split (config.dataset.validation_size), for
  # model selection that never looks at the test set; None if not asked for.
  validation: Split | None
  # Per-channel statistics of the training images, in [0, 1] units.
  mean: np.ndarray
  std: np.ndarray

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.train.images.shape[1:])


def load(config: ml_collections.ConfigDict) -> Data | streaming.Data:
  """Loads `config.dataset` into memory (or opens its stream), or says where
  to get it.

  Args:
    config: the run's config; reads `config.dataset` and `config.seed`.

  Returns:
    The data set.

  Raises:
    DataNotFoundError: if the data is not where the config points and may not
      be downloaded; the message names the places looked and the fix.
  """
  dc = config.dataset
  if streaming.is_streamed(dc.name):
    return streaming.load(config)
  if dc.name == 'synthetic':
    train, test, num_classes = _synthetic(dc)
  elif dc.name == 'fashion_mnist':
    train, test = _fashion_mnist(dc)
    num_classes = _NUM_CLASSES[dc.name]
  else:
    train, test = _tfds(dc)
    num_classes = _NUM_CLASSES[dc.name]
  for split_name, split in (('train', train), ('test', test)):
    if len(split) and not 0 <= split.labels.min() <= split.labels.max() < (
        num_classes):
      raise ValueError(
          f'config.dataset.name={dc.name!r}: {split_name} labels range over '
          f'[{split.labels.min()}, {split.labels.max()}], not [0, '
          f'{num_classes}); check the files in config.dataset.data_dir='
          f'{dc.data_dir!r}.')
  if train.images.shape[1:] != test.images.shape[1:]:
    raise ValueError(
        f'config.dataset.name={dc.name!r}: the train images are '
        f'{train.images.shape[1:]} and the test images '
        f'{test.images.shape[1:]}; both splits must hold images of one '
        f'shape: check the files in config.dataset.data_dir={dc.data_dir!r}.')
  # Each random choice below has its own stream, fixed by config.seed.
  if dc.train_subset > 0:
    # A fixed random subset, e.g. for quick studies.
    rng = np.random.default_rng([config.seed, 0])
    train = _take(train, np.sort(rng.permutation(len(train))[
        :dc.train_subset]))
  if dc.label_noise > 0:
    train = _symmetric_label_noise(train, dc.label_noise, num_classes,
                                   np.random.default_rng([config.seed, 1]))
  validation = None
  if dc.validation_size >= len(train):
    raise ValueError(
        f'config.dataset.validation_size={dc.validation_size} is invalid: '
        f'the training set has {len(train)} examples; hold out fewer.')
  if dc.validation_size > 0:
    order = np.random.default_rng([config.seed, 2]).permutation(len(train))
    validation = _take(train, np.sort(order[:dc.validation_size]))
    train = _take(train, np.sort(order[dc.validation_size:]))
  pixels = train.images.reshape(-1, train.images.shape[-1]) / 255.0
  logging.info('Loaded %s: %d train, %d validation, %d test examples of '
               'shape %s.', dc.name, len(train),
               len(validation) if validation else 0, len(test),
               train.images.shape[1:])
  return Data(train=train, test=test, num_classes=num_classes,
              validation=validation, mean=pixels.mean(0).astype(np.float32),
              std=pixels.std(0).astype(np.float32))


def _take(split: Split, indices: np.ndarray) -> Split:
  return Split(split.images[indices], split.labels[indices],
               None if split.flipped is None else split.flipped[indices])


def _symmetric_label_noise(split: Split, fraction: float, num_classes: int,
                           rng: np.random.Generator) -> Split:
  """Gives a random `fraction` of the examples a wrong, uniform label.

  Exactly round(fraction * N) labels change, each to one of the other
  classes with equal probability (the symmetric noise of the SAM paper's
  Table 4).
  """
  noisy = rng.choice(len(split), round(fraction * len(split)), replace=False)
  labels = split.labels.copy()
  shift = rng.integers(1, num_classes, len(noisy))
  labels[noisy] = (labels[noisy] + shift) % num_classes
  flipped = np.zeros(len(split), bool)
  flipped[noisy] = True
  return Split(split.images, labels, flipped)


def _synthetic(dc) -> tuple[Split, Split, int]:
  """Class prototypes plus noise: learnable, deterministic, offline."""
  rng = np.random.default_rng(dc.synthetic_seed)
  shape = tuple(dc.synthetic_image_shape)
  height, width, channels = shape
  # Prototypes are blocks of 8x8 pixels, so that a 4-pixel crop or a flip
  # keeps most of a class's pattern and augmented data stays learnable.
  coarse = rng.uniform(0, 255, (dc.synthetic_num_classes, height // 8 + 1,
                                width // 8 + 1, channels))
  prototypes = coarse.repeat(8, axis=1).repeat(8, axis=2)[:, :height, :width]

  def make(n):
    labels = rng.integers(0, dc.synthetic_num_classes, n)
    noise = rng.uniform(0, 255, (n,) + shape)
    images = (1 - dc.synthetic_noise) * prototypes[labels]
    images += dc.synthetic_noise * noise
    return Split(images.astype(np.uint8), labels.astype(np.int32))

  return (make(dc.synthetic_train_size), make(dc.synthetic_test_size),
          dc.synthetic_num_classes)


def _read_idx(path: str) -> np.ndarray:
  """Reads one gzipped IDX file (the MNIST format) into a uint8 array.

  Raises:
    ValueError: naming the file, if it is no complete gzipped uint8 IDX file.
  """
  def broken(why):
    return ValueError(f'{path} {why}: replace it with a complete copy (or '
                      'point config.dataset.data_dir elsewhere).')

  with tf.io.gfile.GFile(path, 'rb') as f:
    try:
      raw = gzip.decompress(f.read())
    except (EOFError, OSError, zlib.error) as e:  # Truncated, or no gzip.
      raise broken(f'is no complete gzip file ({e})') from None
  if len(raw) < 4 or raw[:2] != b'\x00\x00' or raw[2] != 0x08:
    raise broken('is not a uint8 IDX file')
  ndim = raw[3]
  if len(raw) < 4 + 4 * ndim:
    raise broken('ends inside its header')
  dims = np.frombuffer(raw, '>u4', count=ndim, offset=4)
  size = len(raw) - 4 - 4 * ndim
  if size != np.prod(dims, dtype=np.int64):
    raise broken(f'holds {size} bytes of data, not the '
                 f'{" x ".join(map(str, dims))} its header says')
  return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _fashion_mnist(dc) -> tuple[Split, Split]:
  """Fashion-MNIST from IDX files in a directory, else from tfds."""
  data_dir = dc.data_dir or FASHION_MNIST_DIR
  paths = {s: [os.path.join(data_dir, f) for f in files]
           for s, files in _IDX_FILES.items()}
  if all(tf.io.gfile.exists(p) for ps in paths.values() for p in ps):
    splits = []
    for split in ('train', 'test'):
      images, labels = (_read_idx(p) for p in paths[split])
      if len(images) != len(labels) or images.ndim != 3 or labels.ndim != 1:
        raise ValueError(
            f'{paths[split][0]} holds {images.shape} images and '
            f'{paths[split][1]} {labels.shape} labels: they must be N x H x W '
            'and N. Replace them with a matching pair (or point '
            'config.dataset.data_dir elsewhere).')
      splits.append(Split(images[..., None], labels.astype(np.int32)))
    return splits[0], splits[1]
  try:
    return _tfds(dc)
  except DataNotFoundError as e:
    raise DataNotFoundError(
        'Fashion-MNIST not found: no IDX files '
        f'({", ".join(_IDX_FILES["train"] + _IDX_FILES["test"])}) '
        f'in {data_dir} (config.dataset.data_dir), and {e} On Debian or '
        'Ubuntu, `apt-get install dataset-fashion-mnist` puts the IDX files '
        f'in {FASHION_MNIST_DIR}.') from None


def _tfds(dc) -> tuple[Split, Split]:
  """A prepared tfds data set, downloaded first if config allows it."""
  tfds = versions.import_tfds()
  builder = tfds.builder(dc.name, data_dir=dc.data_dir or None)
  if not tf.io.gfile.exists(os.path.join(builder.data_dir,
                                         'dataset_info.json')):
    if not dc.download:
      raise DataNotFoundError(
          f'tfds has no prepared {dc.name} in {builder.data_dir} '
          '(config.dataset.data_dir). Prepare it where there is network '
          f'(`tfds build {dc.name} --data_dir=DIR`, DIR may be gs://) and '
          'point config.dataset.data_dir at DIR, or set '
          '--config.dataset.download=True.')
    download.prepare(builder, dc.name)
  splits = []
  for split in ('train', 'test'):
    ds = builder.as_dataset(split=split, shuffle_files=False)
    ds = ds.map(lambda e: (e['image'], e['label'])).batch(10_000)
    images, labels = zip(*tfds.as_numpy(ds))
    splits.append(Split(np.concatenate(images),
                        np.concatenate(labels).astype(np.int32)))
  return splits[0], splits[1]


def _normalize(images: tf.Tensor, data: Data) -> tf.Tensor:
  return (tf.cast(images, tf.float32) / 255.0 - data.mean) / data.std


def _augment(image: tf.Tensor, seed: tf.Tensor, kind: str,
             data: Data, cutout_size: int,
             randaugment: tuple[int, int] = (0, 0)) -> tf.Tensor:
  """Seeded (stateless) augmentation of one uint8 image, then normalization.

  `randaugment`: (N, M) of RandAugment after the crop and flip of 'basic'
  and 'basic_cutout' (N = 0: off).
  """
  if kind == 'none':
    return _normalize(image, data)
  crop_seed, flip_seed, other_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 3))
  padded = tf.pad(image, [[_CROP_PADDING] * 2, [_CROP_PADDING] * 2, [0, 0]])
  image = tf.image.stateless_random_crop(padded, image.shape, crop_seed)
  if kind == 'crop_brightness':
    image = tf.cast(image, tf.float32) / 255.0
    image = tf.image.stateless_random_brightness(
        image, _MAX_BRIGHTNESS_DELTA, other_seed)
    return _normalize(tf.clip_by_value(image, 0.0, 1.0) * 255.0, data)
  image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  if kind == 'autoaugment':
    # A split of other_seed, so that basic_cutout's squares stay as they were.
    policy_seed, other_seed = tf.unstack(
        tf.random.experimental.stateless_split(other_seed, 2))
    image = autoaugment.autoaugment(image, policy_seed)
  if randaugment[0]:
    image = autoaugment.randaugment(
        image, tf.random.experimental.stateless_fold_in(seed, 1),
        *randaugment)
  image = _normalize(image, data)
  if kind in ('basic_cutout', 'autoaugment'):
    image = _cutout(image, cutout_size, other_seed)
  return image


def _cutout(image: tf.Tensor, size: int, seed: tf.Tensor) -> tf.Tensor:
  """Zeroes (the mean, after normalization) a size x size square.

  The centre is uniform over the image, so the square may be cut by the
  border, as in DeVries & Taylor (2017).
  """
  height, width, _ = image.shape
  # A uniform point of the unit square, scaled: maxval must be a scalar.
  center = tf.cast(tf.random.stateless_uniform([2], seed) *
                   tf.constant([height, width], tf.float32), tf.int32)
  top, left = center[0] - size // 2, center[1] - size // 2
  rows = tf.range(height)[:, None]
  cols = tf.range(width)[None, :]
  inside = ((rows >= top) & (rows < top + size) &
            (cols >= left) & (cols < left + size))
  return tf.where(inside[:, :, None], 0.0, image)


def steps_per_epoch(data: Data, global_batch_size: int) -> int:
  """Whole batches in the training split (the rest is dropped).

  Raises:
    ValueError: if not even one batch fits, naming config.batch_size.
  """
  if len(data.train) < global_batch_size:
    raise ValueError(
        f'config.batch_size={global_batch_size} is invalid: the training set '
        f'has {len(data.train)} examples' + (
            f' ({len(data.validation)} are held out for validation)'
            if data.validation else '') + '; use a smaller batch_size.')
  return len(data.train) // global_batch_size


def train_dataset(data: Data, config: ml_collections.ConfigDict,
                  input_context: tf.distribute.InputContext,
                  start_step: int = 0) -> tf.data.Dataset:
  """The endless training stream of one input pipeline, from `start_step`.

  Args:
    data: the data set.
    config: the run's config (`seed`, `batch_size`, `dataset.augment`).
    input_context: from `distribute_datasets_from_function`.
    start_step: the global step the first batch belongs to.

  Returns:
    Per-replica batches (images float32 normalized, labels int32), and a
    third element under label noise: whether each label was flipped.
  """
  if isinstance(data, streaming.Data):
    return streaming.train_dataset(data, config, input_context, start_step)
  num_pipelines = input_context.num_input_pipelines
  pipeline = input_context.input_pipeline_id
  per_replica = input_context.get_per_replica_batch_size(config.batch_size)
  per_pipeline = config.batch_size // num_pipelines
  epoch_steps = steps_per_epoch(data, config.batch_size)
  n = len(data.train)
  images = tf.constant(data.train.images)
  labels = tf.constant(data.train.labels)
  flipped = data.train.flipped
  flipped = None if flipped is None else tf.constant(flipped)
  seed = tf.constant(config.seed, tf.int64)

  def epoch_indices(epoch):
    perm = tf.random.experimental.stateless_shuffle(
        tf.range(n, dtype=tf.int64), seed=tf.stack([seed, epoch]))
    mine = perm[:epoch_steps * config.batch_size][pipeline::num_pipelines]
    return tf.data.Dataset.from_tensor_slices(
        (tf.fill(tf.shape(mine), epoch), mine))

  def example(epoch, index):
    aug_seed = tf.stack([seed, epoch * n + index])
    image = _augment(tf.gather(images, index), aug_seed,
                     config.dataset.augment, data, config.dataset.cutout_size,
                     (config.dataset.randaugment_layers,
                      config.dataset.randaugment_magnitude))
    if flipped is None:
      return image, tf.gather(labels, index)
    return image, tf.gather(labels, index), tf.gather(flipped, index)

  start_epoch, offset = divmod(start_step, epoch_steps)
  ds = tf.data.Dataset.range(start_epoch, 2**62).flat_map(epoch_indices)
  ds = ds.skip(offset * per_pipeline)
  ds = ds.map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(per_replica, drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE)


def num_eval_steps(data: Data, global_batch_size: int, split='test') -> int:
  return -(-len(getattr(data, split)) // global_batch_size)


def eval_batch_size(config: ml_collections.ConfigDict, replicas: int) -> int:
  """config.eval_batch_size rounded up to the replicas: any slice works."""
  return -(-config.eval_batch_size // replicas) * replicas


def eval_dataset(data: Data, config: ml_collections.ConfigDict,
                 input_context: tf.distribute.InputContext,
                 split: str = 'test') -> tf.data.Dataset:
  """A split ('test' or 'validation'), each example once, in full batches.

  Returns:
    Per-replica batches of (images, labels, mask); mask is 0 on padding, so
    that every pipeline runs the same number of fixed-shape steps.
  """
  batch_size = eval_batch_size(config, input_context.num_replicas_in_sync)
  if isinstance(data, streaming.Data):
    return streaming.eval_dataset(data, batch_size, input_context,
                                  num_eval_steps(data, batch_size, split))
  num_pipelines = input_context.num_input_pipelines
  pipeline = input_context.input_pipeline_id
  images = getattr(data, split).images[pipeline::num_pipelines]
  labels = getattr(data, split).labels[pipeline::num_pipelines]
  pad = num_eval_steps(data, batch_size, split) * batch_size // (
      num_pipelines) - len(labels)
  mask = np.concatenate([np.ones(len(labels)), np.zeros(pad)], dtype='f4')
  images = np.concatenate(
      [images, np.zeros((pad,) + images.shape[1:], images.dtype)])
  labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
  ds = tf.data.Dataset.from_tensor_slices((images, labels, mask))
  ds = ds.map(lambda x, y, m: (_normalize(x, data), y, m),
              num_parallel_calls=tf.data.AUTOTUNE)
  return ds.batch(input_context.get_per_replica_batch_size(batch_size),
                  drop_remainder=True).prefetch(tf.data.AUTOTUNE)
