"""The run's log: a quiet console, and a copy in the workdir (local or gs://).

`mirror(workdir, chief)` copies the absl log into WORKDIR/log.txt (other
hosts: log-PID.txt) while a run lasts; `NoLibraryInfo` keeps TensorFlow's and
Keras' own INFO lines off the console. A failed write of the copy (a full
disk, a GCS error) is reported once on the console and never stops the run.
"""

from collections.abc import Callable, Iterator
import contextlib
import logging as std_logging
import os
import re
import sys
import time
import traceback
from typing import IO

from absl import logging
import tensorflow as tf


class NoLibraryInfo(std_logging.Filter):
  """Keeps TensorFlow's and Keras' own INFO lines off the console.

  They log through absl, as we do (e.g. 'Sharding callback duration' at every
  checkpoint); the workdir's log.txt keeps them.
  """

  _LIBRARY = re.compile(r'[/\\](tensorflow|keras|tf_keras)[/\\]')

  def filter(self, record: std_logging.LogRecord) -> bool:
    return (record.levelno >= std_logging.WARNING or
            not self._LIBRARY.search(record.pathname))


class WorkdirLog(std_logging.Handler):
  """Mirrors the log into a file of the workdir, which may be on GCS.

  GCS objects cannot be appended to: a flush uploads the whole file again, so
  remote logs are flushed at most every `flush_secs` (and at exit), and the
  log of an earlier (resumed) run is copied over rather than appended to.
  """

  def __init__(self, path: str, flush_secs: float,
               open_file: Callable[[str, str], IO[str]] = tf.io.gfile.GFile):
    super().__init__()
    self.path = path
    previous = ''
    if tf.io.gfile.exists(path):
      with tf.io.gfile.GFile(path) as f:
        previous = f.read()
    self._flush_secs = flush_secs
    self._last_flush = 0.0
    self._failing = False
    self._file = open_file(path, 'w')
    self._guarded(lambda: self._file.write(previous))

  def _guarded(self, write: Callable[[], None]) -> None:
    try:
      write()
      self._failing = False
    except Exception as e:  # pylint: disable=broad-except
      # Whatever the file system raised: logging must never stop a run.
      if not self._failing:  # Said once per spell of failures.
        sys.stderr.write(f'Could not write the log {self.path} ({e}); '
                         'training goes on.\n')
      self._failing = True

  def emit(self, record: std_logging.LogRecord) -> None:
    line = self.format(record) + '\n'

    def write():
      self._file.write(line)
      if time.monotonic() - self._last_flush >= self._flush_secs:
        self._last_flush = time.monotonic()
        self._file.flush()

    self._guarded(write)

  def write_traceback(self) -> None:
    """Writes the traceback of the exception being handled (file only)."""
    self.write_file_only(traceback.format_exc())

  def write_file_only(self, text: str) -> None:
    """Writes `text` into the file, not through the log (nor the console)."""

    def write():
      self._file.write(text)
      self._file.flush()

    self._guarded(write)

  def close(self) -> None:
    self._guarded(self._file.close)
    super().close()


@contextlib.contextmanager
def mirror(workdir: str, chief: bool) -> Iterator[WorkdirLog]:
  """Copies the absl log into the workdir while the context is open.

  Raises:
    PermissionError: if the log file cannot be created.
  """
  try:
    name = 'log.txt' if chief else f'log-{os.getpid()}.txt'
    handler = WorkdirLog(os.path.join(workdir, name),
                         flush_secs=60.0 if '://' in workdir else 0.0)
  except (tf.errors.OpError, OSError) as e:
    raise PermissionError(
        f'Cannot write to --workdir={workdir} ({e}). Choose a writable '
        'directory or bucket.') from None
  handler.setFormatter(logging.PythonFormatter())
  logging.get_absl_logger().addHandler(handler)
  try:
    yield handler
  finally:
    logging.get_absl_logger().removeHandler(handler)
    handler.close()
