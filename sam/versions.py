"""Checks at start-up that TensorFlow, Keras and tfds are versions we support.

The supported range is what Cloud TPU VMs run (README, "Platforms"): from the
TensorFlow 2.16.1 of the newest `tpu-vm-tf-*` image to TensorFlow 2.21, with
Keras 3.10 or newer. Outside it a run fails in ways that do not name the
cause (a missing keyword deep inside Keras, a protobuf import inside tfds),
so it is refused up front with one line that says what to install.
"""

import importlib.metadata
import re

MIN_TENSORFLOW = (2, 16)
MAX_TENSORFLOW = (2, 21)  # The newest minor release tested.
MIN_KERAS = (3, 10, 0)

_INSTALL = ('install a supported one: `pip install -r requirements-cpu.txt '
            '-c constraints/cpu.txt` (CPU; GPU: requirements-gpu.txt), or on a '
            'TPU VM see README, "Platforms"')


class UnsupportedVersionError(RuntimeError):
  """An installed package is outside the supported range."""


def _version(text: str) -> tuple[int, ...]:
  """(2, 16, 1) from '2.16.1', '2.20.0rc1' or '2.21.0-dev'."""
  return tuple(int(n) for n in re.findall(r'\d+', text)[:3])


def _dotted(version: tuple[int, ...]) -> str:
  return '.'.join(map(str, version))


def check(tensorflow_version: str, keras_version: str) -> None:
  """Raises UnsupportedVersionError unless both versions are supported."""
  tf_version = _version(tensorflow_version)[:2]
  if not MIN_TENSORFLOW <= tf_version <= MAX_TENSORFLOW:
    raise UnsupportedVersionError(
        f'TensorFlow {tensorflow_version} is not supported (supported: '
        f'{_dotted(MIN_TENSORFLOW)} to {_dotted(MAX_TENSORFLOW)}); {_INSTALL}.')
  if _version(keras_version) < MIN_KERAS or _version(keras_version)[0] != 3:
    raise UnsupportedVersionError(
        f'Keras {keras_version} is not supported (Keras 3, '
        f'{_dotted(MIN_KERAS)} or newer); `pip install "keras>='
        f'{_dotted(MIN_KERAS)}"`, or reinstall with the constraints file of '
        'your platform (README, "Platforms").')


def check_installed() -> None:
  """Checks the installed TensorFlow and Keras (see `check`)."""
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  check(tf.__version__, keras.__version__)


def import_tfds():
  """Imports tensorflow_datasets, or says in one line why it cannot.

  A tensorflow-metadata built for protobuf 5 beside TensorFlow 2.16's
  protobuf 4 lets `import tensorflow_datasets` succeed but leaves it without
  `builder` ('module has no attribute'); importing its core names the cause.

  Returns:
    The tensorflow_datasets module.

  Raises:
    UnsupportedVersionError: where tfds cannot be imported.
  """
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    import tensorflow_datasets.core  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    versions = ', '.join(
        f'{name} {_installed(name)}'
        for name in ('tensorflow-datasets', 'tensorflow-metadata', 'protobuf'))
    raise UnsupportedVersionError(
        f'tensorflow_datasets cannot be imported ({e}; {versions}). Reinstall '
        'with the constraints file of your platform, e.g. `pip install -r '
        'requirements.txt -c constraints/tf2.16.txt` on TensorFlow 2.16 '
        '(README, "Platforms").') from None
  return tfds


def _installed(name: str) -> str:
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return 'not installed'
