r"""Trains an image classifier with (or without) SAM.

  python main.py --config=configs/cifar10_sam.py --workdir=gs://BUCKET/run

Any config field can be overridden, e.g. `--config.sam.rho=0` (the baseline).
"""

import os
import signal
import sys


def _stop_while_loading(signum, frame):
  del signum, frame
  print('Stopped by SIGTERM while loading, before training started; nothing '
        'was trained. Run the same command to start again.', file=sys.stderr,
        flush=True)
  # Not sys.exit: its SystemExit, raised inside the initialization of one of
  # TensorFlow's C++ modules, becomes 'ImportError: initialization failed'
  # and exit code 1 (seen on the tensorflow-tpu wheel). Nothing is open yet.
  os._exit(0)  # pylint: disable=protected-access


if __name__ == '__main__':
  # A preemption while TensorFlow loads ends the run at once, with nothing
  # to save (main() then takes SIGTERM over).
  signal.signal(signal.SIGTERM, _stop_while_loading)

# TensorFlow reads its C++ log level once, at import: its INFO and WARNING
# lines stay off unless TF_CPP_MIN_LOG_LEVEL says otherwise.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# jax off the accelerator, and a TPU's runtime (a named pod slice, PJRT):
# all read once, when TensorFlow or jax loads.
from sam import environment  # noqa: E402  (no TensorFlow in it)
from sam import start_up  # noqa: E402

_ENVIRONMENT_SET = environment.prepare(sys.argv)
# TensorFlow 2.21 prints notices as it loads, before it reads that level
# (sam/start_up.py): held off the console, kept for the workdir's log.
_LOADING = start_up.Held()

import contextlib

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags
import tensorflow as tf

from sam import distribute
from sam import input_pipeline
from sam import lock
from sam import logs
from sam import stopping
from sam import train
from sam import versions
from sam import workdir as workdir_lib

_HELD_LINES = _LOADING.lines()

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
                input_pipeline.DataNotFoundError, lock.WorkdirBusyError,
                workdir_lib.CheckpointError, versions.UnsupportedVersionError,
                distribute.PeersMissingError)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = _load_config()
  workdir = _WORKDIR.value
  if not _TF_INFO.value:
    logging.get_absl_handler().addFilter(logs.NoLibraryInfo())
  with contextlib.ExitStack() as stack:
    # From here on SIGTERM and Ctrl-C stop the run where nothing is lost.
    signals = stack.enter_context(stopping.StopFlag())
    try:
      workdir_lib.check_path(workdir, os.path.dirname(os.path.abspath(
          __file__)))
      versions.check_installed()
      # The strategy first: TPU and multi-worker set-up must precede other
      # ops.
      strategy = distribute.create_strategy(
          config.strategy, config.tpu, config.multi_worker_timeout_secs,
          signals)
      signals.stop_if_requested()
      chief = distribute.is_chief(strategy)
      _makedirs(workdir)
      if chief:
        # Before anything is written there: a second run must change nothing.
        stack.enter_context(lock.hold(workdir))
      log = stack.enter_context(logs.mirror(workdir, chief))
      if _HELD_LINES:
        log.write_file_only(''.join(
            f'Held off the console as TensorFlow loaded: {line}\n'
            for line in _HELD_LINES))
    except _USER_ERRORS as e:
      raise SystemExit(f'Error: {e}') from None
    except stopping.Stopped as e:
      logging.warning('Stopped by %s', e)
      return
    try:
      if _ENVIRONMENT_SET:
        logging.info('Set before TensorFlow loaded: %s', ' '.join(
            f'{k}={v}' for k, v in sorted(_ENVIRONMENT_SET.items())))
      logging.info('TensorFlow %s; devices: %s', tf.__version__,
                   tf.config.list_logical_devices())
      logging.info('Config:\n%s', config)
      train.train_and_evaluate(config, workdir, strategy, signals)
    except _USER_ERRORS as e:
      # A bad config, missing data, a diverged run, a full disk: the line
      # says what to fix, and the traceback (in the workdir's log only)
      # would hide it on the console.
      logging.error('%s: %s', type(e).__name__, e)
      log.write_traceback()
      raise SystemExit(f'Error: {e}') from None
    except stopping.Stopped as e:
      logging.warning('Stopped by %s', e)
    except KeyboardInterrupt:
      # A second Ctrl-C (the first stops after the current loop or start-up
      # stage).
      logging.error('Interrupted: stopped at once; run the same command to '
                    'resume from the last checkpoint.')
      raise SystemExit(130) from None
    except Exception:
      # Unforeseen: the traceback goes to the console and, for a remote
      # run, into the workdir's log too.
      log.write_traceback()
      raise


# What a config file that cannot be loaded, or an override of a field it
# does not have, raises (ml_collections' config_flags, at parse or access).
_CONFIG_ERRORS = (OSError, AttributeError, KeyError, TypeError, ValueError)


def _config_error(e: Exception) -> SystemExit:
  text = str(e).replace("\\'", "'").replace('\\n', '\n')
  if len(text) > 1 and text[0] == text[-1] and text[0] in '\'"':
    text = text[1:-1]  # A KeyError's repr.
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  if isinstance(e, OSError):  # The file: its last line says why.
    what = lines[-1]
  elif isinstance(e, (AttributeError, KeyError)):
    what = ' '.join([f'no field {lines[0]} in the config.', *lines[1:]])
  else:
    what = ' '.join(lines)
  return SystemExit(f'Error: --config: {what} (configs/default.py lists '
                    'every field).')


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:  # As absl says it.
    raise SystemExit(f'FATAL Flags parsing error: {e}\nPass --helpshort or '
                     '--helpfull to see help on flags.') from None
  except _CONFIG_ERRORS as e:
    raise _config_error(e) from None


def _load_config():
  """--config with its overrides, or one line on what is wrong with them."""
  try:
    config = flags.FLAGS.config
    config.get('seed')  # A file that failed to load raises on first use.
    return config
  except _CONFIG_ERRORS as e:
    raise _config_error(e) from None


def _makedirs(workdir: str) -> None:
  try:
    workdir_lib.makedirs(workdir)
  except (tf.errors.OpError, OSError) as e:
    raise PermissionError(
        f'Cannot write to --workdir={workdir} ({e}). Choose a writable '
        'directory or bucket.') from None


def run():
  """The `sam-train` console script of `pip install .`."""
  app.run(main, flags_parser=_parse_flags)


if __name__ == '__main__':
  run()
