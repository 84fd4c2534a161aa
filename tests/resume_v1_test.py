"""A workdir written by the code of 2026-11-25 (commit 5ea4db7) still resumes.

tests/fixtures/workdir_v1 was written by that code with

  python main.py --config=configs/default.py --workdir=W $FLAGS

(FLAGS below: 8 steps, a checkpoint at steps 4 and 8, EMA and LookSAM on, so
that every kind of state is in the checkpoint); the fixture keeps step 4 only,
and workdir_v1_step8_weights.npz holds the model weights that run had at
step 8. Resumed with today's code, the run must end with those weights.
"""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from sam import models

pytestmark = pytest.mark.slow  # Not in the fast subset (pytest.ini).

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, 'tests', 'fixtures')
FLAGS = [
    '--config.dataset.name=synthetic', '--config.dataset.augment=basic',
    '--config.dataset.synthetic_image_shape=(8, 8, 3)',
    '--config.dataset.synthetic_train_size=64',
    '--config.dataset.synthetic_test_size=32', '--config.model.name=cnn',
    '--config.batch_size=16', '--config.eval_batch_size=16',
    '--config.num_train_steps=8', '--config.steps_per_loop=2',
    '--config.checkpoint_every_steps=4', '--config.ema_decay=0.9',
    '--config.sam.every_k_steps=2', '--config.sam.looksam_alpha=0.7',
]


def test_v1_workdir_resumes_to_the_same_weights(tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(os.path.join(FIXTURES, 'workdir_v1'), workdir)
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', JAX_PLATFORMS='cpu')
  run = subprocess.run(
      [sys.executable, 'main.py', '--config=configs/default.py',
       f'--workdir={workdir}', *FLAGS],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  assert 'Resumed from' in run.stderr and 'at step 4' in run.stderr
  model = models.get_model('cnn', 10, (8, 8, 3))
  latest = tf.train.latest_checkpoint(str(workdir / 'checkpoints'))
  assert latest.endswith('ckpt-8')
  tf.train.Checkpoint(model=model).read(latest).expect_partial()
  want = np.load(os.path.join(FIXTURES, 'workdir_v1_step8_weights.npz'))
  assert len(want.files) == len(model.weights)
  for i, weight in enumerate(model.weights):
    np.testing.assert_allclose(weight.numpy(), want[f'arr_{i}'], rtol=1e-4,
                               atol=1e-6, err_msg=weight.path)
