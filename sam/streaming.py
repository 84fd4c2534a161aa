"""Streaming input: any TFDS data set, read from its files as training goes.

`config.dataset.name='tfds:NAME'` (e.g. 'tfds:imagenet2012', or a data set a
user prepared from a folder of class subfolders with `tfds build
--imports=... ` or `tfds.folder_dataset.ImageFolder`) streams the prepared
data set's records instead of loading it into memory: host memory is bounded
by the shuffle buffer (`config.dataset.shuffle_buffer` encoded images) and
tf.data's prefetching, not by the data set.

The promises of sam/input_pipeline.py hold here too:

* Each input pipeline (host) p of P reads only its own part of each split,
  `tfds.even_splits(split, P)[p]`: contiguous ranges of examples that together
  cover the split once, without overlap.
* The training stream is a pure function of (seed, step). The pipeline's
  part is cut into blocks of `shuffle_buffer` consecutive records (in file
  order); epoch e reads the blocks in an order drawn from (seed, e, p) and
  shuffles each block by a seed of (seed, e, p, block); each example's
  augmentation is seeded by its position in that stream. TFDS shuffles the
  examples across files when it prepares a data set, so a block is a random
  sample. A pipeline started at step s reads its epoch from the start
  and skips the records before s, undecoded; no iterator state is saved. The
  cost of a resume is reading (not decoding) up to one epoch of this host's
  part.
* Batches never straddle epochs: every pipeline takes the same
  `steps_per_epoch * global_batch / P` examples of its part per epoch.
* Evaluation reads each example of the split exactly once across pipelines,
  padded with masked examples to the same number of steps everywhere.

Preprocessing is the Inception style of the ImageNet papers (Szegedy et al.
2015; the SAM paper and Chen et al. 2022 train with it): for training a
random crop of 8%-100% of the area and aspect ratio 3/4-4/3 (JPEGs decode the
crop only), resized to image_size, and a horizontal flip; for evaluation the
central crop of image_size / (image_size + 32) of the shorter side, resized
to image_size. Pixels are normalized by ImageNet's channel statistics.
"""

import dataclasses
from typing import Any

import ml_collections
import numpy as np
import tensorflow as tf

from sam import autoaugment
from sam import versions

PREFIX = 'tfds:'
# Training augmentations of streamed data (the in-memory ones need the whole
# data set's shape): 'inception_crop' (random-resized crop and flip), or
# 'none' (the evaluation preprocessing).
AUGMENTATIONS = ('inception_crop', 'none')
# ImageNet's channel statistics in [0, 1] units (the torchvision values).
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
# Evaluation: the central image_size / (image_size + 32) of the shorter side
# (224 of 256 at 224, the ResNet and Inception evaluation).
_EVAL_CROP_PADDING = 32
_CROP_AREA = (0.08, 1.0)
_CROP_ASPECT_RATIO = (3 / 4, 4 / 3)


# Blocks per host and epoch (each a TFDS reader): ImageNet's 1.28M examples
# on one host in blocks of the default 10,000 make 129.
MAX_BLOCKS = 10_000


class DataNotFoundError(FileNotFoundError):
  """The data set is neither on disk nor allowed to be downloaded."""


@dataclasses.dataclass(frozen=True)
class Split:
  """A split of a prepared TFDS data set: its name and size, no examples."""
  name: str
  size: int

  def __len__(self) -> int:
    return self.size


@dataclasses.dataclass(frozen=True)
class Data:
  """A TFDS data set read from its files (the in-memory Data's interface)."""
  builder: Any  # tfds.core.DatasetBuilder
  train: Split
  test: Split
  num_classes: int
  image_shape: tuple[int, int, int]
  mean: np.ndarray
  std: np.ndarray
  validation: None = None


def is_streamed(name: str) -> bool:
  return name.startswith(PREFIX)


def load(config: ml_collections.ConfigDict) -> Data:
  """The prepared TFDS data set `config.dataset.name` names ('tfds:NAME').

  Raises:
    DataNotFoundError: if it is not prepared in config.dataset.data_dir and
      may not be downloaded.
    ValueError: if it has no 'image' and 'label' features or no train split.
  """
  tfds = versions.import_tfds()
  dc = config.dataset
  name = dc.name[len(PREFIX):]
  where = dc.data_dir or '~/tensorflow_datasets'
  try:
    builder = tfds.builder(name, data_dir=dc.data_dir or None)
  except tfds.core.registered.DatasetNotFoundError:
    raise DataNotFoundError(
        f'config.dataset.name={dc.name!r}: tfds knows no data set {name!r} '
        f'and finds none prepared in {where} (config.dataset.data_dir); '
        'check the name (`tfds.list_builders()`), or prepare it there.'
    ) from None
  if not builder.info.splits:
    if not dc.download:
      raise DataNotFoundError(
          f'config.dataset.name={dc.name!r}: tfds has no prepared {name} in '
          f'{where} (config.dataset.data_dir). Prepare it (`tfds build '
          f'{name} --data_dir=DIR`, DIR may be gs://; ImageNet needs its '
          'archives in DIR/downloads/manual) and point '
          'config.dataset.data_dir at DIR, or set '
          '--config.dataset.download=True.')
    builder.download_and_prepare()
  features, splits = builder.info.features, builder.info.splits
  missing = {'image', 'label'} - set(features.keys())
  if missing or 'train' not in splits:
    raise ValueError(
        f'config.dataset.name={dc.name!r}: streaming needs an image data set '
        "with 'image' and 'label' features and a 'train' split; this one has "
        f'features {sorted(features.keys())} and splits {sorted(splits)}.')
  test = 'test' if 'test' in splits else 'validation'
  channels = features['image'].shape[-1] or 3
  return Data(
      builder=builder,
      train=Split('train', splits['train'].num_examples),
      test=Split(test, splits[test].num_examples),
      num_classes=features['label'].num_classes,
      image_shape=(dc.image_size, dc.image_size, channels),
      mean=IMAGENET_MEAN[:channels], std=IMAGENET_STD[:channels])


def _part(split: str, input_context: tf.distribute.InputContext):
  """The TFDS sub-split that this input pipeline reads."""
  return versions.import_tfds().even_splits(
      split, input_context.num_input_pipelines)[
          input_context.input_pipeline_id]


def _records(data: Data, split) -> tf.data.Dataset:
  """A (sub-)split's (encoded image, label) records, in file order."""
  tfds = versions.import_tfds()
  ds = data.builder.as_dataset(
      split=split, shuffle_files=False,
      decoders={'image': tfds.decode.SkipDecoding()},
      read_config=tfds.ReadConfig(try_autocache=False))
  return ds.map(lambda e: (e['image'], tf.cast(e['label'], tf.int32)))


def _blocks(data: Data, split: str, input_context: tf.distribute.InputContext,
            size: int) -> list[tf.data.Dataset]:
  """This pipeline's part of a split as blocks of `size` consecutive records
  (the last one shorter), each a dataset of one element: the whole block."""
  tfds = versions.import_tfds()
  parts = tfds.even_splits(split, input_context.num_input_pipelines)
  pipeline = input_context.input_pipeline_id
  start = sum(data.builder.info.splits[p].num_examples
              for p in parts[:pipeline])
  end = start + data.builder.info.splits[parts[pipeline]].num_examples
  if (end - start) / size > MAX_BLOCKS:
    least = -(-(end - start) // MAX_BLOCKS)
    raise ValueError(
        f'config.dataset.shuffle_buffer={size} cuts the {end - start} '
        f'examples this host reads into over {MAX_BLOCKS} blocks, each read '
        f'by a reader of its own: use at least {least}.')
  return [_records(data, f'{split}[{a}:{min(a + size, end)}]').batch(size)
          for a in range(start, end, size)]


def part_size(data: Data, split: str,
              input_context: tf.distribute.InputContext) -> int:
  """Examples of a split that this input pipeline reads."""
  return data.builder.info.splits[_part(split, input_context)].num_examples


def _decode(encoded: tf.Tensor, window_fn, channels: int) -> tf.Tensor:
  """Decodes the crop window_fn(shape) of an image; JPEGs decode it only."""
  def jpeg():
    top, left, height, width = window_fn(tf.io.extract_jpeg_shape(encoded))
    return tf.io.decode_and_crop_jpeg(
        encoded, tf.stack([top, left, height, width]), channels=channels)

  def other():
    image = tf.io.decode_image(encoded, channels=channels,
                               expand_animations=False)
    top, left, height, width = window_fn(tf.shape(image))
    return image[top:top + height, left:left + width]

  return tf.cond(tf.io.is_jpeg(encoded), jpeg, other)


def _random_window(seed: tf.Tensor):
  """Inception's random crop window: 8-100% of the area, aspect 3/4-4/3."""
  def window(shape):
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=seed, min_object_covered=0.1,
        aspect_ratio_range=_CROP_ASPECT_RATIO, area_range=_CROP_AREA,
        max_attempts=10, use_image_if_no_bounding_boxes=True)
    return begin[0], begin[1], size[0], size[1]
  return window


def _central_window(image_size: int):
  def window(shape):
    side = tf.maximum(tf.cast(
        tf.cast(tf.minimum(shape[0], shape[1]), tf.float32) * image_size /
        (image_size + _EVAL_CROP_PADDING), tf.int32), 1)  # A tiny image.
    return (shape[0] - side + 1) // 2, (shape[1] - side + 1) // 2, side, side
  return window


def preprocess(encoded: tf.Tensor, seed: tf.Tensor | None, data: Data,
               augment: str,
               randaugment: tuple[int, int] = (0, 0)) -> tf.Tensor:
  """One encoded image to a normalized float32 [size, size, C] tensor.

  Args:
    encoded: the image file's bytes (JPEG, PNG, ...).
    seed: int64 [2], the example's augmentation seed; unused for 'none'.
    data: the data set (output shape and channel statistics).
    augment: 'inception_crop', or 'none' for the evaluation preprocessing.
    randaugment: (N, M) of RandAugment after the Inception crop and flip, on
      the resized image rounded to uint8 (N = 0: off).
  """
  size, _, channels = data.image_shape
  if augment == 'inception_crop':
    crop_seed, flip_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 2))
    image = _decode(encoded, _random_window(crop_seed), channels)
  else:
    image = _decode(encoded, _central_window(size), channels)
  image = tf.image.resize(image, [size, size], method='bilinear',
                          antialias=False)
  if augment == 'inception_crop':
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  image = tf.ensure_shape(image, data.image_shape)
  if augment == 'inception_crop' and randaugment[0]:
    image = tf.cast(autoaugment.randaugment(
        tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8),
        tf.random.experimental.stateless_fold_in(seed, 1), *randaugment),
        tf.float32)
  return (image / 255.0 - data.mean) / data.std


def train_dataset(data: Data, config: ml_collections.ConfigDict,
                  input_context: tf.distribute.InputContext,
                  start_step: int = 0) -> tf.data.Dataset:
  """The endless training stream of one input pipeline, from `start_step`."""
  num_pipelines = input_context.num_input_pipelines
  pipeline = input_context.input_pipeline_id
  per_replica = input_context.get_per_replica_batch_size(config.batch_size)
  epoch_steps = len(data.train) // config.batch_size
  per_epoch = epoch_steps * (config.batch_size // num_pipelines)
  blocks = _blocks(data, data.train.name, input_context,
                   config.dataset.shuffle_buffer)
  seed = tf.constant(config.seed, tf.int64)

  def shuffled(block, record):
    encoded, label = record
    order = tf.random.experimental.stateless_shuffle(
        tf.range(tf.shape(label)[0]), seed=tf.stack([seed, block]))
    return tf.gather(encoded, order), tf.gather(label, order)

  def epoch(e):
    # The blocks of shuffle_buffer records in an order of the epoch's, each
    # block in an order of its own: fixed by (seed, epoch, pipeline, block).
    # tf.data's shuffle cannot take a seed computed from the epoch when a
    # global seed is set.
    stream = e * num_pipelines + pipeline
    order = tf.random.experimental.stateless_shuffle(
        tf.range(len(blocks), dtype=tf.int64),
        seed=tf.stack([seed, -1 - stream]))
    ds = tf.data.Dataset.choose_from_datasets(
        blocks, tf.data.Dataset.from_tensor_slices(order))
    ds = ds.enumerate(stream * 2**20).map(shuffled).unbatch().take(per_epoch)
    return ds.enumerate().map(
        lambda i, record: ((e * num_pipelines + pipeline) * per_epoch + i,)
        + record)

  def example(position, encoded, label):
    aug_seed = tf.stack([seed, position])
    return (preprocess(encoded, aug_seed, data, config.dataset.augment,
                       (config.dataset.randaugment_layers,
                        config.dataset.randaugment_magnitude)),
            label)

  start_epoch, offset = divmod(start_step, epoch_steps)
  ds = tf.data.Dataset.range(start_epoch, 2**40).flat_map(epoch)
  ds = ds.skip(offset * (config.batch_size // num_pipelines))  # Undecoded.
  ds = ds.map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(per_replica, drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE)


def eval_dataset(data: Data, batch_size: int,
                 input_context: tf.distribute.InputContext,
                 num_steps: int) -> tf.data.Dataset:
  """The test split, each example once across pipelines, `num_steps` batches.

  Args:
    data: the streamed data set.
    batch_size: the global eval batch, a multiple of the replicas.
    input_context: this pipeline's place among the replicas and hosts.
    num_steps: batches per replica, padding included.

  Returns:
    Per-replica batches of (images, labels, mask); mask is 0 on padding.
  """
  per_replica = input_context.get_per_replica_batch_size(batch_size)
  padded_size = (num_steps * batch_size // input_context.num_input_pipelines)
  pad = padded_size - part_size(data, data.test.name, input_context)
  ds = _records(data, _part(data.test.name, input_context)).map(
      lambda encoded, label: (preprocess(encoded, None, data, 'none'), label,
                              tf.constant(1.0)),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  padding = tf.data.Dataset.from_tensors(
      (tf.zeros(data.image_shape), tf.constant(0), tf.constant(0.0))
  ).repeat(pad)
  ds = ds.concatenate(padding)
  return ds.batch(per_replica, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
