"""ReduceLROnPlateau and EarlyStopping for the custom loop, checkpointed.

The original TF 2 SAM notebook trained with Keras' `ReduceLROnPlateau`
(factor 0.5, patience 3) and `EarlyStopping` (patience 10). Here they watch a
metric of the validation split (never the test set) after each evaluation,
and keep their state in a variable of the checkpoint, so that a resumed run
reduces and stops exactly where an uninterrupted one would.
"""

import ml_collections
import numpy as np
import tensorflow as tf

MONITORS = ('val/loss', 'val/accuracy')
# Layout of the state variable (all finite: checkpoints hold no NaN).
_SCALE, _BEST, _PLATEAU_WAIT, _STOP_WAIT, _STOPPED, _EVALUATIONS = range(6)


def initial_state() -> np.ndarray:
  """Learning-rate scale 1, no evaluation seen, nothing waited, not stopped."""
  return np.array([1.0, 0.0, 0.0, 0.0, 0.0, 0.0], np.float32)


class Plateau:
  """Host-side logic over a variable [scale, best, waits, stopped, count]."""

  def __init__(self, config: ml_collections.ConfigDict, state: tf.Variable):
    self.config = config.plateau
    self.reduce = config.schedule.name == 'plateau'
    self.state = state

  @property
  def active(self) -> bool:
    return self.reduce or self.config.early_stopping_patience > 0

  @property
  def stopped(self) -> bool:
    return bool(self.state.numpy()[_STOPPED])

  def update(self, metrics: dict[str, float]) -> str | None:
    """Takes one evaluation's metrics; says what it did, if anything."""
    if not self.active or self.config.monitor not in metrics:
      return None
    c = self.config
    value = metrics[c.monitor]
    scale, best, plateau_wait, stop_wait, stopped, evaluations = (
        self.state.numpy())
    sign = -1.0 if c.monitor.endswith('accuracy') else 1.0
    if not evaluations or sign * value < sign * best:
      best, plateau_wait, stop_wait = value, 0.0, 0.0
    else:
      plateau_wait += 1
      stop_wait += 1
    note = None
    if self.reduce and plateau_wait >= c.patience:
      scale = max(scale * c.factor, c.min_scale)
      plateau_wait = 0.0
      note = f'{c.monitor} has not improved: learning rate x{scale:g}'
    if c.early_stopping_patience and stop_wait >= c.early_stopping_patience:
      stopped = 1.0
      note = (f'{c.monitor} has not improved for {int(stop_wait)} '
              'evaluations: early stopping')
    self.state.assign(
        [scale, best, plateau_wait, stop_wait, stopped, evaluations + 1])
    return note
