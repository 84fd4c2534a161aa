"""train_and_evaluate: the host loop around a compiled multi-step SAM step.

One call of the compiled `train_loop` runs up to `config.steps_per_loop`
steps (`for _ in tf.range(n): strategy.run(train_step, ...)`). Between calls,
on the host: metrics are read, summaries written, progress reported, the
model evaluated and checkpointed at their intervals, and a non-finite loss
stops the run before anything is saved. A loop ends early at the next
interval, so intervals need not be multiples of `steps_per_loop`; `n` is a
tensor, so a shorter loop does not retrace.

Resuming: the latest checkpoint in `workdir/checkpoints` holds the model, the
optimizer (whose `iterations` is the step) and the metric accumulators; the
data stream restarts at that step (see `input_pipeline`). A resumed run thus
continues exactly where an uninterrupted one would be.
"""

import functools
import json
import math
import os
import signal
import tempfile
import threading
import time
from typing import Any

from absl import logging
from clu import metric_writers
from clu import periodic_actions
import keras
import ml_collections
import numpy as np
import tensorflow as tf

from sam import distribute
from sam import input_pipeline
from sam import models
from sam import plateau
from sam import sam as sam_lib

OPTIMIZERS = ('sgd', 'adam')
SCHEDULES = ('constant', 'step', 'cosine', 'plateau')
WEIGHT_DECAY_TYPES = ('l2', 'decoupled')
# Keras dtype policies of the model; mixed_float16 turns on loss scaling.
DTYPE_POLICIES = ('float32', 'mixed_bfloat16', 'mixed_float16')

# Train metric accumulator layout: sums over steps (see `_train_step`).
_TRAIN_FIELDS = ('loss', 'perturbed_loss', 'grad_norm', 'correct', 'examples',
                 'steps', 'skipped')
_EVAL_FIELDS = ('loss', 'correct', 'top5', 'examples')
# Top-5 accuracy is reported from this many classes on (CIFAR-100).
_TOP5_FROM_CLASSES = 100


def validate_config(config: ml_collections.ConfigDict,
                    num_replicas: int) -> None:
  """Checks the config before any data is loaded or model built.

  Raises:
    ValueError: naming the offending field, its value and what is allowed.
  """
  def check(ok, field, value, allowed):
    if not ok:
      raise ValueError(f'config.{field}={value!r} is invalid: {allowed}.')

  def one_of(field, value, options):
    check(value in options, field, value, f'use one of {tuple(options)}')

  one_of('dataset.name', config.dataset.name, input_pipeline.DATASETS)
  one_of('dataset.augment', config.dataset.augment,
         input_pipeline.AUGMENTATIONS)
  one_of('model.name', config.model.name, models.MODELS)
  one_of('optimizer.name', config.optimizer.name, OPTIMIZERS)
  one_of('optimizer.weight_decay_type', config.optimizer.weight_decay_type,
         WEIGHT_DECAY_TYPES)
  one_of('schedule.name', config.schedule.name, SCHEDULES)
  one_of('strategy', config.strategy, distribute.STRATEGIES)
  one_of('jit_compile', config.jit_compile, ('auto', 'true', 'false'))
  one_of('dtype_policy', config.dtype_policy, DTYPE_POLICIES)
  for field in ('sam.rho', 'sam.eta', 'sam.gsam_alpha',
                'optimizer.weight_decay',
                'optimizer.grad_clip_norm', 'schedule.warmup_epochs'):
    value = config[field.split('.')[0]][field.split('.')[1]]
    check(value >= 0, field, value, 'it must be >= 0')
  sc = config.sam
  check(sc.every_k_steps >= 1, 'sam.every_k_steps', sc.every_k_steps,
        'it must be >= 1 (1 runs SAM at every step)')
  check(sc.looksam_alpha >= 0, 'sam.looksam_alpha', sc.looksam_alpha,
        'it must be >= 0 (0 takes plain steps between SAM steps)')
  check(not sc.looksam_alpha or sc.every_k_steps > 1, 'sam.looksam_alpha',
        sc.looksam_alpha, 'LookSAM reuses a direction between SAM steps: '
        'also set sam.every_k_steps > 1 (they use 5)')
  per_replica = config.batch_size // max(num_replicas, 1)
  check(sc.micro_batch_size == 0 or (
      sc.micro_batch_size > 0 and per_replica % sc.micro_batch_size == 0),
        'sam.micro_batch_size', sc.micro_batch_size,
        f'use 0 (off) or a divisor of the per-replica batch {per_replica}')
  check(config.loss_scale.initial > 0, 'loss_scale.initial',
        config.loss_scale.initial, 'it must be > 0 (2**15 is usual)')
  check(config.loss_scale.growth_steps >= 1, 'loss_scale.growth_steps',
        config.loss_scale.growth_steps, 'it must be >= 1')
  check(0 <= config.ema_decay < 1, 'ema_decay', config.ema_decay,
        'it must be in [0, 1); 0 turns the moving average off')
  pc = config.plateau
  one_of('plateau.monitor', pc.monitor, plateau.MONITORS)
  if config.schedule.name == 'plateau' or pc.early_stopping_patience:
    check(config.dataset.validation_size > 0, 'dataset.validation_size',
          config.dataset.validation_size,
          f'schedule.name=plateau and early stopping watch {pc.monitor}, '
          'so hold out a validation split (> 0)')
  check(0 < pc.factor < 1, 'plateau.factor', pc.factor, 'it must be in (0, 1)')
  check(config.schedule.learning_rate > 0, 'schedule.learning_rate',
        config.schedule.learning_rate, 'it must be > 0')
  check(0 <= config.optimizer.label_smoothing < 1, 'optimizer.label_smoothing',
        config.optimizer.label_smoothing, 'it must be in [0, 1)')
  for field in ('batch_size', 'eval_batch_size'):
    value = config[field]
    check(value > 0 and value % num_replicas == 0, field, value,
          f'it must be a positive multiple of the {num_replicas} replicas')
  check(config.steps_per_loop >= 1, 'steps_per_loop', config.steps_per_loop,
        'it must be >= 1')
  check(config.num_train_steps > 0 or config.num_epochs > 0,
        'num_train_steps', config.num_train_steps,
        'set it > 0, or -1 with config.num_epochs > 0')
  for field in ('log_every_steps', 'eval_every_steps',
                'checkpoint_every_steps'):
    check(config[field] == -1 or config[field] >= 1, field, config[field],
          'it must be >= 1, or -1 for once per epoch')
  check(0 <= config.dataset.label_noise < 1, 'dataset.label_noise',
        config.dataset.label_noise, 'it must be in [0, 1)')
  check(config.dataset.validation_size >= 0, 'dataset.validation_size',
        config.dataset.validation_size, 'it must be >= 0')
  check(config.dataset.cutout_size >= 1, 'dataset.cutout_size',
        config.dataset.cutout_size, 'it must be >= 1')
  check(config.dataset.train_subset == -1 or
        config.dataset.train_subset >= config.batch_size,
        'dataset.train_subset', config.dataset.train_subset,
        'it must be -1 (all) or at least config.batch_size')


class Schedule(keras.optimizers.schedules.LearningRateSchedule):
  """Linear warm-up to the peak, then constant, step or cosine decay.

  With `scale` (a variable of the plateau logic), the rate is also multiplied
  by it: 'plateau' is a constant rate that `sam.plateau` scales down.
  """

  def __init__(self, name: str, learning_rate: float, warmup_steps: int,
               total_steps: int, boundaries: tuple[int, ...] = (),
               decay_factor: float = 1.0, scale: tf.Variable | None = None):
    self.name = name
    self.scale = scale
    self.learning_rate = learning_rate
    self.warmup_steps = warmup_steps
    self.total_steps = total_steps
    self.boundaries = tuple(boundaries)
    self.decay_factor = decay_factor

  def __call__(self, step):
    step = tf.cast(step, tf.float32)
    lr = tf.constant(self.learning_rate, tf.float32)
    if self.warmup_steps:
      # Step 0 already gets a nonzero rate, so no step is wasted.
      lr *= tf.minimum(1.0, (step + 1) / self.warmup_steps)
    if self.name == 'cosine':
      progress = (step - self.warmup_steps) / max(
          1, self.total_steps - self.warmup_steps)
      lr *= 0.5 * (1 + tf.cos(math.pi * tf.clip_by_value(progress, 0, 1)))
    elif self.name == 'step' and self.boundaries:
      passed = tf.reduce_sum(
          tf.cast(step >= tf.constant(self.boundaries, tf.float32), tf.float32))
      lr *= self.decay_factor**passed
    if self.scale is not None:
      lr *= self.scale[0]
    return lr

  def get_config(self) -> dict[str, Any]:
    return dict(name=self.name, learning_rate=self.learning_rate,
                warmup_steps=self.warmup_steps, total_steps=self.total_steps,
                boundaries=self.boundaries, decay_factor=self.decay_factor)


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


def use_xla(setting: str, strategy: tf.distribute.Strategy) -> bool:
  """Whether to compile the replica steps with XLA (config.jit_compile)."""
  if isinstance(strategy, tf.distribute.TPUStrategy):
    return False  # The TPU compiles the whole loop anyway.
  if setting == 'auto':
    # A cross-replica all-reduce inside a jit-compiled function fails under
    # MirroredStrategy (seen on CPU), so 'auto' only compiles one replica.
    return bool(tf.config.list_physical_devices('GPU')) and (
        strategy.num_replicas_in_sync == 1)
  return setting == 'true'


def _decayed(variables, all_params: bool) -> list[bool]:
  # By default weight decay applies to kernels only, not to biases or
  # batch-norm scales and offsets (as in the SAM paper's code: params with
  # ndim > 1); config.optimizer.decay_all_params decays everything.
  return [all_params or len(v.shape) > 1 for v in variables]


class Trainer:
  """The model, optimizer, metric state and compiled loops of one run."""

  def __init__(self, config: ml_collections.ConfigDict,
               strategy: tf.distribute.Strategy, num_classes: int,
               image_shape: tuple[int, int, int], steps_per_epoch: int,
               total_steps: int):
    self.config = config
    self.strategy = strategy
    oc = config.optimizer
    self.num_classes = num_classes
    self.l2 = oc.weight_decay if oc.weight_decay_type == 'l2' else 0.0
    keras.utils.set_random_seed(config.seed)
    with strategy.scope():
      # Read by the schedule inside the step, written on the host.
      self.plateau_state = tf.Variable(plateau.initial_state(),
                                       trainable=False)
      self.schedule = Schedule(
          config.schedule.name, config.schedule.learning_rate,
          warmup_steps=round(config.schedule.warmup_epochs * steps_per_epoch),
          total_steps=total_steps,
          boundaries=tuple(round(e * steps_per_epoch)
                           for e in config.schedule.decay_epochs),
          decay_factor=config.schedule.decay_factor,
          scale=self.plateau_state)
      # Layers take the global policy when they are built: float32
      # variables (the master weights, and so the SAM norm and the update in
      # float32) and, under mixed_bfloat16, bfloat16 compute.
      saved_policy = keras.config.dtype_policy()
      keras.config.set_dtype_policy(config.dtype_policy)
      try:
        self.model = models.get_model(config.model.name, num_classes,
                                      image_shape)
      finally:
        keras.config.set_dtype_policy(saved_policy)
      self.optimizer = create_optimizer(config, self.schedule)
      self.optimizer.build(self.model.trainable_variables)
      if oc.weight_decay_type == 'decoupled':
        self.optimizer.exclude_from_weight_decay(var_list=[
            v for v, d in zip(self.model.trainable_variables,
                              _decayed(self.model.trainable_variables,
                                       oc.decay_all_params))
            if not d])
      # Replica steps all-reduce their metrics before adding them, so the
      # first replica's value is everyone's.
      first = tf.VariableAggregation.ONLY_FIRST_REPLICA
      self.train_sums = tf.Variable(tf.zeros(len(_TRAIN_FIELDS)),
                                    trainable=False, aggregation=first)
      self.eval_sums = tf.Variable(tf.zeros(len(_EVAL_FIELDS)),
                                   trainable=False, aggregation=first)
      # Exponential moving averages of the weights and statistics, evaluated
      # as ema_eval/*. Every replica computes the same average.
      self.ema = [
          [tf.Variable(v.numpy(), trainable=False, aggregation=first)
           for v in variables] if config.ema_decay else []
          for variables in (self.model.trainable_variables,
                            self.model.non_trainable_variables)]
      # LookSAM's g_v from the last SAM step, the same on every replica.
      self.looksam_direction = [
          tf.Variable(tf.zeros_like(v), trainable=False, aggregation=first)
          for v in self.model.trainable_variables
      ] if config.sam.looksam_alpha else []
      # Dynamic loss scaling (mixed_float16): the scale, and the steps since
      # it last changed. Kept (and checkpointed) under any policy, so that a
      # run may resume under another one.
      self.loss_scaling = config.dtype_policy == 'mixed_float16'
      self.loss_scale = tf.Variable(float(config.loss_scale.initial),
                                    trainable=False, aggregation=first)
      self.good_steps = tf.Variable(0, dtype=tf.int64, trainable=False,
                                    aggregation=first)
    self.checkpoint = tf.train.Checkpoint(
        model=self.model, optimizer=self.optimizer, train_sums=self.train_sums,
        ema=self.ema, plateau=self.plateau_state,
        looksam_direction=self.looksam_direction,
        loss_scale=[self.loss_scale, self.good_steps])
    self.plateau = plateau.Plateau(config, self.plateau_state)
    self.jit_compile = use_xla(config.jit_compile, strategy)
    # Two compiled steps: SAM, and (with sam.every_k_steps > 1) the steps
    # in between.
    self._train_step_fn = {
        sam_now: tf.function(
            functools.partial(self._train_step, sam_now=sam_now),
            jit_compile=self.jit_compile)
        for sam_now in (True, False)}
    self._eval_step_fn = {
        ema: tf.function(functools.partial(self._eval_step, ema=ema),
                         jit_compile=self.jit_compile)
        for ema in (False, True)}
    self.train_loop = tf.function(self._train_loop)
    self.eval_loop = tf.function(self._eval_loop)
    self._count_flags = tf.function(self._count_flags_fn)

  @property
  def step(self) -> int:
    return int(self.optimizer.iterations.numpy())

  def _loss_fn(self, images, labels, state, l2_share):
    """A share of the global-batch loss, as a function of params.

    Args:
      images: this replica's (micro-)batch.
      labels: its labels.
      state: the non-trainable values (batch-norm statistics, seeds).
      l2_share: the fraction of the L2 term this (micro-)batch carries, so
        that the shares of all replicas and micro-batches sum to one.

    Returns:
      loss_fn(params) -> (loss, (logits, new_state)).
    """
    config = self.config
    decayed = _decayed(self.model.trainable_variables,
                       config.optimizer.decay_all_params)
    smoothing = config.optimizer.label_smoothing
    targets = tf.one_hot(labels, self.num_classes)
    targets = targets * (1 - smoothing) + smoothing / self.num_classes

    def loss_fn(params):
      logits, new_state = self.model.stateless_call(
          params, state, images, training=True)
      logits = tf.cast(logits, tf.float32)
      per_example = tf.nn.softmax_cross_entropy_with_logits(targets, logits)
      loss = tf.reduce_sum(per_example) / config.batch_size
      if self.l2:
        l2 = tf.add_n([tf.reduce_sum(tf.square(p))
                       for p, d in zip(params, decayed) if d])
        loss += 0.5 * self.l2 * l2 * l2_share
      return loss, (logits, new_state)

    return loss_fn

  def _train_step(self, batch, sam_now: bool):
    """One step in replica context; not sam_now: a step between SAM steps."""
    images, labels = batch
    config = self.config
    ctx = tf.distribute.get_replica_context()
    num_replicas = ctx.num_replicas_in_sync
    model = self.model
    out = self._gradients(images, labels, sam_now)
    logits, new_state = out.aux
    finite = self._all_finite([out.loss, out.grad_norm, *out.grads])
    if finite is not None:
      # A skipped step keeps the batch-norm statistics too.
      new_state = [tf.where(finite, new, old.value) for new, old in zip(
          new_state, model.non_trainable_variables)]
    if new_state:
      # Batch-norm moving statistics come from the first pass only. Replicas
      # saw different batches, so average them: the copies stay identical.
      # Integer state (the seeds of ShakeDrop and Shake-Shake) is the same
      # on every replica by construction, and a mean would not be an int.
      floats = [i for i, v in enumerate(new_state) if v.dtype.is_floating]
      if num_replicas > 1 and floats:
        means = ctx.all_reduce(tf.distribute.ReduceOp.MEAN,
                               [new_state[i] for i in floats])
        new_state = list(new_state)
        for i, mean in zip(floats, means):
          new_state[i] = mean
      for variable, value in zip(model.non_trainable_variables, new_state):
        variable.assign(value)
    grads = out.grads
    if config.optimizer.grad_clip_norm:
      # Clip by the norm of the summed gradient (what the optimizer applies),
      # not each replica's part of it.
      total = ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)
      norm = tf.linalg.global_norm(total)
      scale = tf.minimum(1.0, config.optimizer.grad_clip_norm / (norm + 1e-12))
      grads = [g * scale for g in grads]
    self._apply_gradients(grads, finite)
    if config.ema_decay:
      decay = config.ema_decay
      for averages, variables in zip(self.ema, (
          model.trainable_variables, model.non_trainable_variables)):
        for average, variable in zip(averages, variables):
          if tf.as_dtype(variable.dtype).is_floating:
            average.assign(decay * average + (1 - decay) * variable.value)
          else:  # Seeds are not averaged.
            average.assign(variable.value)
    correct = tf.reduce_sum(tf.cast(
        tf.equal(tf.argmax(logits, -1, output_type=labels.dtype), labels),
        tf.float32))
    count = tf.cast(tf.shape(labels)[0], tf.float32)
    skipped = 0.0 if finite is None else 1.0 - tf.cast(finite, tf.float32)
    local = tf.stack([out.loss, out.perturbed_loss,
                      out.grad_norm / num_replicas, correct, count,
                      1.0 / num_replicas, skipped / num_replicas])
    if finite is not None:
      # A skipped step's figures (its gradient norm overflowed) stay out of
      # the sums, but a non-finite loss does not: that is divergence, which
      # loss scaling cannot cure, and it must stop the run.
      keep = finite | ~tf.math.is_finite(out.loss)
      local = tf.where(
          keep | tf.equal(tf.range(len(_TRAIN_FIELDS)),
                          _TRAIN_FIELDS.index('skipped')), local, 0.0)
    self.train_sums.assign_add(
        ctx.all_reduce(tf.distribute.ReduceOp.SUM, local))

  def _all_finite(self, tensors) -> tf.Tensor | None:
    """With loss scaling, whether `tensors` are finite on every replica."""
    if not self.loss_scaling:
      return None
    bad = tf.add_n([tf.reduce_sum(tf.cast(~tf.math.is_finite(t), tf.float32))
                    for t in tensors])
    ctx = tf.distribute.get_replica_context()
    if ctx.num_replicas_in_sync > 1:
      bad = ctx.all_reduce(tf.distribute.ReduceOp.SUM, bad)
    return tf.equal(bad, 0.0)

  def _apply_gradients(self, grads, finite: tf.Tensor | None):
    """The optimizer update; with loss scaling, dynamic loss scaling.

    A step with non-finite gradients (on any replica) changes no weight or
    optimizer slot, halves the scale and still counts as a step; after
    loss_scale.growth_steps finite steps in a row, the scale doubles (the
    scheme of Keras' LossScaleOptimizer, whose finiteness test looks at one
    replica's unreduced gradients and whose skipped steps do not count).

    Args:
      grads: this replica's gradients (Keras optimizers sum them across
        replicas themselves).
      finite: `_all_finite` of the step, the same on every replica.
    """
    variables = self.model.trainable_variables
    if finite is None:
      self.optimizer.apply_gradients(zip(grads, variables))
      return
    growth_steps = self.config.loss_scale.growth_steps

    def update(grads):
      self.optimizer.apply_gradients(zip(grads, variables))

    def grow():
      grown = tf.equal(self.good_steps + 1, growth_steps)
      self.loss_scale.assign(tf.where(grown, 2.0, 1.0) * self.loss_scale)
      self.good_steps.assign(tf.where(grown, tf.constant(0, tf.int64),
                                      self.good_steps + 1))

    def skip():
      self.optimizer.iterations.assign_add(1)
      self.loss_scale.assign(self.loss_scale / 2)
      self.good_steps.assign(0)

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

  def _gradients(self, images, labels, sam_now: bool) -> sam_lib.SAMOutput:
    """The SAM variant of config.sam, at this replica's batch.

    Args:
      images: this replica's batch.
      labels: its labels.
      sam_now: False on the steps between SAM steps (sam.every_k_steps > 1):
        the plain gradient, plus LookSAM's reused direction if it is on.

    Returns:
      The SAM output, whose aux is (logits, new non-trainable state).
    """
    sc = self.config.sam
    model = self.model
    num_replicas = tf.distribute.get_replica_context().num_replicas_in_sync
    state = [v.value for v in model.non_trainable_variables]
    params = [v.value for v in model.trainable_variables]
    loss_scale = self.loss_scale.read_value() if self.loss_scaling else None
    kwargs = dict(adaptive=sc.adaptive, eta=sc.eta, gsam_alpha=sc.gsam_alpha,
                  loss_scale=loss_scale)

    def sam():
      if sc.micro_batch_size:
        chunks = images.shape[0] // sc.micro_batch_size
        fns = [self._loss_fn(x, y, state, 1 / (num_replicas * chunks))
               for x, y in zip(tf.split(images, chunks),
                               tf.split(labels, chunks))]
        out = sam_lib.micro_batch_sam_step(fns, params, sc.rho, **kwargs)
        logits = tf.concat([a[0] for a in out.aux], 0)
        # Each micro-batch updated the statistics from the same start; their
        # mean is what one pass over the replica's batch gives, to first order.
        new_state = [tf.add_n(s) / chunks
                     for s in zip(*[a[1] for a in out.aux])]
        return out._replace(aux=(logits, new_state))
      return sam_lib.sam_step(
          self._loss_fn(images, labels, state, 1 / num_replicas), params,
          sc.rho, sync_perturbation=sc.sync_perturbation, **kwargs)

    def total(grads):
      if num_replicas == 1:
        return grads
      return tf.distribute.get_replica_context().all_reduce(
          tf.distribute.ReduceOp.SUM, grads)

    if sam_now:
      out = sam()
      if sc.looksam_alpha:
        # Every replica computes and keeps the same g_v.
        direction = sam_lib.looksam_direction(total(out.clean_grads),
                                              total(out.grads))
        # Made of the totals: finite on every replica or on none.
        finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(d))
                                for d in direction])
        for variable, value in zip(self.looksam_direction, direction):
          # A skipped step (loss scaling) keeps the last finite direction.
          variable.assign(tf.where(finite, value, variable.read_value())
                          if self.loss_scaling else value)
      return out
    out = sam_lib.sam_step(
        self._loss_fn(images, labels, state, 1 / num_replicas), params, 0.0,
        loss_scale=loss_scale)
    if sc.looksam_alpha:
      out = out._replace(grads=sam_lib.looksam_reuse(
          out.grads, [v.read_value() for v in self.looksam_direction],
          sc.looksam_alpha, tf.linalg.global_norm(total(out.grads)),
          share=1 / num_replicas))
    return out

  def _train_loop(self, iterator, num_steps):
    sc = self.config.sam

    def run(steps, sam_now):
      for _ in tf.range(steps):
        self.strategy.run(self._train_step_fn[sam_now], args=(next(iterator),))

    if not (sc.rho and sc.every_k_steps > 1):
      run(num_steps, True)
      return
    # SAM on the steps whose number is a multiple of k, plain steps (or
    # LookSAM's) in between: loops of known lengths, not a tf.cond per step.
    # A tf.cond in the replica step cannot hold MirroredStrategy's
    # merge_call, and a tf.cond around strategy.run fails at run time under
    # MultiWorkerMirroredStrategy.
    k = tf.constant(sc.every_k_steps, tf.int64)
    num_steps = tf.cast(num_steps, tf.int64)
    head = tf.minimum(-self.optimizer.iterations % k, num_steps)
    run(head, False)  # Up to the next multiple of k.
    rest = num_steps - head
    for _ in tf.range(rest // k):
      run(1, True)
      run(k - 1, False)
    tail = rest % k
    run(tf.minimum(tail, 1), True)
    run(tf.maximum(tail - 1, 0), False)

  def _eval_step(self, batch, ema: bool):
    images, labels, mask = batch
    if ema:
      trainable, state = ([v.read_value() for v in variables]
                          for variables in self.ema)
      logits, _ = self.model.stateless_call(trainable, state, images,
                                            training=False)
    else:
      logits = self.model(images, training=False)
    logits = tf.cast(logits, tf.float32)
    loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
    correct = tf.cast(
        tf.equal(tf.argmax(logits, -1, output_type=labels.dtype), labels),
        tf.float32)
    top5 = tf.cast(tf.math.in_top_k(labels, logits, min(5, self.num_classes)),
                   tf.float32)
    local = tf.stack([tf.reduce_sum(loss * mask),
                      tf.reduce_sum(correct * mask),
                      tf.reduce_sum(top5 * mask), tf.reduce_sum(mask)])
    ctx = tf.distribute.get_replica_context()
    self.eval_sums.assign_add(ctx.all_reduce(tf.distribute.ReduceOp.SUM, local))

  def _eval_loop(self, iterator, num_steps, ema: bool):
    for _ in tf.range(num_steps):
      self.strategy.run(self._eval_step_fn[ema], args=(next(iterator),))

  def read_train_metrics(self) -> dict[str, float]:
    """Means since the last call, and resets the sums.

    Under loss scaling the means are over the applied steps only (a skipped
    step's gradient norm overflowed); train/skipped_steps counts the others.
    """
    sums = dict(zip(_TRAIN_FIELDS, self.train_sums.numpy().tolist()))
    self.train_sums.assign(tf.zeros_like(self.train_sums))
    metrics = {'train/learning_rate': float(self.schedule(self.step - 1))}
    if self.loss_scaling:
      metrics.update({'train/skipped_steps': sums['skipped'],
                      'train/loss_scale': float(self.loss_scale.numpy())})
    steps = sums['steps']
    if not steps:
      return metrics
    loss = sums['loss'] / steps
    metrics.update({'train/loss': loss,
                    'train/accuracy': sums['correct'] / sums['examples']})
    if self.config.sam.rho:
      perturbed = sums['perturbed_loss'] / steps
      metrics.update({'train/perturbed_loss': perturbed,
                      'train/sharpness': perturbed - loss,
                      'train/grad_norm': sums['grad_norm'] / steps})
    return metrics

  def _count_flags_fn(self, flag):
    def replica_fn(flag):
      # The identity places the value on this replica's device, which the
      # all-reduce takes its destination from.
      return tf.distribute.get_replica_context().all_reduce(
          tf.distribute.ReduceOp.SUM, tf.identity(flag))
    return self.strategy.experimental_local_results(
        self.strategy.run(replica_fn, args=(flag,)))[0]

  def any_replica(self, flag: bool) -> bool:
    """Whether `flag` is set on any replica, of any host.

    A collective: every host must call it at the same point of its loop.
    """
    return bool(self._count_flags(tf.constant(float(flag))).numpy() > 0)

  def evaluate(self, dataset, num_steps: int, prefix: str = 'eval',
               ema: bool = False) -> dict[str, float]:
    """Loss and accuracy over a padded eval dataset (see input_pipeline).

    Args:
      dataset: a distributed eval dataset.
      num_steps: its number of batches.
      prefix: of the metric names.
      ema: evaluate the moving average of the weights instead.

    Returns:
      {prefix/loss, prefix/accuracy, prefix/examples}, and
      prefix/top5_accuracy for 100 classes or more.
    """
    self.eval_sums.assign(tf.zeros_like(self.eval_sums))
    self.eval_loop(iter(dataset), tf.constant(num_steps), ema)
    sums = dict(zip(_EVAL_FIELDS, self.eval_sums.numpy().tolist()))
    metrics = {f'{prefix}/loss': sums['loss'] / sums['examples'],
               f'{prefix}/accuracy': sums['correct'] / sums['examples'],
               f'{prefix}/examples': sums['examples']}
    if self.num_classes >= _TOP5_FROM_CLASSES:
      metrics[f'{prefix}/top5_accuracy'] = sums['top5'] / sums['examples']
    return metrics


# Fields that change the model, the data stream or the optimizer's state: a
# resume with other values would not continue the same run.
STRUCTURAL_FIELDS = (
    'seed', 'batch_size', 'model', 'dataset.name', 'dataset.train_subset',
    'dataset.synthetic_image_shape', 'dataset.synthetic_num_classes',
    'optimizer.name', 'optimizer.momentum', 'optimizer.nesterov',
    'optimizer.weight_decay_type', 'ema_decay', 'sam.looksam_alpha')


def _flatten(tree: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = list(value) if isinstance(
          value, (list, tuple)) else value
  return flat


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
  """Structural fields whose values differ between two configs (as JSON).

  A field the old config lacks came with a newer version of this code, whose
  default keeps the old behaviour: it is no change.
  """
  old, new = _flatten(old), _flatten(new)
  return sorted(
      f'{key}: {old.get(key)!r} -> {new.get(key)!r}'
      for key in old
      if any(key == f or key.startswith(f + '.') for f in STRUCTURAL_FIELDS)
      and old[key] != new.get(key))


def makedirs(path: str) -> None:
  """tf.io.gfile.makedirs that fails on a missing GCS bucket.

  Raises:
    tf.errors.NotFoundError: if `path` is in a gs:// bucket that does not
      exist. TensorFlow's own makedirs (2.21) does not fail there: it asks
      for the missing bucket again and again, forever (seen against a GCS
      emulator, which answers 404 as GCS does), so a mistyped bucket name
      would hang the run.
  """
  if path.startswith('gs://'):
    bucket = 'gs://' + path[len('gs://'):].split('/', 1)[0]
    if not tf.io.gfile.isdir(bucket):
      raise tf.errors.NotFoundError(None, None,
                                    f'the bucket {bucket} does not exist')
  tf.io.gfile.makedirs(path)


def _prepare_workdir(config: ml_collections.ConfigDict, workdir: str,
                     chief: bool) -> None:
  """Checks the workdir is writable and resumable; writes config.json.

  Raises:
    PermissionError: if the workdir cannot be written.
    ValueError: if it holds checkpoints of a structurally different config.
  """
  path = os.path.join(workdir, 'config.json')
  new = json.loads(config.to_json_best_effort())
  if tf.train.latest_checkpoint(os.path.join(workdir, 'checkpoints')):
    with tf.io.gfile.GFile(path) as f:
      changes = config_changes(json.load(f), new)
    if changes and not config.allow_structural_changes:
      raise ValueError(
          f'{workdir} holds checkpoints of a run whose config differs in '
          f'{"; ".join(changes)}. Use another --workdir, or resume anyway '
          'with --config.allow_structural_changes=True.')
  try:
    makedirs(workdir)
    if chief:
      # Written aside and renamed into place: the other hosts of a
      # multi-host run may be reading the previous one right now.
      with tf.io.gfile.GFile(path + '.tmp', 'w') as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
      tf.io.gfile.rename(path + '.tmp', path, overwrite=True)
  except (tf.errors.OpError, OSError) as e:
    raise PermissionError(
        f'Cannot write to --workdir={workdir} ({e}). Choose a writable '
        'directory or bucket.') from None


def _restore(checkpoint: tf.train.Checkpoint,
             manager: tf.train.CheckpointManager) -> str | None:
  """Restores the newest readable checkpoint; skips corrupt ones."""
  for path in reversed(manager.checkpoints):
    try:
      checkpoint.restore(path).assert_existing_objects_matched()
      return path
    # What a truncated or corrupt file raises depends on where it breaks.
    except (tf.errors.OpError, ValueError, AssertionError, IndexError,
            OSError) as e:
      logging.error('Checkpoint %s is unreadable (%s: %s); trying the one '
                    'before it.', path, type(e).__name__, e)
  if manager.checkpoints:
    raise RuntimeError(f'No readable checkpoint in {manager.directory}.')
  return None


class _SigtermFlag:
  """Turns SIGTERM (preemption, `gcloud ... stop`) into a flag the loop reads.

  The host loop finishes its current call, saves a checkpoint and returns;
  the same command resumes from there. Only the main thread can install
  signal handlers, so elsewhere (tests in threads) this is inert.
  """

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM: stopping after the current loop.')
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _take_part_in_save(checkpoint: tf.train.Checkpoint) -> None:
  """A non-chief worker's share of a save under MultiWorkerMirroredStrategy.

  Every worker must take part in a save: reading a sync-on-read variable for
  it is a collective, and a chief saving alone would wait for the others
  forever (TensorFlow's PreemptionCheckpointHandler saves from every worker
  for this reason). The others write to a local scratch directory, deleted
  at once, so that the shared workdir holds the chief's checkpoints only.
  """
  scratch = tempfile.mkdtemp(prefix='sam-worker-checkpoint-')
  try:
    checkpoint.save(os.path.join(scratch, 'ckpt'))
  finally:
    tf.io.gfile.rmtree(scratch)


def _every(interval: int, steps_per_epoch: int) -> int:
  return steps_per_epoch if interval == -1 else interval


def _next_stop(step: int, total: int, intervals: list[int]) -> int:
  """The first step after `step` where the host loop must act."""
  return min([total] + [(step // i + 1) * i for i in intervals])


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       strategy: tf.distribute.Strategy | None = None
                       ) -> dict[str, float]:
  """Trains and evaluates, resuming from `workdir` if it has a checkpoint.

  Args:
    config: the run's config (see configs/default.py).
    workdir: where checkpoints, summaries, config.json and results.json go;
      local or gs://.
    strategy: the distribution strategy; the current one if None.

  Returns:
    The final metrics, as also written to `workdir/results.json`.
  """
  strategy = strategy or tf.distribute.get_strategy()
  validate_config(config, strategy.num_replicas_in_sync)
  chief = distribute.is_chief(strategy)
  multi_worker = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
  _prepare_workdir(config, workdir, chief)

  data = input_pipeline.load(config)
  steps_per_epoch = input_pipeline.steps_per_epoch(data, config.batch_size)
  total_steps = (config.num_train_steps if config.num_train_steps > 0 else
                 math.ceil(config.num_epochs * steps_per_epoch))
  trainer = Trainer(config, strategy, data.num_classes, data.image_shape,
                    steps_per_epoch, total_steps)
  logging.info('Model %s: %d trainable parameters.', config.model.name,
               sum(int(np.prod(v.shape))
                   for v in trainer.model.trainable_variables))

  manager = tf.train.CheckpointManager(
      trainer.checkpoint, os.path.join(workdir, 'checkpoints'),
      max_to_keep=config.keep_checkpoints)
  restored = _restore(trainer.checkpoint, manager)
  if restored:
    logging.info('Resumed from %s at step %d.', restored, trainer.step)
  step = trainer.step

  writer = metric_writers.create_default_writer(
      workdir, just_logging=not chief, asynchronous=False)
  report_progress = periodic_actions.ReportProgress(
      num_train_steps=total_steps, writer=writer, every_steps=None,
      every_secs=config.progress_every_secs)
  train_iter = iter(strategy.distribute_datasets_from_function(
      lambda ctx: input_pipeline.train_dataset(data, config, ctx, step)))
  # (summary prefix, split): the test set, and the validation split if any.
  eval_splits = [('eval', 'test')] + (
      [('val', 'validation')] if data.validation else [])
  eval_sets = [
      (prefix, strategy.distribute_datasets_from_function(
          lambda ctx, split=split: input_pipeline.eval_dataset(
              data, config, ctx, split)),
       input_pipeline.num_eval_steps(data, config.eval_batch_size, split))
      for prefix, split in eval_splits]

  def evaluate():
    metrics = {}
    for prefix, dataset, steps in eval_sets:
      metrics.update(trainer.evaluate(dataset, steps, prefix))
      if config.ema_decay:
        metrics.update(trainer.evaluate(dataset, steps, f'ema_{prefix}',
                                        ema=True))
    return metrics


  log_every = _every(config.log_every_steps, steps_per_epoch)
  eval_every = _every(config.eval_every_steps, steps_per_epoch)
  ckpt_every = _every(config.checkpoint_every_steps, steps_per_epoch)
  start_time = time.time()
  train_metrics, eval_metrics = {}, {}
  logging.info('Training from step %d to %d (%d steps per epoch).', step,
               total_steps, steps_per_epoch)
  report_progress(step)
  saved_step = step if restored else None
  with _SigtermFlag() as sigterm:
    while step < total_steps and not trainer.plateau.stopped:
      stop = _next_stop(step, total_steps,
                        [config.steps_per_loop, log_every, eval_every,
                         ckpt_every])
      trainer.train_loop(train_iter, tf.constant(stop - step))
      first, step = step + 1, stop
      # Before anything is written: a non-finite loss (or gradient norm) in
      # any step of the loop leaves its sum non-finite.
      if not np.isfinite(trainer.train_sums.numpy()).all():
        raise FloatingPointError(
            f'Non-finite training loss or gradient norm in steps {first} to '
            f'{step}; ' + (
                f'nothing after step {saved_step} was saved '
                f'({manager.latest_checkpoint}).' if saved_step is not None
                else 'nothing was saved.'))
      report_progress(step)
      stop_requested = sigterm.requested
      if multi_worker:
        # SIGTERM reaches the hosts at different moments; all must stop
        # after the same loop, or those going on wait for the others in the
        # next collective forever.
        stop_requested = trainer.any_replica(stop_requested)
      if step % log_every == 0 or step == total_steps:
        train_metrics = trainer.read_train_metrics()
        writer.write_scalars(step, train_metrics)
      if step % eval_every == 0 or step == total_steps:
        eval_metrics = evaluate()
        writer.write_scalars(step, eval_metrics)
        note = trainer.plateau.update(eval_metrics)
        if note:
          logging.info('Step %d: %s.', step, note)
      if (step % ckpt_every == 0 or step == total_steps or
          stop_requested or trainer.plateau.stopped) and saved_step != step:
        if chief:
          manager.save(checkpoint_number=step)
        elif multi_worker:
          _take_part_in_save(trainer.checkpoint)
        saved_step = step
      if stop_requested and step < total_steps:
        writer.flush()
        logging.warning('Stopped by SIGTERM at step %d, saved in %s; run the '
                        'same command to resume.', step,
                        os.path.join(manager.directory, f'ckpt-{step}'))
        return {'step': step, 'preempted': True}
  if not eval_metrics:
    # Resumed a finished run: evaluate the final weights again.
    eval_metrics = evaluate()
  writer.flush()

  results = {'step': step, **train_metrics, **eval_metrics,
             'early_stopped': trainer.plateau.stopped,
             'train_seconds': time.time() - start_time}
  if chief:
    with tf.io.gfile.GFile(os.path.join(workdir, 'results.json'), 'w') as f:
      json.dump(results, f, indent=2, sort_keys=True)
  logging.info('Final test accuracy %.2f%% at step %d.',
               100 * eval_metrics['eval/accuracy'], step)
  return results
