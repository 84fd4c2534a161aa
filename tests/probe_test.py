"""sam.probe: sharpness measured during training, on a fixed probe set."""

import os

import numpy as np
import pytest
import tensorflow as tf

from sam import hessian
from sam import input_pipeline
from sam import sharpness
from sam import train
from sam import workdir as workdir_lib
from sam.trainer import Trainer
from tests.conftest import tiny_config

PROBE = {'probe.every_steps': 2, 'probe.batch_size': 16,
         'probe.num_batches': 2, 'probe.hessian_iterations': 5,
         'sam.rho': 0.1}


def _scalars(workdir):
  """{tag: {step: value}} of the probe/* summaries in workdir."""
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  acc = event_accumulator.EventAccumulator(workdir)
  acc.Reload()
  return {tag: {e.step: float(tf.make_ndarray(e.tensor_proto))
                for e in acc.Tensors(tag)}
          for tag in acc.Tags()['tensors'] if tag.startswith('probe/')}


def _measured_again(config, workdir, strategy):
  """The probe's figures, computed directly on the last checkpoint."""
  data = input_pipeline.load(config)
  trainer = Trainer(config, strategy, data.num_classes, data.image_shape,
                    input_pipeline.steps_per_epoch(data, config.batch_size),
                    config.num_train_steps)
  assert workdir_lib.restore(trainer.state.checkpoint,
                             os.path.join(workdir, 'checkpoints'))
  dataset = strategy.distribute_datasets_from_function(
      lambda ctx: sharpness.analysis_dataset(data, config, 'train', 16, 2,
                                             ctx))
  model = trainer.state.model
  return (hessian.top_hessian_eigenvalue(model, dataset, strategy,
                                           num_iterations=5, seed=0),
          sharpness.m_sharpness(model, dataset, strategy, rho=0.1))


@pytest.mark.slow  # Whole runs; the measures: sharpness_test.py (fast).
@pytest.mark.parametrize('num_replicas', [1, 2])
def test_probe_logs_sharpness_during_training(tmp_path, mirrored,
                                              num_replicas):
  config = tiny_config(**PROBE)
  strategy = mirrored(num_replicas)
  train.train_and_evaluate(config, str(tmp_path), strategy)
  logged = _scalars(str(tmp_path))
  assert set(logged) == {'probe/hessian_eigenvalue', 'probe/m_sharpness',
                         'probe/loss', 'probe/stability_threshold',
                         'probe/seconds'}
  for values in logged.values():
    assert sorted(values) == [2, 4]
  # SGD, momentum 0.9, learning rate 0.05: (2 + 2 * 0.9) / 0.05.
  assert logged['probe/stability_threshold'][4] == pytest.approx(76.0)
  top, m = _measured_again(config, str(tmp_path), strategy)
  assert logged['probe/hessian_eigenvalue'][4] == pytest.approx(
      top['eigenvalue'], rel=1e-4)
  assert logged['probe/m_sharpness'][4] == pytest.approx(m['sharpness'],
                                                         rel=1e-4, abs=1e-7)
  assert logged['probe/loss'][4] == pytest.approx(m['loss'], rel=1e-5)
  # The weights moved between the probes, the probe set did not.
  assert logged['probe/loss'][2] != logged['probe/loss'][4]


def test_probe_is_off_by_default(tmp_path):
  train.train_and_evaluate(tiny_config(), str(tmp_path))
  assert not _scalars(str(tmp_path))


@pytest.mark.slow
def test_probe_under_adam_logs_the_preconditioned_sharpness(tmp_path):
  """Cohen et al. 2022: lambda_1(P^-1 H) against (2 + 2 beta_1) /
  ((1 - beta_1) eta); P from Adam's second moments, recomputed here."""
  config = tiny_config(**PROBE, **{'optimizer.name': 'adam',
                                   'schedule.learning_rate': 1e-3})
  strategy = tf.distribute.get_strategy()
  train.train_and_evaluate(config, str(tmp_path), strategy)
  logged = _scalars(str(tmp_path))
  assert logged['probe/stability_threshold'][4] == pytest.approx(38_000)
  # The same measure again on the restored run: P from Keras Adam's update,
  # w -= lr sqrt(1 - b2^t) / (1 - b1^t) m / (sqrt(v) + eps), as eta P^-1 m.
  data = input_pipeline.load(config)
  trainer = Trainer(config, strategy, data.num_classes, data.image_shape,
                    input_pipeline.steps_per_epoch(data, config.batch_size),
                    config.num_train_steps)
  assert workdir_lib.restore(trainer.state.checkpoint,
                             os.path.join(str(tmp_path), 'checkpoints'))
  optimizer = trainer.state.optimizer
  t = 4
  assert int(optimizer.iterations.numpy()) == t
  b1, b2, eps = 0.9, 0.999, config.optimizer.epsilon
  p = [(1 - b1**t) * (np.sqrt(v.numpy()) + eps) / np.sqrt(1 - b2**t)
       for v in optimizer._velocities]  # pylint: disable=protected-access
  dataset = strategy.distribute_datasets_from_function(
      lambda ctx: sharpness.analysis_dataset(data, config, 'train', 16, 2,
                                             ctx))
  want = hessian.top_hessian_eigenvalue(
      trainer.state.model, dataset, strategy, num_iterations=5, seed=0,
      preconditioner=[tf.constant(x) for x in p])
  assert logged['probe/preconditioned_eigenvalue'][4] == pytest.approx(
      want['eigenvalue'], rel=1e-4)
  # Adam's small second moments make P^-1 H far larger than H.
  assert (logged['probe/preconditioned_eigenvalue'][4] >
          10 * logged['probe/hessian_eigenvalue'][4])


@pytest.mark.parametrize('field,value,message', [
    ('probe.every_steps', -2, 'config.probe.every_steps=-2'),
    ('probe.batch_size', 3, 'config.probe.batch_size=3'),
    ('probe.num_batches', 5, 'config.probe.num_batches=5 is invalid: 5 '
     'batches of probe.batch_size=16 need more than the 64 training'),
])
def test_bad_probe_fails_before_training(tmp_path, mirrored, field, value,
                                         message):
  config = tiny_config(**{**PROBE, field: value})
  with pytest.raises(ValueError, match=message.replace('.', r'\.')):
    train.train_and_evaluate(config, str(tmp_path), mirrored(2))
  assert not os.path.exists(tmp_path / 'checkpoints')
