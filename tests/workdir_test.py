"""The workdir's guards, in process: the lock, checkpoints, config, log."""

import json
import logging as std_logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import tensorflow as tf

from configs import default
from experiments import compare
from sam import config_checks
from sam import lock
from sam import logs
from sam import stopping
from sam import train
from sam import workdir as workdir_lib
from tests.conftest import ROOT
from tests.conftest import TINY
from tests.conftest import tiny_config


def _fields(config) -> list[str]:
  def flatten(tree, prefix=''):
    for key, value in tree.items():
      if isinstance(value, dict):
        yield from flatten(value, f'{prefix}{key}.')
      else:
        yield prefix + key
  return list(flatten(json.loads(config.to_json_best_effort())))


def test_every_config_field_is_structural_or_resumable():
  def owners(field):
    return [f for f in config_checks.STRUCTURAL_FIELDS +
            config_checks.RESUMABLE_FIELDS
            if field == f or field.startswith(f + '.')]
  problems = [f'{field}: {owners(field) or "in neither list"}'
              for field in _fields(default.get_config())
              if len(owners(field)) != 1]
  assert not problems, ('each field of configs/default.py must be in exactly '
                        'one of STRUCTURAL_FIELDS and RESUMABLE_FIELDS '
                        '(sam/config_checks.py):\n' + '\n'.join(problems))


@pytest.mark.parametrize('field,value', [
    ('dataset.label_noise', 0.4), ('dataset.augment', 'basic'),
    ('dataset.synthetic_train_size', 32), ('dataset.validation_size', 8),
    ('model.name', 'resnet20'), ('seed', 3)])
def test_a_change_of_the_data_or_model_is_structural(field, value):
  base = json.loads(tiny_config().to_json_best_effort())
  changed = json.loads(tiny_config(**{field: value}).to_json_best_effort())
  assert [c.split(':')[0] for c in config_checks.config_changes(
      base, changed)] == [field]


def test_other_changes_are_not_structural():
  base = json.loads(tiny_config().to_json_best_effort())
  changed = json.loads(tiny_config(**{
      'num_train_steps': 9, 'schedule.learning_rate': 0.3, 'sam.rho': 0.1,
      'dataset.data_dir': '/elsewhere', 'keep_checkpoints': 7,
      }).to_json_best_effort())
  assert not config_checks.config_changes(base, changed)


def test_file_lock_refuses_a_second_run(tmp_path):
  with lock.hold(str(tmp_path)):
    assert (tmp_path / 'lock').read_text().startswith(f'pid {os.getpid()} ')
    # flock is per open file: a second open in this process is refused too.
    with pytest.raises(lock.WorkdirBusyError,
                       match=f'in use by another run \\(pid {os.getpid()} '):
      with lock.hold(str(tmp_path)):
        pass
  with lock.hold(str(tmp_path)):  # Released at exit.
    pass


def _lease(path, owner, age, ttl=300.0):
  path.write_text(json.dumps({'owner': owner, 'renewed': time.time() - age,
                              'ttl_secs': ttl}))


def test_main_takes_the_lock_before_any_work(tmp_path):
  """main.py on a workdir another process holds: one line, exit 1."""
  with lock.hold(str(tmp_path)):
    done = subprocess.run(
        [sys.executable, 'main.py', '--config=configs/default.py',
         f'--workdir={tmp_path}', *TINY], cwd=ROOT, capture_output=True,
        text=True, timeout=300, check=False)
  assert done.returncode == 1, done.stderr[-3000:]
  assert (f'Error: --workdir={tmp_path} is in use by another run (pid '
          f'{os.getpid()} ') in done.stderr + done.stdout
  assert not (tmp_path / 'config.json').exists()


def test_lease_refuses_a_live_one_and_takes_an_expired_one(tmp_path):
  path = tmp_path / 'lock.json'
  _lease(path, 'pid 7 on other-host', age=10)
  with pytest.raises(lock.WorkdirBusyError,
                     match=r'pid 7 on other-host; its lease .*lock.json was '
                     r'renewed 10 s ago'):
    with lock.hold(str(tmp_path), lease=True, settle_secs=0):
      pass
  assert 'other-host' in path.read_text()  # Left alone.
  _lease(path, 'pid 7 on other-host', age=301)
  with lock.hold(str(tmp_path), lease=True, settle_secs=0):
    assert json.loads(path.read_text())['owner'].startswith(
        f'pid {os.getpid()} ')
  assert not path.exists()  # Released at exit.
  path.write_text('{"owner": "pid 7 on oth')  # Torn: holds nothing.
  with lock.hold(str(tmp_path), lease=True, settle_secs=0):
    pass


def test_lease_is_renewed_and_lost_to_a_racing_run(tmp_path):
  path = tmp_path / 'lock.json'
  with lock.hold(str(tmp_path), lease=True, settle_secs=0,
                 heartbeat_secs=0.05):
    first = json.loads(path.read_text())['renewed']
    time.sleep(0.5)
    assert json.loads(path.read_text())['renewed'] > first
  # Another run wrote its lease while this one settled: this one refuses.
  racing = lock.hold(str(tmp_path), lease=True, settle_secs=0.5)
  writer = threading.Timer(0.2, _lease, (path, 'pid 8 on racer', 0))
  writer.start()
  with pytest.raises(lock.WorkdirBusyError, match='pid 8 on racer; it took'):
    with racing:
      pass
  writer.join()


def _save_checkpoints(directory, steps):
  variable = tf.Variable(0)
  checkpoint = tf.train.Checkpoint(v=variable)
  manager = tf.train.CheckpointManager(checkpoint, directory, max_to_keep=5)
  for step in steps:
    variable.assign(step)
    manager.save(checkpoint_number=step)
  return checkpoint, variable


@pytest.mark.parametrize('damage', ['deleted', 'garbled', 'stale'])
def test_checkpoints_are_found_without_their_state_file(tmp_path, damage):
  directory = str(tmp_path)
  checkpoint, variable = _save_checkpoints(directory, [2, 4, 10])
  state = tmp_path / 'checkpoint'
  if damage == 'deleted':
    state.unlink()
  elif damage == 'garbled':
    state.write_bytes(state.read_bytes()[:20] + b'\x00{{garbage')
  else:  # Lists only the oldest, as after a crash between writes.
    tf.compat.v1.train.update_checkpoint_state(
        directory, os.path.join(directory, 'ckpt-2'),
        all_model_checkpoint_paths=[os.path.join(directory, 'ckpt-2')])
  want = [os.path.join(directory, f'ckpt-{s}') for s in (2, 4, 10)]
  assert workdir_lib.checkpoints(directory) == want
  variable.assign(-1)
  assert workdir_lib.restore(checkpoint, directory) == want[-1]
  assert int(variable.numpy()) == 10
  (tmp_path / 'ckpt-12_temp').mkdir()  # A save cut short by a kill.
  (tmp_path / 'ckpt-12_temp' / 'part-00000-of-00001.index').write_text('')
  workdir_lib.tidy_checkpoints(directory)
  assert not (tmp_path / 'ckpt-12_temp').exists()
  manager = tf.train.CheckpointManager(checkpoint, directory, max_to_keep=3)
  assert manager.checkpoints == want
  manager.save(checkpoint_number=11)  # max_to_keep counts the found ones.
  assert workdir_lib.checkpoints(directory) == want[1:] + [
      os.path.join(directory, 'ckpt-11')]


def test_a_checkpoint_a_live_run_deletes_is_passed_over(tmp_path):
  """A reader beside a run that keeps one checkpoint: the newest one wins."""
  directory = str(tmp_path)
  checkpoint, variable = _save_checkpoints(directory, [2])

  class LiveRun:
    """Saves step 3 and deletes step 2 as the reader starts on step 2."""

    def restore(self, path):
      if path.endswith('ckpt-2'):
        tf.train.CheckpointManager(checkpoint, directory, max_to_keep=1).save(
            checkpoint_number=3)
        variable.assign(0)
      return checkpoint.restore(path)

  variable.assign(3)
  assert workdir_lib.restore(LiveRun(), directory) == os.path.join(
      directory, 'ckpt-3')
  assert int(variable.numpy()) == 3
  assert not os.path.exists(os.path.join(directory, 'ckpt-2.index'))


# A sweep's natural names: TensorFlow reads [ ] * ? { } in a checkpoint
# path as a pattern, and the rest must survive the link around that.
@pytest.mark.parametrize('name', [
    'sweep[rho=0.05] ρ', pytest.param('a*b?c {x,y}', marks=pytest.mark.slow)])
def test_a_workdir_named_with_pattern_characters_keeps_and_resumes(
    tmp_path, name, caplog):
  workdir = tmp_path / name
  overrides = {'sam.rho': 0.1, 'steps_per_loop': 1,
               'checkpoint_every_steps': 1, 'keep_checkpoints': 2}
  train.train_and_evaluate(tiny_config(**overrides, num_train_steps=3),
                           str(workdir))
  assert sorted(p.name for p in (workdir / 'checkpoints').glob(
      '*.index')) == ['ckpt-2.index', 'ckpt-3.index']
  (workdir / 'checkpoints' / 'checkpoint').unlink()  # The state file lost.
  with lock.hold(str(workdir)):  # The lock file, beside the pattern.
    with pytest.raises(lock.WorkdirBusyError):
      with lock.hold(str(workdir)):
        pass
  caplog.set_level(std_logging.INFO)
  results = train.train_and_evaluate(tiny_config(**overrides),
                                     str(workdir))
  assert results['step'] == 4
  assert 'ckpt-3 at step 3.' in caplog.text  # Resumed, not started afresh.
  train.train_and_evaluate(tiny_config(**overrides), str(tmp_path / 'plain'))
  resumed, straight = (tf.train.load_checkpoint(
      workdir_lib.checkpoint_dir(str(tmp_path / d))) for d in (name, 'plain'))
  names = [n for n in straight.get_variable_to_shape_map()
           if 'VARIABLE_VALUE' in n and 'save_counter' not in n]
  for n in names:  # Bitwise: resumed from step 3, not trained afresh.
    np.testing.assert_array_equal(resumed.get_tensor(n),
                                  straight.get_tensor(n), err_msg=n)


def test_checkpoints_without_config_json_are_refused(tmp_path):
  _save_checkpoints(str(tmp_path / 'checkpoints'), [2])
  with pytest.raises(ValueError, match='holds checkpoints but no '
                     'config.json.*allow_structural_changes=True'):
    workdir_lib.check_resumable(tiny_config(), str(tmp_path))
  (tmp_path / 'config.json').write_text('{"seed": ')
  with pytest.raises(ValueError, match='an unreadable config.json'):
    workdir_lib.check_resumable(tiny_config(), str(tmp_path))
  workdir_lib.check_resumable(
      tiny_config(**{'allow_structural_changes': True}), str(tmp_path))


@pytest.mark.parametrize('text,shown', [
    ('null', 'null'), ('[1, 2]', r'\[1, 2\]'), ('"x"', '"x"'), ('3', '3')])
def test_a_config_json_that_is_no_object_is_one_line(tmp_path, text, shown):
  _save_checkpoints(str(tmp_path / 'checkpoints'), [2])
  (tmp_path / 'config.json').write_text(text)
  with pytest.raises(ValueError, match=(
      f'holds checkpoints but a config.json that holds {shown}, no object, '
      'so a resume cannot be checked.*allow_structural_changes=True')):
    workdir_lib.check_resumable(tiny_config(), str(tmp_path))


# What a run reads back besides config.json (above), each malformed kind.
MALFORMED = [(b'{"step": ', 'an unreadable'), (b'\xff\xfe', 'an unreadable'),
             (b'null', 'holds null, no object'),
             (b'[1, 2]', r'holds \[1, 2\], no object'),
             (b'"x"', 'holds "x", no object'), (b'{}', 'without ')]


@pytest.mark.parametrize('text,problem', MALFORMED)
def test_a_malformed_results_json_is_one_line_naming_it(tmp_path, text,
                                                        problem):
  """experiments.compare's report reads each cell's results.json."""
  (tmp_path / 'cell').mkdir()
  (tmp_path / 'cell' / 'results.json').write_bytes(text)
  with pytest.raises(ValueError, match=(
      f'^{re.escape(str(tmp_path))}/cell/results.json is .*{problem}.*: '
      'delete it, and run the grid again')):
    compare._finished(str(tmp_path), {'cell': {}})


def test_a_finished_run_with_a_malformed_results_json_writes_it_again(
    tmp_path, caplog):
  config = tiny_config(**{'num_train_steps': 2})
  train.train_and_evaluate(config, str(tmp_path))
  (tmp_path / 'results.json').write_text('[1, 2]')
  caplog.set_level(std_logging.WARNING)
  assert train.train_and_evaluate(config, str(tmp_path))['step'] == 2
  assert 'left a results.json that holds [1, 2], no object' in caplog.text
  assert json.loads((tmp_path / 'results.json').read_text())['step'] == 2


@pytest.mark.parametrize('text,problem', MALFORMED + [
    (b'{"owner": "pid 1 on h", "renewed": "soon"}', 'are no numbers'),
    (b'{"owner": "pid 1 on h", "renewed": 1, "ttl_secs": true}',
     'are no numbers')])
def test_a_malformed_lease_holds_no_one(tmp_path, text, problem, caplog):
  (tmp_path / 'lock.json').write_bytes(text)
  with lock.hold(str(tmp_path), lease=True, settle_secs=0):
    assert json.loads((tmp_path / 'lock.json').read_text())['owner'] == (
        lock._owner())  # pylint: disable=protected-access
  assert re.search(f'The workdir lease .*lock.json is .*{problem}.*: it '
                   'holds no one', caplog.text)


def test_a_workdir_is_checked_as_a_path_before_anything(tmp_path):
  source = tmp_path / 'checkout'
  source.mkdir()
  (tmp_path / 'file').write_text('')
  for workdir, message in [('', 'is empty'), (' ', 'is empty'),
                           (str(source), 'is the checkout itself'),
                           (str(source / '.'), 'is the checkout itself'),
                           (str(tmp_path / 'file'), 'is a file')]:
    with pytest.raises(ValueError, match=message):
      workdir_lib.check_path(workdir, str(source))
  for workdir in (str(source / 'runs' / 'a'), str(tmp_path / 'new'),
                  'gs://bucket/run', str(tmp_path / 'sweep[rho=0.05]')):
    workdir_lib.check_path(workdir, str(source))
  with pytest.raises(ValueError, match=r'--workdir=gs://b/sweep\[rho=0.05\] '
                     'has one of .*name the run without them'):
    workdir_lib.check_path('gs://b/sweep[rho=0.05]', str(source))


class _FullDisk:
  """A file whose writes fail, as on a full disk, until `heal()`."""

  def __init__(self):
    self.lines, self.broken = [], True

  def write(self, text):
    if self.broken:
      raise OSError(28, 'No space left on device')
    self.lines.append(text)

  def flush(self):
    pass

  def close(self):
    self.write('')


def test_a_failing_log_file_never_stops_the_run(tmp_path, capsys):
  disk = _FullDisk()
  handler = logs.WorkdirLog(str(tmp_path / 'log.txt'), flush_secs=0,
                            open_file=lambda path, mode: disk)
  logger = std_logging.getLogger('workdir_test')
  logger.addHandler(handler)
  try:
    for i in range(3):
      logger.warning('line %d', i)  # Raises nothing.
    disk.broken = False
    logger.warning('line 3')
    disk.broken = True
    logger.warning('line 4')
  finally:
    logger.removeHandler(handler)
    handler.close()
  assert disk.lines == ['line 3\n']
  # Said once per spell of failures, not once per line.
  assert capsys.readouterr().err.count('Could not write the log') == 2


def test_stop_flag_takes_sigterm_and_sigint_and_a_second_ctrl_c_stops():
  # Python's own handler, or SIG_IGN where the tests were started in the
  # background of a shell without job control (which ignores SIGINT there).
  before = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)]
  for signum in (signal.SIGTERM, signal.SIGINT):
    with stopping.StopFlag() as flag:
      assert not flag.requested
      os.kill(os.getpid(), signum)
      time.sleep(0.01)  # The handler runs at the next bytecode.
      assert flag.requested_by == signal.Signals(signum).name
      with pytest.raises(stopping.Stopped, match=' before training started'):
        flag.stop_if_requested()  # As the start-up does between stages.
      if signum == signal.SIGINT:
        with pytest.raises(KeyboardInterrupt):
          os.kill(os.getpid(), signal.SIGINT)
          time.sleep(0.01)
  # The handlers before it are back.
  assert [signal.getsignal(s)
          for s in (signal.SIGTERM, signal.SIGINT)] == before


def test_gs_workdir_without_network_is_named_at_once(monkeypatch):
  with socket.socket() as s:  # A port no one listens on: a dead proxy.
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  monkeypatch.setenv('HTTPS_PROXY', f'http://127.0.0.1:{port}')
  start = time.monotonic()
  with pytest.raises(ConnectionError,
                     match=f'cannot reach Cloud Storage through http://'
                     f'127.0.0.1:{port}: .*HTTPS_PROXY.*local --workdir'):
    workdir_lib.makedirs('gs://some-bucket/run')
  assert time.monotonic() - start < 10
