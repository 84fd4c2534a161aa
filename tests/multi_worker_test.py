"""Two hosts: main.py under MultiWorkerMirroredStrategy, as two processes.

Each worker is its own `main.py` process with its own TF_CONFIG, on loopback
ports, one CPU replica each, reading its own shard of the data, with the
workdir shared as a bucket would be. Workers are subprocesses because CPU
collectives remember their groups per process (see conftest.py): a worker in
the pytest process would clash with the other tests' strategies. The test
process itself only reads checkpoints.

The reference is one process with one replica on the same global batch:
`input_pipeline` gives pipeline p of P the examples p, p + P, ... of each
step's slice of the epoch's permutation, so the two shards of a step are
exactly the one-process batch of that step. The `cnn` model has no batch
norm, so SAM with the perturbation from the gradient summed over both hosts
is the one-process SAM step, up to float rounding; a perturbation from each
host's own gradient (`sam.sync_perturbation=False`) moves the weights by
about 0.2 after four steps here, and halves the logged gradient norm.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import ROOT
from tests.conftest import TINY

pytestmark = pytest.mark.slow  # Not in the fast subset (pytest.ini).

# A constant rate, so that a run stopped and resumed is the uninterrupted run.
_FLAGS = TINY + ['--config.schedule.name=constant']
_NORM = re.compile(r'\[(\d+)\] train/.*grad_norm=([-+.e\d]+)')


def _free_ports(n: int) -> list[int]:
  sockets = [socket.socket() for _ in range(n)]
  try:
    for s in sockets:  # Held open together, so the ports differ.
      s.bind(('127.0.0.1', 0))
    return [s.getsockname()[1] for s in sockets]
  finally:
    for s in sockets:
      s.close()


def _start(workdir, log, *flags, tf_config=None):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', JAX_PLATFORMS='cpu')
  env.pop('TF_CONFIG', None)
  if tf_config:
    env['TF_CONFIG'] = json.dumps(tf_config)
  with open(log, 'w') as out:
    return subprocess.Popen(
        [sys.executable, 'main.py', '--config=configs/default.py',
         f'--workdir={workdir}', *_FLAGS, *flags], cwd=ROOT, env=env,
        stdout=out, stderr=subprocess.STDOUT)


def _start_workers(workdir, logs, *flags):
  cluster = {'worker': [f'127.0.0.1:{p}' for p in _free_ports(len(logs))]}
  return [_start(workdir, log, '--config.strategy=multi_worker', *flags,
                 tf_config={'cluster': cluster,
                            'task': {'type': 'worker', 'index': i}})
          for i, log in enumerate(logs)]


def _finish(processes, logs, timeout=240):
  """Waits for all; on a failure or a hang, ends all and shows the logs."""
  deadline = time.monotonic() + timeout
  try:
    for p in processes:
      p.wait(timeout=max(1, deadline - time.monotonic()))
  finally:
    for p in processes:
      p.kill()  # A no-op for those that exited.
      p.wait()
  outputs = [log.read_text() for log in logs]
  for p in processes:
    assert p.returncode == 0, '\n=====\n'.join(o[-3000:] for o in outputs)
  return outputs


def _norms(output: str) -> dict[int, float]:
  return {int(step): float(norm) for step, norm in _NORM.findall(output)}


def _weights(prefix) -> dict[str, np.ndarray]:
  reader = tf.train.load_checkpoint(str(prefix))
  return {n: reader.get_tensor(n) for n in reader.get_variable_to_shape_map()
          if 'VARIABLE_VALUE' in n and 'save_counter' not in n}


def _assert_same_weights(a, b):
  wa, wb = _weights(a), _weights(b)
  assert sorted(wa) == sorted(wb) and any('trainable' in n for n in wa)
  for name in wa:
    # Float rounding only: the sums run in another order (measured: 7e-7).
    np.testing.assert_allclose(wa[name], wb[name], rtol=1e-5, atol=1e-5,
                               err_msg=name)


def _assert_same_norms(output, reference, steps):
  assert sorted(_norms(output)) == list(steps), output[-3000:]
  for step, norm in _norms(output).items():
    # Logged with 6 significant digits.
    np.testing.assert_allclose(norm, _norms(reference)[step], rtol=1e-4,
                               err_msg=f'train/grad_norm at step {step}')


def test_two_workers_match_one_process_and_resume(tmp_path):
  workdir = tmp_path / 'multi'
  logs = [tmp_path / f'worker{i}.txt' for i in range(2)]
  reference = _start(tmp_path / 'single', tmp_path / 'single.txt',
                     '--config.num_train_steps=8', '--config.log_every_steps=1',
                     '--config.checkpoint_every_steps=4')
  workers = _start_workers(workdir, logs, '--config.num_train_steps=4',
                           '--config.log_every_steps=1')
  first = _finish(workers, logs)
  # Both workers restarted, with a longer run: they resume from the chief's
  # checkpoint at step 4.
  logs2 = [tmp_path / f'worker{i}-restart.txt' for i in range(2)]
  workers = _start_workers(workdir, logs2, '--config.num_train_steps=8',
                           '--config.log_every_steps=1')
  second = _finish(workers, logs2)
  (single,) = _finish([reference], [tmp_path / 'single.txt'])

  for out in first + second:
    assert 'Strategy multi_worker (CollectiveAllReduceStrategy) with 2 ' \
        'replicas' in out, out[-3000:]
  for out in second:
    assert f'Resumed from {workdir}/checkpoints/ckpt-4 at step 4' in out
  # SAM on both hosts took its perturbation from the norm of the gradient
  # summed over both: every worker logs the one-process norm, step by step,
  # and ends with the one-process weights.
  for out in first:
    _assert_same_norms(out, single, range(1, 5))
  for out in second:
    _assert_same_norms(out, single, range(5, 9))
  _assert_same_weights(workdir / 'checkpoints' / 'ckpt-4',
                       tmp_path / 'single' / 'checkpoints' / 'ckpt-4')
  _assert_same_weights(workdir / 'checkpoints' / 'ckpt-8',
                       tmp_path / 'single' / 'checkpoints' / 'ckpt-8')

  # Only the chief (worker 0) writes summaries, results.json, config.json,
  # checkpoints and takes the workdir lock; worker 1 leaves its own log and
  # nothing else.
  names = sorted(os.listdir(workdir))
  events = [n for n in names if n.startswith('events.out.tfevents')]
  worker_logs = [n for n in names if re.fullmatch(r'log-\d+\.txt', n)]
  assert len(events) == 2 and len(worker_logs) == 2, names
  assert set(names) == {'checkpoints', 'config.json', 'lock', 'log.txt',
                        'results.json', *events, *worker_logs}, names
  assert sorted(os.listdir(workdir / 'checkpoints')) == [
      'checkpoint', 'ckpt-4.data-00000-of-00001', 'ckpt-4.index',
      'ckpt-8.data-00000-of-00001', 'ckpt-8.index']
  with open(workdir / 'results.json') as f:
    results = json.load(f)
  with open(tmp_path / 'single' / 'results.json') as f:
    expected = json.load(f)
  assert results['step'] == 8
  for key in ('eval/accuracy', 'eval/loss', 'train/grad_norm'):
    np.testing.assert_allclose(results[key], expected[key], rtol=1e-4,
                               err_msg=key)
  assert 'Final test accuracy' in (workdir / 'log.txt').read_text()


def test_sigterm_to_one_worker_stops_both_and_they_resume(tmp_path):
  # Float rounding grows with the steps (2e-6 at step 60, chaos by step
  # 300 at this learning rate): keep the run short.
  flags = ['--config.num_train_steps=40', '--config.steps_per_loop=10',
           '--config.log_every_steps=10',
           '--config.checkpoint_every_steps=100000',
           '--config.eval_every_steps=100000']
  workdir = tmp_path / 'multi'
  logs = [tmp_path / f'worker{i}.txt' for i in range(2)]
  reference = _start(tmp_path / 'single', tmp_path / 'single.txt', *flags)
  workers = _start_workers(workdir, logs, *flags)
  deadline = time.monotonic() + 240
  while not all('Training from step 0' in log.read_text() for log in logs):
    if time.monotonic() > deadline or any(
        w.poll() is not None for w in workers):
      _finish(workers, logs, timeout=1)
      raise AssertionError('\n=====\n'.join(
          log.read_text()[-3000:] for log in logs))
    time.sleep(0.02)
  # The SIGTERM handler is installed right after that line; the first loop,
  # traced first, takes seconds, so the signal lands in the middle of it.
  time.sleep(0.2)
  # A preemption may reach the hosts at different moments; here only the
  # non-chief worker is told. Both must stop after the same loop, and the
  # chief must save it, or the other would wait in a collective forever.
  workers[1].send_signal(signal.SIGTERM)
  outputs = _finish(workers, logs)
  steps = {int(m) for out in outputs
           for m in re.findall(r'Stopped by (?:SIGTERM|a signal to another '
                               r'host) at step (\d+)', out)}
  assert len(steps) == 1, outputs[0][-3000:]
  (step,) = steps
  assert step in (10, 20, 30), outputs[0][-3000:]
  # The chief says why it stopped; the signalled worker names the signal.
  assert 'Stopped by a signal to another host' in outputs[0]
  assert 'Stopped by SIGTERM' in outputs[1]
  assert sorted(os.listdir(workdir / 'checkpoints')) == [
      'checkpoint', f'ckpt-{step}.data-00000-of-00001', f'ckpt-{step}.index']
  assert not (workdir / 'results.json').exists()

  logs = [tmp_path / f'worker{i}-restart.txt' for i in range(2)]
  outputs = _finish(_start_workers(workdir, logs, *flags), logs)
  for out in outputs:
    assert f'Resumed from {workdir}/checkpoints/ckpt-{step} at step' in out
  _finish([reference], [tmp_path / 'single.txt'])
  _assert_same_weights(workdir / 'checkpoints' / 'ckpt-40',
                       tmp_path / 'single' / 'checkpoints' / 'ckpt-40')


def test_two_workers_skip_overflowing_float16_steps_together(tmp_path):
  """Loss scaling under MultiWorkerMirrored: the hosts skip the same steps.

  A skip depends on whether some replica's float16 gradients overflowed, and
  each host's half batch overflows at another scale than the whole batch, so
  the reference here is the other host, not a one-process run.
  """
  workdir = tmp_path / 'multi'
  logs = [tmp_path / f'worker{i}.txt' for i in range(2)]
  outputs = _finish(_start_workers(
      workdir, logs, '--config.num_train_steps=6',
      '--config.log_every_steps=1', '--config.dtype_policy=mixed_float16',
      '--config.loss_scale.initial=1048576'), logs)
  pattern = re.compile(r'\[(\d+)\] .*train/loss_scale=([-+.e\d]+),.* '
                       r'train/skipped_steps=([.\d]+)')
  scales = [pattern.findall(out) for out in outputs]
  assert [int(s[0]) for s in scales[0]] == list(range(1, 7)), outputs[0]
  assert scales[0] == scales[1]
  skipped = [float(s[2]) for s in scales[0]]
  # The first steps overflow and halve the scale; then steps are applied.
  assert skipped[0] == 1 and 0 in skipped
  assert float(scales[0][-1][1]) < 1048576
  weights = _weights(workdir / 'checkpoints' / 'ckpt-6')
  assert all(np.isfinite(w).all() for w in weights.values())


def test_two_workers_looksam_matches_one_process(tmp_path):
  """SAM every 2nd step, LookSAM in between, on two hosts."""
  flags = ['--config.num_train_steps=4', '--config.checkpoint_every_steps=4',
           '--config.sam.every_k_steps=2', '--config.sam.looksam_alpha=0.7']
  workdir = tmp_path / 'multi'
  logs = [tmp_path / f'worker{i}.txt' for i in range(2)]
  reference = _start(tmp_path / 'single', tmp_path / 'single.txt', *flags)
  _finish(_start_workers(workdir, logs, *flags), logs)
  _finish([reference], [tmp_path / 'single.txt'])
  _assert_same_weights(workdir / 'checkpoints' / 'ckpt-4',
                       tmp_path / 'single' / 'checkpoints' / 'ckpt-4')


def test_two_workers_stream_a_tfds_data_set_and_resume_mid_epoch(tmp_path):
  """Each host streams its half of the TFDS files (tests/streaming_test.py
  checks the halves and the evaluation split): stopped at step 6, mid-epoch,
  and resumed to 10, the two hosts end with the weights of 10 steps in one
  go."""
  from tests import streaming_test  # pylint: disable=g-import-not-at-top
  data_dir = tmp_path / 'tfds'
  streaming_test.prepare_tiny_images(str(data_dir))
  flags = ['--config.dataset.name=tfds:tiny_images',
           f'--config.dataset.data_dir={data_dir}',
           '--config.dataset.image_size=8',
           '--config.dataset.augment=inception_crop',
           '--config.dataset.shuffle_buffer=16', '--config.batch_size=8',
           '--config.checkpoint_every_steps=3']
  whole_logs = [tmp_path / f'whole{i}.txt' for i in range(2)]
  part_logs = [tmp_path / f'part{i}.txt' for i in range(2)]
  whole = _start_workers(tmp_path / 'whole', whole_logs, *flags,
                         '--config.num_train_steps=10')
  parts = _start_workers(tmp_path / 'parts', part_logs, *flags,
                         '--config.num_train_steps=6')
  _finish(parts, part_logs)
  _finish(whole, whole_logs)
  logs = [tmp_path / f'restart{i}.txt' for i in range(2)]
  outputs = _finish(_start_workers(tmp_path / 'parts', logs, *flags,
                                   '--config.num_train_steps=10'), logs)
  for out in outputs:
    assert f'Resumed from {tmp_path}/parts/checkpoints/ckpt-6 at step 6' in (
        out), out[-3000:]
  _assert_same_weights(tmp_path / 'whole' / 'checkpoints' / 'ckpt-10',
                       tmp_path / 'parts' / 'checkpoints' / 'ckpt-10')
