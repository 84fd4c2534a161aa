"""Trainer: the state of a run and its compiled train and eval loops.

`Trainer.train_loop` is one tf.function that runs n steps (`for _ in
tf.range(n): strategy.run(step.train_step, ...)`); `Trainer.evaluate` runs
the eval steps over a padded eval set. The host loop around them is
`sam.train.train_and_evaluate`.
"""

import functools

import ml_collections
import tensorflow as tf

from sam import optim
from sam import plateau
from sam import state as state_lib
from sam import step as step_lib

# Top-5 accuracy is reported from this many classes on (CIFAR-100).
_TOP5_FROM_CLASSES = 100


def use_xla(setting: str, strategy: tf.distribute.Strategy) -> bool | None:
  """Whether to compile the replica steps with XLA (config.jit_compile).

  None under TPUStrategy: the replica step is left to TPU replication, which
  compiles the whole loop with XLA (an explicit False there would ask for
  the step not to be compiled inside the TPU program)."""
  if isinstance(strategy, tf.distribute.TPUStrategy):
    return None
  if setting == 'auto':
    # A cross-replica all-reduce inside a jit-compiled function fails under
    # MirroredStrategy (seen on CPU), so 'auto' only compiles one replica.
    return bool(tf.config.list_physical_devices('GPU')) and (
        strategy.num_replicas_in_sync == 1)
  return setting == 'true'


def _noise_metrics(noise: dict[str, float]) -> dict[str, float]:
  """train/clean_* and train/flipped_* from the NOISE_FIELDS sums.

  train/flipped_accuracy is the fraction of flipped examples predicted as
  their given, wrong label: how much of the noise the model memorized.
  """
  metrics = {'train/flipped_fraction': noise['flipped_examples'] / (
      noise['clean_examples'] + noise['flipped_examples'])}
  for part in ('clean', 'flipped'):
    if noise[f'{part}_examples']:
      metrics[f'train/{part}_loss'] = (noise[f'{part}_loss'] /
                                       noise[f'{part}_examples'])
      metrics[f'train/{part}_accuracy'] = (noise[f'{part}_correct'] /
                                           noise[f'{part}_examples'])
  return metrics

class Trainer:
  """The state of a run and its compiled train and eval loops."""

  def __init__(self, config: ml_collections.ConfigDict,
               strategy: tf.distribute.Strategy, num_classes: int,
               image_shape: tuple[int, int, int], steps_per_epoch: int,
               total_steps: int):
    self.config = config
    self.strategy = strategy
    self.state = state_lib.create_train_state(
        config, strategy, num_classes, image_shape, steps_per_epoch,
        total_steps)
    self.plateau = plateau.Plateau(config, self.state.plateau_state)
    self.jit_compile = use_xla(config.jit_compile, strategy)
    # Two compiled steps: SAM, and (with sam.every_k_steps > 1) the steps
    # in between.
    self._train_step = {
        sam_now: tf.function(
            functools.partial(step_lib.train_step, self.state, config,
                              sam_now=sam_now), jit_compile=self.jit_compile)
        for sam_now in (True, False)}
    self._eval_step = {
        ema: tf.function(functools.partial(step_lib.eval_step, self.state,
                                           ema=ema),
                         jit_compile=self.jit_compile)
        for ema in (False, True)}
    self.train_loop = tf.function(self._train_loop)
    self.eval_loop = tf.function(self._eval_loop)
    self._count_flags = tf.function(self._count_flags_fn)

  @property
  def step(self) -> int:
    return self.state.step

  def _train_loop(self, iterator, num_steps):
    sc = self.config.sam

    def run(steps, sam_now):
      for _ in tf.range(steps):
        self.strategy.run(self._train_step[sam_now], args=(next(iterator),))

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
    head = tf.minimum(-self.state.optimizer.iterations % k, num_steps)
    run(head, False)  # Up to the next multiple of k.
    rest = num_steps - head
    for _ in tf.range(rest // k):
      run(1, True)
      run(k - 1, False)
    tail = rest % k
    run(tf.minimum(tail, 1), True)
    run(tf.maximum(tail - 1, 0), False)

  def _eval_loop(self, iterator, num_steps, ema: bool):
    for _ in tf.range(num_steps):
      self.strategy.run(self._eval_step[ema], args=(next(iterator),))

  def read_train_metrics(self) -> dict[str, float]:
    """Means since the last call, and resets the sums.

    Under loss scaling the means are over the applied steps only (a skipped
    step's gradient norm overflowed); train/skipped_steps counts the others.
    The perturbed loss, the sharpness and the gradient norm are means over
    the SAM steps only (all steps, unless sam.every_k_steps > 1).
    """
    state = self.state
    sums = dict(zip(state_lib.TRAIN_FIELDS, state.train_sums.numpy().tolist()))
    sam = dict(zip(state_lib.SAM_FIELDS, state.sam_sums.numpy().tolist()))
    state.train_sums.assign(tf.zeros_like(state.train_sums))
    state.sam_sums.assign(tf.zeros_like(state.sam_sums))
    if state.noise_sums is not None:
      noise = dict(zip(state_lib.NOISE_FIELDS,
                       state.noise_sums.numpy().tolist()))
      state.noise_sums.assign(tf.zeros_like(state.noise_sums))
    metrics = {'train/learning_rate': float(state.schedule(state.step - 1))}
    if self.config.sam.rho_schedule != 'constant':
      metrics['train/rho'] = float(
          optim.sam_rho(self.config, state.schedule, state.step - 1))
    if state.loss_scaling:
      metrics.update({'train/skipped_steps': sums['skipped'],
                      'train/loss_scale': float(state.loss_scale.numpy())})
    steps = sums['steps']
    if not steps:
      return metrics
    metrics.update({'train/loss': sums['loss'] / steps,
                    'train/accuracy': sums['correct'] / sums['examples']})
    if state.noise_sums is not None:
      metrics.update(_noise_metrics(noise))
    if self.config.sam.rho and sam['steps']:
      perturbed = sums['perturbed_loss'] / sam['steps']
      # Under ASAM, sam_step's norm is that of T g, not of g.
      asam = self.config.sam.adaptive or self.config.sam.variant == 'asam'
      norm = 'train/asam_grad_norm' if asam else 'train/grad_norm'
      metrics.update({'train/perturbed_loss': perturbed,
                      'train/sharpness': perturbed - sam['loss'] / sam['steps'],
                      norm: sums['grad_norm'] / sam['steps']})
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
    sums_variable = self.state.eval_sums
    sums_variable.assign(tf.zeros_like(sums_variable))
    self.eval_loop(iter(dataset), tf.constant(num_steps), ema)
    sums = dict(zip(state_lib.EVAL_FIELDS, sums_variable.numpy().tolist()))
    metrics = {f'{prefix}/loss': sums['loss'] / sums['examples'],
               f'{prefix}/accuracy': sums['correct'] / sums['examples'],
               f'{prefix}/examples': sums['examples']}
    if self.state.num_classes >= _TOP5_FROM_CLASSES:
      metrics[f'{prefix}/top5_accuracy'] = sums['top5'] / sums['examples']
    return metrics
