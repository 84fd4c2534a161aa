"""A user's image folder, prepared for streaming by sam.image_folder."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from sam import image_folder
from sam import input_pipeline
from sam import versions
from tests.conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(path, data):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(data)


def _folder(root):
  """A grey PNG, RGB JPEGs and a non-image file, in two classes."""
  files = {
      'train/cat/a.jpg': tf.io.encode_jpeg(np.full((9, 7, 3), 50, np.uint8)),
      'train/cat/b.PNG': tf.io.encode_png(np.full((6, 8, 1), 90, np.uint8)),
      'train/dog/c.jpeg': tf.io.encode_jpeg(np.full((8, 8, 3), 200,
                                                    np.uint8)),
      'validation/dog/d.jpg': tf.io.encode_jpeg(np.full((5, 5, 3), 120,
                                                        np.uint8)),
  }
  for name, data in files.items():
    _write(os.path.join(root, name), data.numpy())
  _write(os.path.join(root, 'train', 'dog', 'notes.txt'), b'not an image')
  return {name: data.numpy() for name, data in files.items()}


def test_a_folder_streams_with_its_bytes_and_sorted_labels(tmp_path):
  files = _folder(str(tmp_path / 'images'))
  data_dir = str(tmp_path / 'tfds')
  assert image_folder.prepare(str(tmp_path / 'images'), 'pets',
                              data_dir) == {'train': 3, 'validation': 1}
  tfds = versions.import_tfds()
  builder = tfds.builder('pets', data_dir=data_dir)
  assert builder.info.features['label'].names == ['cat', 'dog']
  records = builder.as_dataset(
      split='train', decoders={'image': tfds.decode.SkipDecoding()})
  got = sorted((int(e['label']), e['image'].numpy()) for e in records)
  assert got == sorted([(0, files['train/cat/a.jpg']),
                        (0, files['train/cat/b.PNG']),
                        (1, files['train/dog/c.jpeg'])])
  config = tiny_config(**{
      'dataset.name': 'tfds:pets', 'dataset.data_dir': data_dir,
      'dataset.image_size': 4, 'dataset.augment': 'none', 'batch_size': 3,
      'eval_batch_size': 1})
  data = input_pipeline.load(config)
  assert (len(data.train), len(data.test), data.num_classes) == (3, 1, 2)
  images, labels = next(iter(input_pipeline.train_dataset(
      data, config, tf.distribute.InputContext())))
  pixels = np.rint((images.numpy() * data.std + data.mean) * 255)
  # Each image flat in its grey (the PNG's one channel made RGB).
  by_label = sorted(zip(labels.numpy(), pixels.mean(axis=(1, 2, 3))))
  assert [label for label, _ in by_label] == [0, 0, 1]
  np.testing.assert_allclose([p for _, p in by_label],
                             sorted([50, 90]) + [200], atol=2)


@pytest.mark.parametrize('layout,name,message', [
    ({'test/a/x.jpg'}, 'pets', 'has no images in train/CLASS/'),
    ({'train/a/x.jpg'}, 'pets', 'neither test/ nor validation/'),
    ({'train/a/x.jpg', 'test/a/y.jpg'}, 'Pets', "--name='Pets' is no TFDS"),
])
def test_a_bad_folder_or_name_is_one_line(tmp_path, layout, name, message):
  for path in layout:
    _write(str(tmp_path / path), b'')
  with pytest.raises(ValueError, match=message):
    image_folder.prepare(str(tmp_path), name, str(tmp_path / 'tfds'))


@pytest.mark.slow  # Starts a process; prepare()'s refusals are fast tests.
def test_command_line_fails_in_one_line(tmp_path):
  out = subprocess.run(
      [sys.executable, '-m', 'sam.image_folder', f'--folder={tmp_path}',
       '--name=pets', f'--data_dir={tmp_path}/tfds'], cwd=ROOT,
      capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 1
  assert out.stderr.strip().splitlines()[-1].startswith(
      'sam.image_folder: --folder=')
