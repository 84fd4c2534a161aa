"""A folder of images in class subfolders, as a TFDS data set to stream.

  python -m sam.image_folder --folder=/data/flowers --name=flowers \
    --data_dir=/data/tfds

reads FOLDER/SPLIT/CLASS/IMAGE (the layout of `tfds.ImageFolder`: SPLIT is
train, and test or validation; the sorted CLASS names become the labels 0,
1, ...; IMAGE any JPEG, PNG, GIF or BMP file) and writes it as the prepared
TFDS data set NAME in DATA_DIR (local or gs://), each image file's bytes as
they are. Train on it with

  python main.py ... --config.dataset.name=tfds:flowers \
    --config.dataset.data_dir=/data/tfds

`tfds.ImageFolder` reads such a folder directly, but only whole splits: each
host of a pod must read its own part of a split (`tfds.even_splits`), which
needs the prepared files. TFDS orders the examples by a hash of their keys
when it writes them, so the shuffle blocks of sam/streaming.py draw across
classes.
"""

import os
import re

from absl import app
from absl import flags
import tensorflow as tf

from sam import versions

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.gif', '.bmp')
SPLITS = ('train', 'validation', 'test')


def _listing(folder: str) -> tuple[dict[str, list[tuple[str, str]]],
                                   list[str]]:
  """split -> [(class, path)], and the sorted class names."""
  gfile = tf.io.gfile
  splits = {}
  for split in SPLITS:
    root = os.path.join(folder, split)
    if gfile.isdir(root):
      splits[split] = [
          (label, os.path.join(root, label, name))
          for label in sorted(gfile.listdir(root))
          if gfile.isdir(os.path.join(root, label))
          for name in sorted(gfile.listdir(os.path.join(root, label)))
          if name.lower().endswith(IMAGE_SUFFIXES)]
  if not splits.get('train'):
    raise ValueError(f'--folder={folder!r} has no images in train/CLASS/ '
                     f'(the layout is FOLDER/SPLIT/CLASS/IMAGE, SPLIT one of '
                     f'{SPLITS}, IMAGE ending in {IMAGE_SUFFIXES}).')
  if 'test' not in splits and 'validation' not in splits:
    raise ValueError(f'--folder={folder!r} has train/ but neither test/ nor '
                     'validation/: the run evaluates on one of them.')
  classes = sorted({label for examples in splits.values()
                    for label, _ in examples})
  return splits, classes


def prepare(folder: str, name: str, data_dir: str) -> dict[str, int]:
  """Writes the images of `folder` as the TFDS data set `name` in `data_dir`.

  Returns:
    The number of examples per split.

  Raises:
    ValueError: if `name` is no valid TFDS name or `folder` does not have
      the layout (train/CLASS/IMAGE and test/ or validation/).
  """
  if not re.fullmatch(r'[a-z][a-z0-9_]*', name):
    raise ValueError(f'--name={name!r} is no TFDS data set name: use '
                     'lower-case letters, digits and underscores.')
  splits, classes = _listing(folder)
  tfds = versions.import_tfds()

  class FolderImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, features=tfds.features.FeaturesDict({
              'image': tfds.features.Image(shape=(None, None, 3)),
              'label': tfds.features.ClassLabel(names=classes)}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples(examples)
              for split, examples in splits.items()}

    def _generate_examples(self, examples):
      for label, path in examples:
        # A path: TFDS stores the file's bytes without decoding them.
        yield f'{label}/{os.path.basename(path)}', {'image': path,
                                                     'label': label}

  FolderImages.name = name
  FolderImages(data_dir=data_dir).download_and_prepare()
  return {split: len(examples) for split, examples in splits.items()}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  try:
    counts = prepare(f.folder, f.name, f.data_dir)
  except ValueError as e:
    raise SystemExit(f'sam.image_folder: {e}') from None
  print(f'Wrote tfds:{f.name} to {f.data_dir}: ' + ', '.join(
      f'{split} {count} images' for split, count in counts.items()))


if __name__ == '__main__':
  flags.DEFINE_string('folder', None, 'FOLDER/SPLIT/CLASS/IMAGE files.')
  flags.DEFINE_string('name', None, 'The TFDS data set name to write.')
  flags.DEFINE_string('data_dir', None, 'Where to write it (may be gs://).')
  flags.mark_flags_as_required(['folder', 'name', 'data_dir'])
  app.run(main)
