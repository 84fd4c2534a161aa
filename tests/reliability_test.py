"""Nothing lost on faults: preemption, exact resume, NaN, bad checkpoints."""

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from sam import config_checks
from sam import input_pipeline
from sam import train
from sam import workdir as workdir_lib
from tests.conftest import ROOT
from tests.conftest import TINY
from tests.conftest import tiny_config
from tests.conftest import write_idx

pytestmark = pytest.mark.slow  # Not in the fast subset (pytest.ini).


def _weights(workdir):
  """{name: value} of the model and optimizer in the latest checkpoint."""
  reader = tf.train.load_checkpoint(os.path.join(workdir, 'checkpoints'))
  return {n: reader.get_tensor(n) for n in reader.get_variable_to_shape_map()
          if 'VARIABLE_VALUE' in n and 'save_counter' not in n}


def _assert_same_weights(a, b):
  """Bitwise: an interrupted and resumed run is the uninterrupted one."""
  wa, wb = _weights(a), _weights(b)
  assert sorted(wa) == sorted(wb) and wa
  for name in wa:
    np.testing.assert_array_equal(wa[name], wb[name], err_msg=name)


def _run_main(workdir, *flags):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', JAX_PLATFORMS='cpu')
  return subprocess.Popen(
      [sys.executable, 'main.py', '--config=configs/default.py',
       f'--workdir={workdir}', *TINY, *flags],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True)


def test_sigterm_saves_and_resume_matches_uninterrupted(tmp_path):
  flags = ['--config.num_train_steps=600', '--config.steps_per_loop=10',
           '--config.log_every_steps=10', '--config.schedule.name=constant',
           '--config.checkpoint_every_steps=100000',
           '--config.eval_every_steps=100000']
  straight = _run_main(tmp_path / 'a', *flags)
  killed = _run_main(tmp_path / 'b', *flags)
  log = tmp_path / 'b' / 'log.txt'
  _wait_for_log(tmp_path / 'b', '[10] train/')
  killed.send_signal(signal.SIGTERM)
  out, _ = killed.communicate(timeout=240)
  assert killed.returncode == 0, out[-3000:]
  assert 'Stopped by SIGTERM' in out
  step = int(tf.train.latest_checkpoint(
      str(tmp_path / 'b' / 'checkpoints')).rsplit('-', 1)[1])
  assert 10 <= step < 600
  assert not (tmp_path / 'b' / 'results.json').exists()
  resumed = _run_main(tmp_path / 'b', *flags)
  out, _ = resumed.communicate(timeout=240)
  assert resumed.returncode == 0, out[-3000:]
  assert 'Resumed from' in out
  # The log of the interrupted run is kept before the resumed run's.
  log_text = log.read_text()
  assert log_text.index('Stopped by SIGTERM') < log_text.index('Resumed from')
  out, _ = straight.communicate(timeout=240)
  assert straight.returncode == 0, out[-3000:]
  _assert_same_weights(tmp_path / 'a', tmp_path / 'b')


def test_sigkill_mid_run_resumes_to_the_uninterrupted_weights(tmp_path):
  """kill -9 (no handler runs) after a checkpoint: the same command again."""
  flags = ['--config.num_train_steps=300', '--config.steps_per_loop=10',
           '--config.log_every_steps=10', '--config.schedule.name=constant',
           '--config.checkpoint_every_steps=20',
           '--config.eval_every_steps=100000']
  straight = _run_main(tmp_path / 'a', *flags)
  killed = _run_main(tmp_path / 'b', *flags)
  _wait_for_log(tmp_path / 'b', '[30] train/')  # After the save at step 20.
  assert list((tmp_path / 'b' / 'checkpoints').glob('ckpt-*.index'))
  killed.send_signal(signal.SIGKILL)
  killed.communicate(timeout=60)
  assert killed.returncode == -signal.SIGKILL
  assert not (tmp_path / 'b' / 'results.json').exists()
  resumed = _run_main(tmp_path / 'b', *flags)
  out, _ = resumed.communicate(timeout=240)
  assert resumed.returncode == 0, out[-3000:]
  assert 'Resumed from' in out
  out, _ = straight.communicate(timeout=240)
  assert straight.returncode == 0, out[-3000:]
  _assert_same_weights(tmp_path / 'a', tmp_path / 'b')


def test_resume_with_other_steps_per_loop(tmp_path):
  config = tiny_config(**{'num_train_steps': 7, 'steps_per_loop': 3})
  train.train_and_evaluate(config, str(tmp_path / 'a'))
  first = tiny_config(**{'num_train_steps': 2, 'steps_per_loop': 1})
  train.train_and_evaluate(first, str(tmp_path / 'b'))
  then = tiny_config(**{'num_train_steps': 7, 'steps_per_loop': 4})
  train.train_and_evaluate(then, str(tmp_path / 'b'))
  _assert_same_weights(tmp_path / 'a', tmp_path / 'b')


# Under mixed_float16, steps whose gradients overflow are skipped, but a
# non-finite loss still stops the run.
@pytest.mark.parametrize('policy', ['float32', 'mixed_float16'])
def test_nan_stops_and_keeps_only_finite_checkpoints(tmp_path, policy):
  config = tiny_config(**{'num_train_steps': 20, 'steps_per_loop': 1,
                          'checkpoint_every_steps': 1,
                          'schedule.learning_rate': 1e30,
                          'dtype_policy': policy})
  with pytest.raises(FloatingPointError, match=r'in steps (\d+) to \1'):
    train.train_and_evaluate(config, str(tmp_path))
  checkpoints = tf.train.get_checkpoint_state(
      str(tmp_path / 'checkpoints')).all_model_checkpoint_paths
  assert checkpoints
  for path in checkpoints:
    reader = tf.train.load_checkpoint(path)
    for name in reader.get_variable_to_shape_map():
      value = reader.get_tensor(name)
      if isinstance(value, np.ndarray) and value.dtype.kind == 'f':
        assert np.isfinite(value).all(), (path, name)


def test_corrupt_latest_checkpoint_falls_back(tmp_path):
  config = tiny_config(**{'num_train_steps': 6, 'checkpoint_every_steps': 2})
  train.train_and_evaluate(config, str(tmp_path / 'a'))
  first = tiny_config(**{'num_train_steps': 4, 'checkpoint_every_steps': 2})
  train.train_and_evaluate(first, str(tmp_path / 'b'))
  data_file = tmp_path / 'b' / 'checkpoints' / 'ckpt-4.data-00000-of-00001'
  data_file.write_bytes(data_file.read_bytes()[:100])  # Truncated.
  results = train.train_and_evaluate(config, str(tmp_path / 'b'))
  assert results['step'] == 6
  _assert_same_weights(tmp_path / 'a', tmp_path / 'b')


def test_structural_config_change_is_refused(tmp_path):
  train.train_and_evaluate(tiny_config(**{'num_train_steps': 2}),
                           str(tmp_path))
  changed = tiny_config(**{'num_train_steps': 4, 'model.name': 'resnet20',
                           'optimizer.name': 'adam'})
  with pytest.raises(ValueError, match='model.name.*optimizer.name'):
    train.train_and_evaluate(changed, str(tmp_path))
  # Longer training or another learning rate is no structural change...
  train.train_and_evaluate(
      tiny_config(**{'num_train_steps': 3, 'schedule.learning_rate': 0.01}),
      str(tmp_path))
  # ...and the override flag lets a structural change through.
  train.train_and_evaluate(
      tiny_config(**{'num_train_steps': 4, 'seed': 1,
                     'allow_structural_changes': True}), str(tmp_path))


def test_fields_newer_than_the_checkpoint_are_no_change():
  old = {'model': {'name': 'cnn'}, 'seed': 0}
  new = {'model': {'name': 'cnn'}, 'seed': 0, 'ema_decay': 0.0}
  assert not config_checks.config_changes(old, new)
  assert config_checks.config_changes(new | {'ema_decay': 0.9}, new) == [
      'ema_decay: 0.9 -> 0.0']


def test_unwritable_workdir_fails_before_training(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('not a directory')
  with pytest.raises(PermissionError, match='--workdir'):
    train.train_and_evaluate(tiny_config(), str(blocker / 'run'))
  run = _run_main(blocker / 'run')
  out, _ = run.communicate(timeout=240)
  assert run.returncode == 1
  assert 'Error: Cannot write to --workdir' in out
  assert 'Traceback' not in out


@pytest.mark.parametrize('when', ['TensorFlow loads', 'the model is built'])
def test_sigterm_during_start_up_exits_0(tmp_path, when):
  """Nothing to save yet: exit 0 at once (TensorFlow's default is 143)."""
  run = _run_main(tmp_path, '--config.num_train_steps=100000')
  if when == 'TensorFlow loads':
    time.sleep(1)
  else:  # The log is opened once the workdir is locked, before the data.
    deadline = time.monotonic() + 120
    while not (tmp_path / 'log.txt').exists():
      assert time.monotonic() < deadline and run.poll() is None
      time.sleep(0.02)
  run.send_signal(signal.SIGTERM)
  out, _ = run.communicate(timeout=120)
  assert run.returncode == 0, out
  assert 'Stopped by SIGTERM' in out and 'before training started' in out
  assert 'Traceback' not in out
  assert not list(tmp_path.glob('checkpoints/ckpt-*'))


def test_unwritable_checkpoints_fail_before_the_data_loads(tmp_path,
                                                          monkeypatch):
  (tmp_path / 'checkpoints').write_text('a file where the folder goes')
  monkeypatch.setattr(input_pipeline, 'load',
                      lambda config: pytest.fail('the data was loaded'))
  with pytest.raises(PermissionError,
                     match=r'Cannot write to .*checkpoints .*writable'):
    train.train_and_evaluate(tiny_config(), str(tmp_path))


def test_labels_out_of_range_are_reported(tmp_path):
  for prefix, n in (('train', 32), ('t10k', 8)):
    write_idx(tmp_path / f'{prefix}-images-idx3-ubyte.gz',
               np.zeros((n, 28, 28)))
    write_idx(tmp_path / f'{prefix}-labels-idx1-ubyte.gz',
               np.arange(n) % 12)  # 10 and 11 are not Fashion-MNIST classes.
  config = tiny_config(**{'dataset.name': 'fashion_mnist',
                          'dataset.data_dir': str(tmp_path)})
  with pytest.raises(ValueError, match=r'train labels range over \[0, 11\]'):
    input_pipeline.load(config)


def _truncated_fashion_mnist(workdir):
  data = workdir.parent / 'data'
  data.mkdir()
  for prefix, n in (('train', 32), ('t10k', 8)):
    write_idx(data / f'{prefix}-images-idx3-ubyte.gz', np.zeros((n, 28, 28)))
    write_idx(data / f'{prefix}-labels-idx1-ubyte.gz', np.arange(n) % 10)
  images = data / 'train-images-idx3-ubyte.gz'
  images.write_bytes(images.read_bytes()[:-20])
  return ['--config.dataset.name=fashion_mnist',
          f'--config.dataset.data_dir={data}']


def _checkpoints_a_file(workdir):
  workdir.mkdir()
  (workdir / 'checkpoints').write_text('a file where the folder goes')
  return []


# Every bad input that gets as far as the workdir (a bad config file or
# field stops before it: main_test.py), with what its line must say.
@pytest.mark.parametrize('flags,message', [
    (['--config.batch_size=0'], 'config.batch_size=0'),
    (['--config.seed=-1'], 'config.seed=-1'),
    (['--config.keep_checkpoints=0'], 'config.keep_checkpoints=0'),
    (['--config.num_train_steps=0'], 'config.num_train_steps=0'),
    (['--config.sam.rho=inf'], 'config.sam.rho=inf'),
    (['--config.dataset.validation_size=64'],
     'config.dataset.validation_size=64'),
    (_checkpoints_a_file, 'checkpoints'),
    (_truncated_fashion_mnist, 'is no complete gzip file'),
])
def test_every_bad_input_is_one_line_exit_1_and_in_the_log(tmp_path, flags,
                                                           message):
  workdir = tmp_path / 'run'
  if callable(flags):
    flags = flags(workdir)
  run = _run_main(workdir, *flags)
  out, _ = run.communicate(timeout=240)
  assert run.returncode == 1, out
  assert 'Traceback' not in out
  last = out.strip().splitlines()[-1]
  assert last.startswith('Error: ') and message in last, last
  # The workdir's log says why the run died, with the traceback.
  log = (workdir / 'log.txt').read_text()
  assert last[len('Error: '):] in log and 'Traceback' in log


# Long enough that signals land mid-run (the steps after tracing are fast).
_LONG = ['--config.num_train_steps=100000', '--config.steps_per_loop=10',
         '--config.log_every_steps=10', '--config.schedule.name=constant',
         '--config.checkpoint_every_steps=1000000',
         '--config.eval_every_steps=1000000']


def _wait_for_log(workdir, text, timeout=240):
  log = workdir / 'log.txt'
  deadline = time.time() + timeout
  while not (log.exists() and text in log.read_text()):
    assert time.time() < deadline, f'no {text!r} in {log}'
    time.sleep(0.05)


def test_second_run_on_a_live_workdir_is_refused(tmp_path):
  first = _run_main(tmp_path, *_LONG)
  try:
    _wait_for_log(tmp_path, '[10] train/')
    config = (tmp_path / 'config.json').read_text()
    log = (tmp_path / 'log.txt').read_text()
    second = _run_main(tmp_path, *_LONG, '--config.sam.rho=0')
    out, _ = second.communicate(timeout=240)
    assert second.returncode == 1, out[-3000:]
    assert (f'Error: --workdir={tmp_path} is in use by another run (pid '
            f'{first.pid} ') in out
    assert 'Traceback' not in out
    # It changed nothing there.
    assert (tmp_path / 'config.json').read_text() == config
    assert (tmp_path / 'log.txt').read_text().startswith(log)
  finally:
    first.send_signal(signal.SIGTERM)
    out, _ = first.communicate(timeout=240)
  assert first.returncode == 0, out[-3000:]


def test_ctrl_c_saves_and_exits_0(tmp_path):
  run = _run_main(tmp_path, *_LONG)
  _wait_for_log(tmp_path, '[10] train/')
  run.send_signal(signal.SIGINT)
  out, _ = run.communicate(timeout=240)
  assert run.returncode == 0, out[-3000:]
  assert 'Stopped by SIGINT' in out and 'Traceback' not in out
  step = int(tf.train.latest_checkpoint(
      str(tmp_path / 'checkpoints')).rsplit('-', 1)[1])
  assert step >= 10
  # (A second Ctrl-C: workdir_test.py, in process, where its timing is sure.)


def test_a_failed_resume_leaves_config_json_alone(tmp_path, shallow_resnet20):
  config = tiny_config(**{'num_train_steps': 2})
  train.train_and_evaluate(config, str(tmp_path))
  saved = (tmp_path / 'config.json').read_text()
  other_model = tiny_config(**{'num_train_steps': 4,
                               'model.name': 'resnet20',
                               'allow_structural_changes': True})
  with pytest.raises(RuntimeError, match='No readable checkpoint'):
    train.train_and_evaluate(other_model, str(tmp_path))
  assert (tmp_path / 'config.json').read_text() == saved
  config.num_train_steps = 4
  assert train.train_and_evaluate(config, str(tmp_path))['step'] == 4


@pytest.mark.parametrize('damage', ['deleted', 'garbled'])
def test_a_lost_state_file_resumes_from_the_files(tmp_path, damage,
                                                  shallow_resnet20):
  config = tiny_config(**{'num_train_steps': 6, 'checkpoint_every_steps': 2})
  train.train_and_evaluate(config, str(tmp_path / 'a'))
  first = tiny_config(**{'num_train_steps': 4, 'checkpoint_every_steps': 2})
  train.train_and_evaluate(first, str(tmp_path / 'b'))
  state = tmp_path / 'b' / 'checkpoints' / 'checkpoint'
  if damage == 'deleted':
    state.unlink()
  else:
    state.write_text('model_checkpoint_path: "ckpt-4\n garbage {{')
  # Still checked against the run's config...
  with pytest.raises(ValueError, match='model.name'):
    train.train_and_evaluate(tiny_config(**{'model.name': 'resnet20'}),
                             str(tmp_path / 'b'))
  # ...and resumed from step 4, not 0.
  assert train.train_and_evaluate(config, str(tmp_path / 'b'))['step'] == 6
  _assert_same_weights(tmp_path / 'a', tmp_path / 'b')


def test_rerunning_a_finished_run_keeps_its_results(tmp_path):
  config = tiny_config(**{'num_train_steps': 4})
  results = train.train_and_evaluate(config, str(tmp_path))
  assert 'train/loss' in results
  saved = (tmp_path / 'results.json').read_text()
  again = train.train_and_evaluate(config, str(tmp_path))
  assert again == pytest.approx(results)
  shorter = tiny_config(**{'num_train_steps': 2})
  assert train.train_and_evaluate(shorter, str(tmp_path))['step'] == 4
  assert (tmp_path / 'results.json').read_text() == saved


def test_a_failed_save_stops_in_one_line_and_keeps_the_last_checkpoint(
    tmp_path):
  train.train_and_evaluate(tiny_config(**{'num_train_steps': 2}),
                           str(tmp_path))
  # Where ckpt-4's index file must go: its save fails, as on a full disk.
  (tmp_path / 'checkpoints' / 'ckpt-4.index').mkdir()
  config = tiny_config(**{'num_train_steps': 4, 'checkpoint_every_steps': 2})
  with pytest.raises(workdir_lib.CheckpointError,
                     match='Could not save the checkpoint of step 4 in .*'
                     'The checkpoints before it are intact'):
    train.train_and_evaluate(config, str(tmp_path))
  (tmp_path / 'checkpoints' / 'ckpt-4.index').rmdir()
  assert workdir_lib.checkpoints(str(tmp_path / 'checkpoints'))[-1].endswith(
      'ckpt-2')
  assert train.train_and_evaluate(config, str(tmp_path))['step'] == 4


def test_sigterm_ends_in_a_checkpoint_within_stop_within_secs(tmp_path):
  """A loop of a million steps (an hour here) is cut to what fits in
  stop_within_secs, so that SIGTERM (a spot VM's 30 s notice) ends in a
  checkpoint in time; with stop_within_secs=0 this run would not stop for
  an hour."""
  bound = 3
  run = _run_main(tmp_path, '--config.num_train_steps=1000000',
                  '--config.steps_per_loop=1000000',
                  '--config.log_every_steps=1000000',
                  '--config.eval_every_steps=1000000',
                  '--config.checkpoint_every_steps=1000000',
                  f'--config.stop_within_secs={bound}')
  log = tmp_path / 'log.txt'
  deadline = time.time() + 240
  while time.time() < deadline and not (
      log.exists() and 'Training from step 0' in log.read_text()):
    time.sleep(0.05)
  time.sleep(2 * bound)  # Past the first, measured loops.
  sent = time.time()
  run.send_signal(signal.SIGTERM)
  out, _ = run.communicate(timeout=240)
  assert run.returncode == 0, out[-3000:]
  step = int(tf.train.latest_checkpoint(
      str(tmp_path / 'checkpoints')).rsplit('-', 1)[1])
  # Some steps, not the million (one, on a machine busy enough that the
  # first loop's compile takes the whole wait: seen beside other runs).
  assert 1 <= step < 1000000
  # When the run said it had saved (absl's time of the line): within the
  # bound, and a second for the noise of a shared machine.
  stamp = re.search(r'^W\d{4} (\d\d):(\d\d):(\d\d\.\d+) .*Stopped by '
                    f'SIGTERM at step {step}, saved', log.read_text(), re.M)
  assert stamp, out[-3000:]
  h, m, sec = stamp.groups()
  saved = time.mktime(time.localtime(sent)[:3] + (int(h), int(m), 0, 0, 0,
                                                  -1)) + float(sec)
  assert 0 < saved - sent < bound + 1, (saved - sent, out[-2000:])
