"""Sharpness during training: a probe on a fixed set of training examples.

Every `config.probe.every_steps` the host loop measures, on the same
`config.probe.num_batches` batches of `config.probe.batch_size` training
examples each time (the first ones of the run's epoch-0 order, without
augmentation, with the run's labels: `sam.sharpness.analysis_dataset`):

* probe/hessian_eigenvalue: the top eigenvalue of the Hessian of the mean
  data loss (cross-entropy, no weight decay, batch norm on its moving
  statistics), by power iteration (`sam.hessian.top_hessian_eigenvalue`);
* probe/m_sharpness: L(w + eps) - L(w) with SAM's eps of radius
  `config.probe.rho` per batch (m = probe.batch_size), and probe/loss, L(w)
  (`sam.sharpness.m_sharpness`);
* probe/stability_threshold, for SGD with heavy-ball momentum beta at
  learning rate eta: (2 + 2 beta) / eta, the sharpness above which gradient
  descent on a quadratic diverges, which full-batch training reaches and
  hovers at ("edge of stability": Cohen et al., "Gradient Descent on Neural
  Networks Typically Occurs at the Edge of Stability", ICLR 2021; 2 / eta
  without momentum). For Adam, Cohen et al. ("Adaptive Gradient Methods at
  the Edge of Stability", arXiv:2207.14484, 2022) write the step as
  w -= eta P^-1 m and find the preconditioned sharpness, the top eigenvalue
  of P^-1 H, at (2 + 2 beta_1) / ((1 - beta_1) eta), 38 / eta at
  beta_1 = 0.9: logged as probe/preconditioned_eigenvalue and that
  threshold, with P the diagonal of Keras Adam's last step,
  (1 - beta_1^t) (sqrt(v) + epsilon) / sqrt(1 - beta_2^t) after t steps.
  Under Nesterov SGD no threshold is logged;
* probe/seconds: what the probe cost.

Off by default (every_steps = 0).
"""

import math
import time

import ml_collections
import tensorflow as tf

from sam import hessian
from sam import input_pipeline
from sam import sharpness
from sam.trainer import Trainer


def check_fits(config: ml_collections.ConfigDict,
               data: input_pipeline.Data) -> None:
  """One line if the probe set needs more training examples than there are."""
  pc = config.probe
  if pc.every_steps and pc.batch_size * pc.num_batches > len(data.train):
    raise ValueError(
        f'config.probe.num_batches={pc.num_batches} is invalid: '
        f'{pc.num_batches} batches of probe.batch_size={pc.batch_size} need '
        f'more than the {len(data.train)} training examples; use fewer.')


class SharpnessProbe:
  """Measures the model of a run on its probe set (see the module doc)."""

  def __init__(self, config: ml_collections.ConfigDict,
               data: input_pipeline.Data, strategy: tf.distribute.Strategy,
               trainer: Trainer):
    self.config = config
    self.strategy = strategy
    self.trainer = trainer
    pc = config.probe
    self.dataset = strategy.distribute_datasets_from_function(
        lambda ctx: sharpness.analysis_dataset(
            data, config, 'train', pc.batch_size, pc.num_batches, ctx))

  def stability_threshold(self) -> float | None:
    """(2 + 2 beta) / eta of heavy-ball SGD now, or Adam's (2 + 2 beta_1) /
    ((1 - beta_1) eta); None for Nesterov SGD."""
    oc = self.config.optimizer
    state = self.trainer.state
    learning_rate = float(state.schedule(max(state.step - 1, 0)))
    if not learning_rate or (oc.name == 'sgd' and oc.nesterov):
      return None
    if oc.name == 'adam':
      return (2 + 2 * oc.beta1) / ((1 - oc.beta1) * learning_rate)
    return (2 + 2 * oc.momentum) / learning_rate

  def adam_preconditioner(self) -> list[tf.Tensor] | None:
    """P of Keras Adam's last step (see the module doc); None before one."""
    oc = self.config.optimizer
    optimizer = self.trainer.state.optimizer
    optimizer = getattr(optimizer, 'inner_optimizer', optimizer)
    t = int(optimizer.iterations.numpy())
    if oc.name != 'adam' or not t:
      return None
    correction = math.sqrt(1 - oc.beta2**t)
    return [(1 - oc.beta1**t) * (tf.sqrt(optimizer._velocities[  # pylint: disable=protected-access
        optimizer._get_variable_index(v)].value) + oc.epsilon) / correction  # pylint: disable=protected-access
            for v in self.trainer.state.model.trainable_variables]

  def __call__(self) -> dict[str, float]:
    pc = self.config.probe
    start = time.perf_counter()
    model = self.trainer.state.model
    top = hessian.top_hessian_eigenvalue(
        model, self.dataset, self.strategy,
        num_iterations=pc.hessian_iterations, seed=self.config.seed)
    rho = pc.rho or self.config.sam.rho or 0.05
    m = sharpness.m_sharpness(model, self.dataset, self.strategy, rho=rho)
    metrics = {'probe/hessian_eigenvalue': top['eigenvalue'],
               'probe/m_sharpness': m['sharpness'],
               'probe/loss': m['loss']}
    preconditioner = self.adam_preconditioner()
    if preconditioner is not None:
      metrics['probe/preconditioned_eigenvalue'] = (
          hessian.top_hessian_eigenvalue(
              model, self.dataset, self.strategy,
              num_iterations=pc.hessian_iterations, seed=self.config.seed,
              preconditioner=preconditioner)['eigenvalue'])
    threshold = self.stability_threshold()
    if threshold is not None:
      metrics['probe/stability_threshold'] = threshold
    metrics['probe/seconds'] = time.perf_counter() - start
    return metrics
