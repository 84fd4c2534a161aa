"""Dynamic loss scaling for mixed_float16, inside the replica step.

Both SAM passes differentiate the loss times `state.loss_scale` and unscale
their gradients before the norm (`sam.sam.sam_step(loss_scale=...)`). A step
whose gradients overflow on any replica changes no weight, slot or batch-norm
statistic, halves the scale and still counts as a step; after
config.loss_scale.growth_steps finite steps in a row the scale doubles (the
scheme of Keras' LossScaleOptimizer, whose finiteness test looks at one
replica's unreduced gradients and whose skipped steps do not count).
"""

import ml_collections
import tensorflow as tf

from sam.state import TrainState


def scale(state: TrainState) -> tf.Tensor | None:
  """The loss scale for this step, or None without loss scaling."""
  return state.loss_scale.read_value() if state.loss_scaling else None


def all_finite(state: TrainState, tensors) -> tf.Tensor | None:
  """With loss scaling, whether `tensors` are finite on every replica."""
  if not state.loss_scaling:
    return None
  bad = tf.add_n([tf.reduce_sum(tf.cast(~tf.math.is_finite(t), tf.float32))
                  for t in tensors])
  ctx = tf.distribute.get_replica_context()
  if ctx.num_replicas_in_sync > 1:
    bad = ctx.all_reduce(tf.distribute.ReduceOp.SUM, bad)
  return tf.equal(bad, 0.0)


def apply_gradients(state: TrainState, config: ml_collections.ConfigDict,
                    grads, finite: tf.Tensor | None) -> None:
  """The optimizer update; with loss scaling, only where `finite`.

  Args:
    state: the run's state.
    config: the run's config (loss_scale.growth_steps).
    grads: this replica's gradients (Keras optimizers sum them across
      replicas themselves).
    finite: `all_finite` of the step, the same on every replica; None
      without loss scaling.
  """
  variables = state.model.trainable_variables
  optimizer = state.optimizer
  if finite is None:
    optimizer.apply_gradients(zip(grads, variables))
    return
  growth_steps = config.loss_scale.growth_steps

  def update(grads):
    optimizer.apply_gradients(zip(grads, variables))

  def grow():
    grown = tf.equal(state.good_steps + 1, growth_steps)
    state.loss_scale.assign(tf.where(grown, 2.0, 1.0) * state.loss_scale)
    state.good_steps.assign(tf.where(grown, tf.constant(0, tf.int64),
                                     state.good_steps + 1))

  def skip():
    optimizer.iterations.assign_add(1)
    state.loss_scale.assign(state.loss_scale / 2)
    state.good_steps.assign(0)

  if tf.__internal__.distribute.strategy_supports_no_merge_call():
    tf.cond(finite, lambda: (update(grads), grow())[-1], skip)
    return

  # Strategies whose optimizer update goes through merge_call
  # (MirroredStrategy) cannot call it inside a tf.cond of the replica step:
  # decide in cross-replica context, as Keras' LossScaleOptimizer does.
  def cross_replica(strategy, grads, finite):
    finite = strategy.experimental_local_results(finite)[0]

    def apply_and_grow():
      strategy.extended.call_for_each_replica(update, args=(grads,))
      grow()

    tf.cond(finite, apply_and_grow, skip)

  tf.distribute.get_replica_context().merge_call(cross_replica,
                                                 args=(grads, finite))
