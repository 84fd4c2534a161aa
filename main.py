r"""Trains an image classifier with (or without) SAM.

  python main.py --config=configs/cifar10_sam.py --workdir=gs://BUCKET/run

Any config field can be overridden, e.g. `--config.sam.rho=0` (the baseline).
"""

import os

# TensorFlow reads its C++ log level once, at import: its INFO and WARNING
# lines stay off unless TF_CPP_MIN_LOG_LEVEL says otherwise. (TensorFlow
# 2.21 prints its import notices, oneDNN and CUDA, before it reads it.)
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import logging as std_logging
import re
import time

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags
import tensorflow as tf

from sam import distribute
from sam import input_pipeline
from sam import train
from sam import versions
from sam import workdir as workdir_lib

_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Where checkpoints, summaries and results go (local or '
    'gs://); a workdir with checkpoints is resumed.')
config_flags.DEFINE_config_file(
    'config', None, 'Path to an ml_collections config file.', lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])
_TF_INFO = flags.DEFINE_bool(
    'tf_info', False, "Also log TensorFlow's own INFO lines (e.g. each "
    "checkpoint's 'Sharding callback duration'); its C++ lines come back with "
    'TF_CPP_MIN_LOG_LEVEL=0.')


_USER_ERRORS = (ValueError, PermissionError, FloatingPointError,
                input_pipeline.DataNotFoundError,
                versions.UnsupportedVersionError)


class _NoLibraryInfo(std_logging.Filter):
  """Keeps TensorFlow's and Keras' own INFO lines off the console.

  They log through absl, as we do (e.g. 'Sharding callback duration' at every
  checkpoint); the workdir's log.txt keeps them.
  """

  _LIBRARY = re.compile(r'[/\\](tensorflow|keras|tf_keras)[/\\]')

  def filter(self, record: std_logging.LogRecord) -> bool:
    return (record.levelno >= std_logging.WARNING or
            not self._LIBRARY.search(record.pathname))


class _GFileHandler(std_logging.Handler):
  """Mirrors the log into the workdir, which may be on GCS.

  GCS objects cannot be appended to: a flush uploads the whole file again, so
  remote logs are flushed at most every `flush_secs` (and at exit), and the
  log of an earlier (resumed) run is copied over rather than appended to.
  """

  def __init__(self, path: str, flush_secs: float):
    super().__init__()
    previous = ''
    if tf.io.gfile.exists(path):
      with tf.io.gfile.GFile(path) as f:
        previous = f.read()
    self._file = tf.io.gfile.GFile(path, 'w')
    self._file.write(previous)
    self._flush_secs = flush_secs
    self._last_flush = 0.0

  def emit(self, record):
    self._file.write(self.format(record) + '\n')
    if time.monotonic() - self._last_flush >= self._flush_secs:
      self._file.flush()
      self._last_flush = time.monotonic()

  def close(self):
    self._file.close()
    super().close()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = flags.FLAGS.config
  workdir = _WORKDIR.value
  if not _TF_INFO.value:
    logging.get_absl_handler().addFilter(_NoLibraryInfo())
  try:
    versions.check_installed()
    # The strategy first: TPU and multi-worker set-up must precede other ops.
    strategy = distribute.create_strategy(config.strategy, config.tpu)
    handler = _mirror_log(workdir, distribute.is_chief(strategy))
  except _USER_ERRORS as e:
    raise SystemExit(f'Error: {e}') from None
  try:
    logging.info('TensorFlow %s; devices: %s', tf.__version__,
                 tf.config.list_logical_devices())
    logging.info('Config:\n%s', config)
    train.train_and_evaluate(config, workdir, strategy)
  except _USER_ERRORS as e:
    # A bad config, missing data or a diverged run: the message says what to
    # fix, and a traceback from deep inside TensorFlow would only hide it.
    logging.error('%s: %s', type(e).__name__, e)
    raise SystemExit(f'Error: {e}') from None
  finally:
    logging.get_absl_logger().removeHandler(handler)
    handler.close()


def _mirror_log(workdir: str, chief: bool) -> _GFileHandler:
  """Adds a handler that copies the absl log into the workdir."""
  try:
    workdir_lib.makedirs(workdir)
    name = 'log.txt' if chief else f'log-{os.getpid()}.txt'
    handler = _GFileHandler(os.path.join(workdir, name),
                            flush_secs=60.0 if '://' in workdir else 0.0)
  except (tf.errors.OpError, OSError) as e:
    raise PermissionError(
        f'Cannot write to --workdir={workdir} ({e}). Choose a writable '
        'directory or bucket.') from None
  handler.setFormatter(logging.PythonFormatter())
  logging.get_absl_logger().addHandler(handler)
  return handler


def run():
  """The `sam-train` console script of `pip install .`."""
  app.run(main)


if __name__ == '__main__':
  run()
