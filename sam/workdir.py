"""The workdir: creation (local or gs://), config.json, checkpoints, SIGTERM."""

import json
import os
import signal
import tempfile
import threading

from absl import logging
import ml_collections
import tensorflow as tf

from sam import config_checks


def makedirs(path: str) -> None:
  """tf.io.gfile.makedirs that fails on a missing GCS bucket.

  Raises:
    tf.errors.NotFoundError: if `path` is in a gs:// bucket that does not
      exist. TensorFlow's own makedirs (2.21) does not fail there: it asks
      for the missing bucket again and again, forever (seen against a GCS
      emulator, which answers 404 as GCS does), so a mistyped bucket name
      would hang the run.
  """
  if path.startswith('gs://'):
    bucket = 'gs://' + path[len('gs://'):].split('/', 1)[0]
    if not tf.io.gfile.isdir(bucket):
      raise tf.errors.NotFoundError(None, None,
                                    f'the bucket {bucket} does not exist')
  tf.io.gfile.makedirs(path)


def prepare(config: ml_collections.ConfigDict, workdir: str,
                     chief: bool) -> None:
  """Checks the workdir is writable and resumable; writes config.json.

  Raises:
    PermissionError: if the workdir cannot be written.
    ValueError: if it holds checkpoints of a structurally different config.
  """
  path = os.path.join(workdir, 'config.json')
  new = json.loads(config.to_json_best_effort())
  if tf.train.latest_checkpoint(os.path.join(workdir, 'checkpoints')):
    with tf.io.gfile.GFile(path) as f:
      changes = config_checks.config_changes(json.load(f), new)
    if changes and not config.allow_structural_changes:
      raise ValueError(
          f'{workdir} holds checkpoints of a run whose config differs in '
          f'{"; ".join(changes)}. Use another --workdir, or resume anyway '
          'with --config.allow_structural_changes=True.')
  try:
    makedirs(workdir)
    if chief:
      # Written aside and renamed into place: the other hosts of a
      # multi-host run may be reading the previous one right now.
      with tf.io.gfile.GFile(path + '.tmp', 'w') as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
      tf.io.gfile.rename(path + '.tmp', path, overwrite=True)
  except (tf.errors.OpError, OSError) as e:
    raise PermissionError(
        f'Cannot write to --workdir={workdir} ({e}). Choose a writable '
        'directory or bucket.') from None


def restore(checkpoint: tf.train.Checkpoint,
            manager: tf.train.CheckpointManager,
            older_layouts: tuple[tf.train.Checkpoint, ...] = ()) -> str | None:
  """Restores the newest readable checkpoint; skips corrupt ones.

  Args:
    checkpoint: what to restore into.
    manager: the workdir's checkpoint manager.
    older_layouts: checkpoints of the same variables as written by older
      versions of this code, tried when `checkpoint` does not match.

  Returns:
    The path restored, or None if there was no checkpoint.

  Raises:
    RuntimeError: if there are checkpoints, but none is readable.
  """
  for path in reversed(manager.checkpoints):
    for layout in (checkpoint, *older_layouts):
      try:
        layout.restore(path).assert_existing_objects_matched()
        return path
      # What a truncated or corrupt file raises depends on where it breaks.
      except (tf.errors.OpError, ValueError, AssertionError, IndexError,
              OSError) as e:
        error = e
    logging.error('Checkpoint %s is unreadable (%s: %s); trying the one '
                  'before it.', path, type(error).__name__, error)
  if manager.checkpoints:
    raise RuntimeError(f'No readable checkpoint in {manager.directory}.')
  return None


class SigtermFlag:
  """Turns SIGTERM (preemption, `gcloud ... stop`) into a flag the loop reads.

  The host loop finishes its current call, saves a checkpoint and returns;
  the same command resumes from there. Only the main thread can install
  signal handlers, so elsewhere (tests in threads) this is inert.
  """

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM: stopping after the current loop.')
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def take_part_in_save(checkpoint: tf.train.Checkpoint) -> None:
  """A non-chief worker's share of a save under MultiWorkerMirroredStrategy.

  Every worker must take part in a save: reading a sync-on-read variable for
  it is a collective, and a chief saving alone would wait for the others
  forever (TensorFlow's PreemptionCheckpointHandler saves from every worker
  for this reason). The others write to a local scratch directory, deleted
  at once, so that the shared workdir holds the chief's checkpoints only.
  """
  scratch = tempfile.mkdtemp(prefix='sam-worker-checkpoint-')
  try:
    checkpoint.save(os.path.join(scratch, 'ckpt'))
  finally:
    tf.io.gfile.rmtree(scratch)
