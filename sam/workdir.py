"""The workdir: creation (local or gs://), config.json, checkpoints, signals."""

import atexit
import functools
import json
import os
import shutil
import socket
import tempfile
import urllib.parse

from absl import logging
import ml_collections
import tensorflow as tf

from sam import config_checks


class CheckpointError(RuntimeError):
  """No checkpoint could be restored, or one could not be saved."""


# TensorFlow takes a checkpoint's path as a glob pattern in some calls and
# literally in others (tf.train.Checkpoint.restore does both), so no escaping
# serves: a local workdir with these characters in its path is read and
# written through a link without them (checkpoint_dir).
PATTERN_CHARACTERS = '[]*?{}'


def check_path(workdir: str, source: str) -> None:
  """Refuses a --workdir that would scatter a run where it does not belong.

  Args:
    workdir: the --workdir flag.
    source: the checkout's directory, which must not become a workdir.

  Raises:
    ValueError: for an empty workdir (an unset shell variable: the run would
      train into the current directory), the checkout itself, or a file.
  """
  if not workdir.strip():
    raise ValueError('--workdir is empty (an unset shell variable?): name a '
                     'directory or a gs:// path for the run.')
  if workdir.startswith('gs://'):
    if any(c in workdir for c in PATTERN_CHARACTERS):
      raise ValueError(
          f'--workdir={workdir} has one of {PATTERN_CHARACTERS}, which '
          "TensorFlow's checkpoint functions read as a pattern in a gs:// "
          'path: name the run without them (e.g. rho=0.05 for [rho=0.05]).')
    return
  if os.path.realpath(workdir) == os.path.realpath(source):
    raise ValueError(f'--workdir={workdir} is the checkout itself, which '
                     'would fill the source tree with checkpoints: name a '
                     'directory of its own (e.g. /tmp/sam/run).')
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f'--workdir={workdir} is a file: name a directory.')


@functools.cache  # One link per workdir and process.
def checkpoint_dir(workdir: str) -> str:
  """workdir/checkpoints, as a path TensorFlow reads literally.

  That path itself, unless the workdir's has one of PATTERN_CHARACTERS
  (`runs/sweep[rho=0.05]`, a sweep's natural name): then its checkpoints
  directory through a link to the workdir in a temporary directory, removed
  when the process ends (local paths only: check_path refuses such a gs://
  workdir).
  """
  directory = os.path.join(workdir, 'checkpoints')
  if not any(c in directory for c in PATTERN_CHARACTERS):
    return directory
  try:
    os.makedirs(workdir, exist_ok=True)  # What the link points to.
  except OSError:
    pass  # check_writable names the cause.
  link = os.path.join(tempfile.mkdtemp(prefix='sam-workdir-'), 'workdir')
  atexit.register(shutil.rmtree, os.path.dirname(link), True)
  os.symlink(os.path.abspath(workdir), link)
  logging.info('%s is read and written as %s/checkpoints: TensorFlow would '
               'read its path as a pattern.', directory, link)
  return os.path.join(link, 'checkpoints')


def makedirs(path: str) -> None:
  """tf.io.gfile.makedirs that fails fast on a missing bucket or no network.

  Raises:
    tf.errors.NotFoundError: if `path` is in a gs:// bucket that does not
      exist. TensorFlow's own makedirs (2.21) does not fail there: it asks
      for the missing bucket again and again, forever (seen against a GCS
      emulator, which answers 404 as GCS does), so a mistyped bucket name
      would hang the run.
    ConnectionError: if `path` is on gs:// and Cloud Storage cannot be
      reached. TensorFlow retries for minutes (196 s measured) and then
      reports the bucket as missing.
  """
  if path.startswith('gs://'):
    _check_gcs_reachable()
    bucket = 'gs://' + path[len('gs://'):].split('/', 1)[0]
    if not tf.io.gfile.isdir(bucket):
      raise tf.errors.NotFoundError(None, None,
                                    f'the bucket {bucket} does not exist')
  tf.io.gfile.makedirs(path)


def _check_gcs_reachable(timeout_secs: float = 20) -> None:
  """Connects to Cloud Storage, or to the HTTPS proxy TensorFlow would use."""
  proxy = os.environ.get('HTTPS_PROXY') or os.environ.get('https_proxy')
  if proxy:
    url = urllib.parse.urlsplit(proxy if '://' in proxy else 'http://' + proxy)
    address, via = (url.hostname, url.port or 80), f' through {proxy}'
  else:
    address, via = ('storage.googleapis.com', 443), ''
  try:
    socket.create_connection(address, timeout=timeout_secs).close()
  except OSError as e:
    raise ConnectionError(
        f'cannot reach Cloud Storage{via}: {e.strerror or e}; check the '
        'network (and HTTPS_PROXY), or use a local --workdir') from None


def read_object(path: str, fields: tuple[str, ...] = ()
                ) -> tuple[dict | None, str | None]:
  """The JSON object a run wrote to `path` (config.json, results.json, ...).

  Args:
    path: the file, local or gs://.
    fields: keys the object must have.

  Returns:
    (the object, None); (None, None) if there is no such file; or (None, what
    is wrong with it), for a file that is not JSON, not an object, or lacks
    a field.
  """
  name = os.path.basename(path)
  try:
    with tf.io.gfile.GFile(path) as f:
      value = json.load(f)
  except tf.errors.NotFoundError:
    return None, None
  except ValueError as e:  # Not JSON, or not UTF-8.
    return None, f'an unreadable {name} ({e})'
  if not isinstance(value, dict):
    return None, f'a {name} that holds {json.dumps(value)[:40]}, no object'
  missing = [f for f in fields if f not in value]
  if missing:
    return None, f'a {name} without {", ".join(missing)}'
  return value, None


def check_resumable(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses a resume whose config changes what the checkpoints trained.

  Raises:
    ValueError: if the workdir holds checkpoints of a structurally different
      config, or checkpoints without their config.json.
  """
  if not checkpoints(checkpoint_dir(workdir)):
    return
  old, problem = read_object(os.path.join(workdir, 'config.json'))
  if old is None:
    problem = problem or 'no config.json'
    if config.allow_structural_changes:
      return
    raise ValueError(
        f'{workdir} holds checkpoints but {problem}, so a resume cannot be '
        'checked against the config that wrote them. Restore that file, use '
        'another --workdir, or resume anyway with '
        '--config.allow_structural_changes=True.')
  changes = config_checks.config_changes(old, json.loads(
      config.to_json_best_effort()))
  if changes and not config.allow_structural_changes:
    raise ValueError(
        f'{workdir} holds checkpoints of a run whose config differs in '
        f'{"; ".join(changes)}. Use another --workdir, or resume anyway '
        'with --config.allow_structural_changes=True.')


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes config.json (the chief, once the run's state is restored).

  Raises:
    PermissionError: if the workdir cannot be written.
  """
  path = os.path.join(workdir, 'config.json')
  try:
    makedirs(workdir)
    # Written aside and renamed into place: the other hosts of a multi-host
    # run may be reading the previous one right now.
    with tf.io.gfile.GFile(path + '.tmp', 'w') as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    tf.io.gfile.rename(path + '.tmp', path, overwrite=True)
  except (tf.errors.OpError, OSError) as e:
    raise PermissionError(
        f'Cannot write to --workdir={workdir} ({e}). Choose a writable '
        'directory or bucket.') from None


def check_writable(directory: str) -> None:
  """Writes a file in `directory` and deletes it, leaving things as they were.

  So that a checkpoint directory that cannot be written is found before the
  data is loaded and the model built, not at the first save.

  Raises:
    PermissionError: naming the directory and the cause.
  """
  probe = os.path.join(directory, f'.write-test-{os.getpid()}')
  try:
    existed = tf.io.gfile.isdir(directory)
    makedirs(directory)
    with tf.io.gfile.GFile(probe, 'w') as f:
      f.write('')
    tf.io.gfile.remove(probe)
    if not existed:
      tf.io.gfile.rmtree(directory)
  except (tf.errors.OpError, OSError) as e:
    raise PermissionError(
        f'Cannot write to {directory} ({e}). Make it a writable directory '
        'or choose another --workdir.') from None


def checkpoints(directory: str) -> list[str]:
  """The checkpoint prefixes in `directory`, oldest first.

  Those the state file (`checkpoint`) lists and those on disk (an .index
  file), so that a lost or garbled state file loses no checkpoint.
  """
  # A garbled state file reads as None (TensorFlow logs a warning).
  state = tf.train.get_checkpoint_state(directory)
  listed = [os.path.join(directory, os.path.basename(p))
            for p in state.all_model_checkpoint_paths] if state else []
  found = [p[:-len('.index')] for p in
           tf.io.gfile.glob(os.path.join(directory, 'ckpt-*.index'))
           if not tf.io.gfile.isdir(p)]

  def number(path):
    suffix = path.rsplit('-', 1)[-1]
    return int(suffix) if suffix.isdigit() else -1

  return sorted(set(listed) | {p for p in found if number(p) >= 0},
                key=number)


def restore(checkpoint: tf.train.Checkpoint, directory: str,
            older_layouts: tuple[tf.train.Checkpoint, ...] = (),
            partial: bool = False) -> str | None:
  """Restores the newest readable checkpoint in `directory`; skips corrupt ones.

  Safe beside a live run: a checkpoint that run deletes while it is read (it
  keeps its newest few) is passed over for the newest one then on disk.

  Args:
    checkpoint: what to restore into.
    directory: the workdir's checkpoints directory (checkpoint_dir).
    older_layouts: checkpoints of the same variables as written by older
      versions of this code, tried when `checkpoint` does not match.
    partial: `checkpoint` holds part of what was saved (a reader that wants
      the model only): the rest is not expected.

  Returns:
    The path restored, or None if there was no checkpoint.

  Raises:
    CheckpointError: if there are checkpoints, but none is readable.
  """
  tried = []
  while paths := [p for p in checkpoints(directory) if p not in tried]:
    path = paths[-1]
    tried.append(path)
    for layout in (checkpoint, *older_layouts):
      try:
        status = layout.restore(path)
        if partial:
          status.expect_partial()
        status.assert_existing_objects_matched()
        return path
      # What a truncated or corrupt file raises depends on where it breaks.
      except (tf.errors.OpError, ValueError, AssertionError, IndexError,
              OSError) as e:
        error = e
    if not tf.io.gfile.exists(path + '.index'):
      logging.warning('Checkpoint %s is gone (deleted while it was read: by '
                      'the live run, which keeps only its newest, or by '
                      'hand); trying the newest one left.', path)
    else:
      logging.error('Checkpoint %s is unreadable (%s: %s); trying the one '
                    'before it.', path, type(error).__name__, error)
  if tried:
    raise CheckpointError(
        f'No readable checkpoint in {directory} (tried {len(tried)}; the '
        'log names why each failed). Move them aside to start afresh, or '
        'use another --workdir.')
  return None


def tidy_checkpoints(directory: str) -> None:
  """Puts the checkpoints directory in order (the chief, before it saves).

  Removes the `ckpt-N_temp` folders of saves that were cut short (a kill in
  the middle of one), and lists every checkpoint on disk in the state file
  if it lost some (deleted or garbled), so that the CheckpointManager made
  next knows them all and `max_to_keep` keeps counting them.
  """
  for path in tf.io.gfile.glob(os.path.join(directory, 'ckpt-*_temp')):
    logging.info('Removing %s, left by a save that was cut short.', path)
    tf.io.gfile.rmtree(path)
  paths = checkpoints(directory)
  state = tf.train.get_checkpoint_state(directory)
  listed = len(state.all_model_checkpoint_paths) if state else 0
  if len(paths) == listed:
    return
  logging.warning('Rewriting %s/checkpoint, which listed %d of the %d '
                  'checkpoints there.', directory, listed, len(paths))
  # With their times (those of their index files): a manager counts only
  # checkpoints newer than last_preserved_timestamp towards max_to_keep.
  times = [tf.io.gfile.stat(p + '.index').mtime_nsec / 1e9 for p in paths]
  tf.compat.v1.train.update_checkpoint_state(
      directory, paths[-1], all_model_checkpoint_paths=paths,
      all_model_checkpoint_timestamps=times,
      last_preserved_timestamp=min(times) - 1)


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
