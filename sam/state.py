"""create_train_state: everything a run trains, and its checkpoint.

The trainer, the benchmark, the analysis tools and the tests build what they
train here, so there is one place that says what a checkpoint holds. All
variables are created under the strategy's scope, before any step is traced.
"""

import dataclasses

import keras
import ml_collections
import tensorflow as tf

from sam import models
from sam import optim
from sam import perturbations
from sam import plateau

# Layout of the metric accumulators: sums over steps (see `step.train_step`)
# and over eval batches (`step.eval_step`).
TRAIN_FIELDS = ('loss', 'perturbed_loss', 'grad_norm', 'correct', 'examples',
                'steps', 'skipped')
# Over the SAM steps only (with sam.every_k_steps > 1 the others are plain):
# the clean loss, and their number. perturbed_loss and grad_norm above are
# summed over the SAM steps only too.
SAM_FIELDS = ('loss', 'steps')
EVAL_FIELDS = ('loss', 'correct', 'top5', 'examples')
# Under label noise, over the clean and over the flipped training examples:
# the cross-entropy against the given label (without label smoothing), the
# examples predicted as their given label (for a flipped one: memorized),
# and their number.
NOISE_FIELDS = ('clean_loss', 'clean_correct', 'clean_examples',
                'flipped_loss', 'flipped_correct', 'flipped_examples')


@dataclasses.dataclass
class TrainState:
  """The variables of one run (see `create_train_state`).

  Attributes:
    model: the network.
    optimizer: the base optimizer; its `iterations` is the step.
    schedule: its learning-rate schedule.
    plateau_state: the plateau logic's variable, read by the schedule inside
      the step and written on the host (`sam.plateau`).
    train_sums: sums of TRAIN_FIELDS since they were last read.
    sam_sums: sums of SAM_FIELDS since they were last read.
    noise_sums: sums of NOISE_FIELDS since they were last read (None
      without label noise).
    eval_sums: sums of EVAL_FIELDS of the evaluation under way.
    ema: moving averages of the trainable and of the non-trainable
      variables ([[], []] when config.ema_decay is 0).
    looksam_direction: LookSAM's g_v from the last SAM step ([] when off).
    sam_state: the state of the SAM variant (F-SAM's, MSAM's momentum; []
      for the others).
    loss_scale: the dynamic loss scale (used under mixed_float16 only, kept
      under any policy so that a run may resume under another one).
    good_steps: finite steps since the loss scale last changed.
    checkpoint: all of the above that a resumed run needs.
    older_checkpoints: the layouts of checkpoints that older versions of
      this code wrote, for `sam.workdir.restore`.
    num_classes: of the model's output.
    loss_scaling: whether the step scales the loss (mixed_float16).
    l2: the weight of the L2 term in the loss (0 for decoupled decay).
    sam_mask: which trainable variables SAM perturbs (config.sam.perturb_only;
      None: all).
  """
  model: keras.Model
  optimizer: keras.optimizers.Optimizer
  schedule: optim.Schedule
  plateau_state: tf.Variable
  train_sums: tf.Variable
  sam_sums: tf.Variable
  noise_sums: tf.Variable | None
  eval_sums: tf.Variable
  ema: list[list[tf.Variable]]
  looksam_direction: list[tf.Variable]
  sam_state: list[tf.Variable]
  loss_scale: tf.Variable
  good_steps: tf.Variable
  checkpoint: tf.train.Checkpoint
  older_checkpoints: tuple[tf.train.Checkpoint, ...]
  num_classes: int
  loss_scaling: bool
  l2: float
  sam_mask: list[bool] | None

  @property
  def step(self) -> int:
    return int(self.optimizer.iterations.numpy())


def _build_model(config: ml_collections.ConfigDict, num_classes: int,
                 image_shape: tuple[int, int, int]) -> keras.Model:
  # Layers take the global policy when they are built: float32 variables
  # (the master weights, and so the SAM norm and the update in float32) and,
  # under mixed_bfloat16, bfloat16 compute.
  saved_policy = keras.config.dtype_policy()
  keras.config.set_dtype_policy(config.dtype_policy)
  try:
    return models.get_model(config.model.name, num_classes, image_shape)
  finally:
    keras.config.set_dtype_policy(saved_policy)


def _checkpoints(saved: dict, sam_sums: tf.Variable,
                 noise_sums: tf.Variable | None):
  """The run's checkpoint, and the layouts older versions wrote.

  Those were written before sam_sums existed (tests/resume_v1_test.py), or
  without noise_sums under label noise. Resumed from one, these sums start
  at 0, and their figures of the first logged interval are off if that
  checkpoint fell inside one.
  """
  noise = [noise_sums] if noise_sums is not None else []
  checkpoint = tf.train.Checkpoint(**saved, sam_sums=sam_sums,
                                   noise_sums=noise)
  older = (tf.train.Checkpoint(**saved),)
  if noise:
    older = (tf.train.Checkpoint(**saved, sam_sums=sam_sums), *older)
  return checkpoint, older


def create_train_state(config: ml_collections.ConfigDict,
                       strategy: tf.distribute.Strategy, num_classes: int,
                       image_shape: tuple[int, int, int],
                       steps_per_epoch: int, total_steps: int) -> TrainState:
  """Builds the model, optimizer, metric sums and checkpoint of a run.

  Args:
    config: the run's config.
    strategy: the variables are created under its scope.
    num_classes: of the data.
    image_shape: of one input image.
    steps_per_epoch: for the schedule's epochs.
    total_steps: for the cosine schedule.

  Returns:
    The state, with the variables at their initial values (seeded by
    config.seed); restore a checkpoint into `state.checkpoint` to resume.
  """
  oc = config.optimizer
  keras.utils.set_random_seed(config.seed)
  with strategy.scope():
    plateau_state = tf.Variable(plateau.initial_state(), trainable=False)
    schedule = optim.Schedule.from_run(config, steps_per_epoch, total_steps,
                                       scale=plateau_state)
    model = _build_model(config, num_classes, image_shape)
    trainable = model.trainable_variables
    optimizer = optim.create_optimizer(config, schedule)
    optimizer.build(trainable)
    if oc.weight_decay_type == 'decoupled':
      optimizer.exclude_from_weight_decay(var_list=[
          v for v, d in zip(trainable,
                            optim.decayed(trainable, oc.decay_all_params))
          if not d])
    # Replica steps all-reduce what they add to these, so the first
    # replica's value is everyone's.
    first = tf.VariableAggregation.ONLY_FIRST_REPLICA

    def variable(value, **kwargs):
      return tf.Variable(value, trainable=False, aggregation=first, **kwargs)

    ema = [[variable(v.numpy()) for v in variables] if config.ema_decay else []
           for variables in (trainable, model.non_trainable_variables)]
    looksam_direction = [variable(tf.zeros_like(v)) for v in trainable
                        ] if config.sam.looksam_alpha else []
    sam_state = [variable(v) for v in perturbations.get(
        config.sam.variant).init([v.value for v in trainable])]
    train_sums = variable(tf.zeros(len(TRAIN_FIELDS)))
    sam_sums = variable(tf.zeros(len(SAM_FIELDS)))
    noise_sums = variable(tf.zeros(len(NOISE_FIELDS))) if (
        config.dataset.label_noise) else None
    loss_scale = variable(float(config.loss_scale.initial))
    good_steps = variable(0, dtype=tf.int64)
    eval_sums = variable(tf.zeros(len(EVAL_FIELDS)))
  saved = dict(model=model, optimizer=optimizer, train_sums=train_sums,
               ema=ema, plateau=plateau_state,
               looksam_direction=looksam_direction,
               loss_scale=[loss_scale, good_steps], sam_state=sam_state)
  checkpoint, older_checkpoints = _checkpoints(saved, sam_sums, noise_sums)
  return TrainState(
      model=model, optimizer=optimizer, schedule=schedule,
      plateau_state=plateau_state, train_sums=train_sums, sam_sums=sam_sums,
      noise_sums=noise_sums, eval_sums=eval_sums, ema=ema,
      looksam_direction=looksam_direction, sam_state=sam_state,
      loss_scale=loss_scale, good_steps=good_steps, checkpoint=checkpoint,
      older_checkpoints=older_checkpoints, num_classes=num_classes,
      loss_scaling=config.dtype_policy == 'mixed_float16',
      l2=oc.weight_decay if oc.weight_decay_type == 'l2' else 0.0,
      sam_mask=perturbations.parameter_mask(model, config.sam.perturb_only))
