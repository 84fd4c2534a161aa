"""The streamed-input row: ImageNet-sized JPEGs through sam/streaming.py.

It writes JPEG files of ImageNet's typical size (500 x 375; smooth random
images, so that they compress about as photos do), prepares them as a TFDS
data set with sam.image_folder, as a user would their own images, and times
the training stream of `dataset.name='tfds:...'` over it: reading the
records, decoding the Inception crop, resizing it to 224 x 224,
flipping and normalizing, with tf.data's parallelism, as a run would.
"""

import os

import numpy as np
import tensorflow as tf

from sam import image_folder
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
  """Writes `num_images` JPEGs as the TFDS data set NAME, by the user's path:
  files in DATA_DIR/images/SPLIT/CLASS/, prepared by sam.image_folder."""
  folder = os.path.join(data_dir, 'images')
  for split, count, seed in (('train', num_images, 0), ('test', 8, 1)):
    rng = np.random.default_rng(seed)
    for i in range(count):
      tf.io.write_file(os.path.join(folder, split, f'class{i % 10}',
                                    f'{i}.jpg'),
                       tf.io.encode_jpeg(_image(rng)))
  image_folder.prepare(folder, NAME, data_dir)


def mean_jpeg_bytes(data_dir: str) -> float:
  """The training split's mean record size (JPEG and label)."""
  files = tf.io.gfile.glob(os.path.join(data_dir, NAME, '*', '*-train.*'))
  builder = versions.import_tfds().builder_from_directory(
      os.path.dirname(files[0]))
  return sum(tf.io.gfile.stat(f).length for f in files) / (
      builder.info.splits['train'].num_examples)
