"""CIFAR-10 through tfds from prepared files, read by configs/cifar10_sam.py.

The files are prepared here by tfds's own CIFAR-10 builder from binary batches
this test writes in CIFAR's format (no network), so that every TensorFlow we
support (README, "Platforms") is checked to import tfds and read its files.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import cifar10_sam
from sam import input_pipeline
from sam import versions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PER_FILE = 4  # Examples in each of the 5 training files and the test file.


def _write_batch(path, first_index):
  """CIFAR's binary format: a label byte, then 3072 bytes of CHW pixels."""
  records = []
  for i in range(first_index, first_index + _PER_FILE):
    records.append(bytes([i % 10]) + bytes([i]) * 3072)  # Pixel value = index.
  with open(path, 'wb') as f:
    f.write(b''.join(records))


@pytest.fixture(name='cifar10_dir')
def prepared_cifar10(tmp_path, monkeypatch):
  """A tfds data_dir holding a prepared 20 + 4 image CIFAR-10."""
  tfds = versions.import_tfds()
  source = tmp_path / 'source' / 'cifar-10-batches-bin'
  source.mkdir(parents=True)
  for n in range(5):
    _write_batch(source / f'data_batch_{n + 1}.bin', n * _PER_FILE)
  _write_batch(source / 'test_batch.bin', 100)
  (source / 'batches.meta.txt').write_text(
      '\n'.join(f'class{c}' for c in range(10)) + '\n')
  monkeypatch.setattr(tfds.download.DownloadManager, 'download_and_extract',
                      lambda self, url: str(source.parent))
  data_dir = tmp_path / 'tensorflow_datasets'
  tfds.builder('cifar10', data_dir=str(data_dir)).download_and_prepare()
  return str(data_dir)


def test_cifar10_sam_config_reads_the_prepared_files(cifar10_dir):
  config = cifar10_sam.get_config()
  config.dataset.data_dir = cifar10_dir
  config.dataset.download = False
  data = input_pipeline.load(config)
  assert data.num_classes == 10 and data.image_shape == (32, 32, 3)
  # tfds shuffles examples when it writes them: compare as sets.
  for split, indices in ((data.train, range(20)), (data.test, range(100, 104))):
    assert split.images.dtype == np.uint8
    assert sorted(split.images[:, 0, 0, 0].tolist()) == list(indices)
    np.testing.assert_array_equal(split.labels, split.images[:, 0, 0, 0] % 10)
    # Every pixel of an image holds its index, in every channel.
    assert (split.images == split.images[:, :1, :1, :1]).all()


@pytest.mark.slow
def test_main_trains_on_the_prepared_files(cifar10_dir, tmp_path):
  workdir = tmp_path / 'workdir'
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', JAX_PLATFORMS='cpu')
  run = subprocess.run(
      [sys.executable, 'main.py', '--config=configs/cifar10_sam.py',
       f'--workdir={workdir}', f'--config.dataset.data_dir={cifar10_dir}',
       '--config.dataset.download=False', '--config.model.name=cnn',
       '--config.batch_size=4', '--config.eval_batch_size=4',
       '--config.num_train_steps=2', '--config.steps_per_loop=1'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  with open(workdir / 'results.json') as f:
    assert json.load(f)['step'] == 2
