"""The streamed-input row: ImageNet-sized JPEGs through sam/streaming.py.

It writes a small TFDS data set of JPEGs of ImageNet's typical size
(500 x 375; smooth random images, so that they compress about as photos
do) and times the training stream of `dataset.name='tfds:...'` over it:
reading the records, decoding the Inception crop, resizing it to 224 x 224,
flipping and normalizing, with tf.data's parallelism, as a run would.
"""

import os

import numpy as np
import tensorflow as tf

from sam import versions

NAME = 'sam_benchmark_jpegs'
IMAGE_SHAPE = (375, 500, 3)


def _image(rng: np.random.Generator) -> np.ndarray:
  """Coarse random colours, smoothly upsampled, with a little noise."""
  coarse = rng.uniform(0, 255, (12, 16, 3)).astype(np.float32)
  image = tf.image.resize(coarse, IMAGE_SHAPE[:2], method='bicubic').numpy()
  image += rng.normal(0, 8, IMAGE_SHAPE)
  return np.clip(image, 0, 255).astype(np.uint8)


def prepare(data_dir: str, num_images: int) -> None:
  """Writes `num_images` JPEGs as the prepared TFDS data set NAME."""
  tfds = versions.import_tfds()

  class SamBenchmarkJpegs(tfds.core.GeneratorBasedBuilder,
                          skip_registration=True):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, features=tfds.features.FeaturesDict({
              'image': tfds.features.Image(shape=(None, None, 3),
                                           encoding_format='jpeg'),
              'label': tfds.features.ClassLabel(num_classes=1000)}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {'train': self._generate_examples(num_images, 0),
              'test': self._generate_examples(8, 1)}

    def _generate_examples(self, n, seed):
      rng = np.random.default_rng(seed)
      for i in range(n):
        yield i, {'image': _image(rng), 'label': i % 1000}

  SamBenchmarkJpegs(data_dir=data_dir).download_and_prepare()


def mean_jpeg_bytes(data_dir: str) -> float:
  """The training split's mean record size (JPEG and label)."""
  files = tf.io.gfile.glob(os.path.join(data_dir, NAME, '*', '*-train.*'))
  builder = versions.import_tfds().builder_from_directory(
      os.path.dirname(files[0]))
  return sum(tf.io.gfile.stat(f).length for f in files) / (
      builder.info.splits['train'].num_examples)
