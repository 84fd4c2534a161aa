r"""Trains an image classifier with (or without) SAM.

  python main.py --config=configs/cifar10_sam.py --workdir=gs://BUCKET/run

Any config field can be overridden, e.g. `--config.sam.rho=0` (the baseline).
"""

import logging as std_logging
import os
import time

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags
import tensorflow as tf

from sam import distribute
from sam import train

_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Where checkpoints, summaries and results go (local or '
    'gs://); a workdir with checkpoints is resumed.')
config_flags.DEFINE_config_file(
    'config', None, 'Path to an ml_collections config file.', lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


class _GFileHandler(std_logging.Handler):
  """Mirrors the log into the workdir, which may be on GCS.

  GCS objects cannot be appended to: a flush uploads the whole file again, so
  remote logs are flushed at most every `flush_secs` (and at exit).
  """

  def __init__(self, path: str, flush_secs: float):
    super().__init__()
    self._file = tf.io.gfile.GFile(path, 'w')
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
  # The strategy first: TPU and multi-worker set-up must precede other ops.
  strategy = distribute.create_strategy(config.strategy, config.tpu)

  tf.io.gfile.makedirs(workdir)
  remote = '://' in workdir
  handler = _GFileHandler(
      os.path.join(workdir, f'log-{os.getpid()}.txt' if not
                   distribute.is_chief(strategy) else 'log.txt'),
      flush_secs=60.0 if remote else 0.0)
  handler.setFormatter(logging.PythonFormatter())
  logging.get_absl_logger().addHandler(handler)
  try:
    logging.info('TensorFlow %s; devices: %s', tf.__version__,
                 tf.config.list_logical_devices())
    logging.info('Config:\n%s', config)
    train.train_and_evaluate(config, workdir, strategy)
  finally:
    logging.get_absl_logger().removeHandler(handler)
    handler.close()


if __name__ == '__main__':
  app.run(main)
