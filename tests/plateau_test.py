"""ReduceLROnPlateau and early stopping in the custom loop."""

import numpy as np
import pytest
import tensorflow as tf

from sam import config_checks
from sam import plateau
from sam import train
from tests.conftest import tiny_config


def _plateau(**overrides):
  config = tiny_config(**{'schedule.name': 'plateau',
                          'dataset.validation_size': 16, **overrides})
  return plateau.Plateau(config, tf.Variable(plateau.initial_state()))


def test_reduces_after_patience_like_keras():
  p = _plateau(**{'plateau.patience': 2})
  scales = []
  for loss in (1.0, 0.9, 0.95, 0.95, 0.91, 0.92, 0.8):
    p.update({'val/loss': loss})
    scales.append(float(p.state.numpy()[0]))
  # Waits of 1, 2 (reduce, wait resets), 1, 2 (reduce), then an improvement.
  assert scales == [1, 1, 1, 0.5, 0.5, 0.25, 0.25]


def test_early_stopping_counts_from_the_best_and_watches_accuracy():
  p = _plateau(**{'schedule.name': 'constant', 'plateau.monitor':
                  'val/accuracy', 'plateau.early_stopping_patience': 3})
  for accuracy in (0.5, 0.6, 0.55, 0.6):  # An equal value is no improvement.
    assert p.update({'val/accuracy': accuracy}) is None
    assert not p.stopped
  assert 'early stopping' in p.update({'val/accuracy': 0.59})
  assert p.stopped
  assert p.state.numpy()[0] == 1.0  # The constant schedule is not scaled.


def test_plateau_needs_a_validation_split():
  with pytest.raises(ValueError, match='dataset.validation_size'):
    config_checks.validate_config(
        tiny_config(**{'schedule.name': 'plateau'}), 1)


def test_early_stopping_ends_training_and_resumes_stopped(tmp_path):
  # A learning rate of ~0 leaves the validation loss flat: no improvement.
  config = tiny_config(**{
      'num_train_steps': 40, 'eval_every_steps': 2,
      'dataset.validation_size': 16, 'schedule.learning_rate': 1e-30,
      'plateau.early_stopping_patience': 2, 'log_every_steps': 2})
  results = train.train_and_evaluate(config, str(tmp_path))
  assert results['early_stopped']
  assert results['step'] == 6  # Evaluations at 2 (best), 4, 6: stop.
  assert tf.train.latest_checkpoint(str(tmp_path / 'checkpoints')).endswith(
      '-6')
  again = train.train_and_evaluate(config, str(tmp_path))
  assert again['step'] == 6 and again['early_stopped']


def test_plateau_scales_the_learning_rate_in_the_step(tmp_path):
  config = tiny_config(**{
      'num_train_steps': 8, 'eval_every_steps': 2, 'log_every_steps': 2,
      'schedule.name': 'plateau', 'dataset.validation_size': 16,
      'schedule.learning_rate': 1e-30, 'plateau.patience': 1})
  results = train.train_and_evaluate(config, str(tmp_path))
  # Evaluations at 2 (best), 4, 6, 8 halve the rate three times; the rate
  # logged at step 8 was used before the last halving.
  np.testing.assert_allclose(results['train/learning_rate'], 1e-30 / 4,
                             rtol=1e-5)
