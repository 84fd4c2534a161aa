"""The learning-rate schedule and the base optimizer of a run."""

import math
from typing import Any

import keras
import ml_collections
import tensorflow as tf


class Schedule(keras.optimizers.schedules.LearningRateSchedule):
  """Linear warm-up to the peak, then constant, step, cosine or linear decay.

  'linear' falls from the peak to `linear_end` times the peak at the last
  step (big_vision's linear decay and its `linear_end`). With `scale` (a
  variable of the plateau logic), the rate is also multiplied by it:
  'plateau' is a constant rate that `sam.plateau` scales down.
  """

  def __init__(self, name: str, learning_rate: float, warmup_steps: int,
               total_steps: int, boundaries: tuple[int, ...] = (),
               decay_factor: float = 1.0, linear_end: float = 0.0,
               scale: tf.Variable | None = None):
    self.name = name
    self.scale = scale
    self.learning_rate = learning_rate
    self.warmup_steps = warmup_steps
    self.total_steps = total_steps
    self.boundaries = tuple(boundaries)
    self.decay_factor = decay_factor
    self.linear_end = linear_end

  def __call__(self, step):
    step = tf.cast(step, tf.float32)
    lr = tf.constant(self.learning_rate, tf.float32)
    if self.warmup_steps:
      # Step 0 already gets a nonzero rate, so no step is wasted.
      lr *= tf.minimum(1.0, (step + 1) / self.warmup_steps)
    # The fraction of the decay done: 0 until the warm-up ends, 1 at the end.
    progress = tf.clip_by_value((step - self.warmup_steps) / max(
        1, self.total_steps - self.warmup_steps), 0, 1)
    if self.name == 'cosine':
      lr *= 0.5 * (1 + tf.cos(math.pi * progress))
    elif self.name == 'linear':
      lr *= 1 - (1 - self.linear_end) * progress
    elif self.name == 'step' and self.boundaries:
      passed = tf.reduce_sum(
          tf.cast(step >= tf.constant(self.boundaries, tf.float32), tf.float32))
      lr *= self.decay_factor**passed
    if self.scale is not None:
      lr *= self.scale[0]
    return lr

  @classmethod
  def from_run(cls, config: ml_collections.ConfigDict, steps_per_epoch: int,
               total_steps: int, scale: tf.Variable | None = None):
    """The schedule of config.schedule, its epochs counted in steps."""
    sc = config.schedule
    return cls(sc.name, sc.learning_rate,
               warmup_steps=round(sc.warmup_epochs * steps_per_epoch),
               total_steps=total_steps,
               boundaries=tuple(round(e * steps_per_epoch)
                                for e in sc.decay_epochs),
               decay_factor=sc.decay_factor, linear_end=sc.linear_end,
               scale=scale)

  def final_rate(self) -> float:
    """The rate the schedule decays to (before any plateau scaling)."""
    if self.name == 'cosine':
      return 0.0
    if self.name == 'linear':
      return self.learning_rate * self.linear_end
    if self.name == 'step':
      return self.learning_rate * self.decay_factor**len(self.boundaries)
    return self.learning_rate

  def get_config(self) -> dict[str, Any]:
    return dict(name=self.name, learning_rate=self.learning_rate,
                warmup_steps=self.warmup_steps, total_steps=self.total_steps,
                boundaries=self.boundaries, decay_factor=self.decay_factor,
                linear_end=self.linear_end)


def sam_rho(config: ml_collections.ConfigDict, schedule: Schedule, step):
  """SAM's rho at `step` (a tensor), or the constant config.sam.rho.

  sam.rho_schedule='learning_rate' follows the learning rate lr from
  sam.rho (at the peak rate lr_max) to sam.rho_min (at the rate the schedule
  decays to, lr_min), as GSAM (Zhuang et al., ICLR 2022, and
  big_vision's gsam_gradient): rho_min + (rho - rho_min) (lr - lr_min) /
  (lr_max - lr_min); during warm-up it rises with the rate, never below
  rho_min (big_vision's does not clamp: a warm-up below lr_min would take it
  there).
  """
  sc = config.sam
  if sc.rho_schedule == 'constant' or not sc.rho:
    return sc.rho
  lr_max, lr_min = schedule.learning_rate, schedule.final_rate()
  if lr_max == lr_min:  # A step schedule that does not decay.
    return sc.rho
  fraction = tf.maximum(0.0, (schedule(step) - lr_min) / (lr_max - lr_min))
  return sc.rho_min + (sc.rho - sc.rho_min) * fraction


def create_optimizer(config: ml_collections.ConfigDict,
                     schedule: Schedule) -> keras.optimizers.Optimizer:
  """The base optimizer; decoupled weight decay is applied by it."""
  oc = config.optimizer
  decoupled = oc.weight_decay if oc.weight_decay_type == 'decoupled' else None
  if oc.name == 'sgd':
    return keras.optimizers.SGD(schedule, momentum=oc.momentum,
                                nesterov=oc.nesterov, weight_decay=decoupled)
  return keras.optimizers.Adam(schedule, beta_1=oc.beta1, beta_2=oc.beta2,
                               epsilon=oc.epsilon, weight_decay=decoupled)



def decayed(variables, all_params: bool) -> list[bool]:
  # By default weight decay applies to kernels only, not to biases or
  # batch-norm scales and offsets (as in the SAM paper's code: params with
  # ndim > 1); config.optimizer.decay_all_params decays everything.
  return [all_params or len(v.shape) > 1 for v in variables]

