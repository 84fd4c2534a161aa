"""Config checks: every field is validated before any data or model is built.

`validate_config` names the offending field, its value and what is allowed;
`config_changes` says which structural fields differ from those of the run
that wrote a workdir's checkpoints (a resume must continue the same run).
"""

import math
from typing import Any

import ml_collections

from sam import autoaugment
from sam import distribute
from sam import input_pipeline
from sam import models
from sam import perturbations
from sam import plateau
from sam import streaming

OPTIMIZERS = ('sgd', 'adam')
ASCENT_MODES = ('train', 'inference')
RHO_SCHEDULES = ('constant', 'learning_rate')
SCHEDULES = ('constant', 'step', 'cosine', 'linear', 'plateau')
WEIGHT_DECAY_TYPES = ('l2', 'decoupled')
# Keras dtype policies of the model; mixed_float16 turns on loss scaling.
DTYPE_POLICIES = ('float32', 'mixed_bfloat16', 'mixed_float16')


def _check(ok: bool, field: str, value, allowed: str) -> None:
  if not ok:
    raise ValueError(f'config.{field}={value!r} is invalid: {allowed}.')


def _one_of(field: str, value, options) -> None:
  _check(value in options, field, value, f'use one of {tuple(options)}')


def _check_sam(sc: ml_collections.ConfigDict, per_replica: int,
               num_replicas: int) -> None:
  """The fields of config.sam that validate_config does not check alone."""
  _one_of('sam.variant', sc.variant, tuple(sorted(perturbations.REGISTRY)))
  _one_of('sam.ascent_mode', sc.ascent_mode, ASCENT_MODES)
  _one_of('sam.rho_schedule', sc.rho_schedule, RHO_SCHEDULES)
  _check(0 <= sc.rho_min <= sc.rho, 'sam.rho_min', sc.rho_min,
         f'it must be in [0, sam.rho={sc.rho}]')
  _check(sc.ascent_steps >= 1, 'sam.ascent_steps', sc.ascent_steps,
         'it must be >= 1 (1 is SAM)')
  for option in perturbations.all_options():
    _check(option.check(sc[option.name]), f'sam.{option.name}',
           sc[option.name], option.allowed)
  if sc.variant == 'esam' and sc.esam_gamma < 1:
    _check(int(per_replica * sc.esam_gamma) >= 1, 'sam.esam_gamma',
           sc.esam_gamma, f'it must keep at least one of the {per_replica} '
           'examples per replica')
    _check(sc.ascent_mode == 'train' and not sc.micro_batch_size,
           'sam.esam_gamma', sc.esam_gamma,
           "ESAM's data selection needs sam.ascent_mode='train' and no "
           'micro-batches (sam.micro_batch_size=0); or set it to 1')
  problem = perturbations.conflict(
      sc.variant, sc.adaptive,
      sc.sync_perturbation and not (sc.micro_batch_size and
                                    not sc.accumulate_micro_batches),
      sc.inner_group_size, sc.ascent_steps, sc.gsam_alpha)
  if problem:
    raise ValueError(f'config.sam: {problem}.')
  if sc.inner_group_size:
    _check(sc.inner_group_size > 0 and num_replicas % sc.inner_group_size == 0,
           'sam.inner_group_size', sc.inner_group_size,
           f'use 0 (all replicas) or a divisor of the {num_replicas} replicas')
    _check(sc.sync_perturbation and (
        not sc.micro_batch_size or sc.accumulate_micro_batches),
           'sam.inner_group_size', sc.inner_group_size,
           'groups of replicas share a perturbation only with '
           'sam.sync_perturbation=True and no micro-batch m-sharpness')
  _check(not sc.accumulate_micro_batches or sc.micro_batch_size > 0,
         'sam.accumulate_micro_batches', sc.accumulate_micro_batches,
         'set sam.micro_batch_size too (the micro-batches to accumulate)')
  _check(sc.every_k_steps >= 1, 'sam.every_k_steps', sc.every_k_steps,
        'it must be >= 1 (1 runs SAM at every step)')
  _check(sc.looksam_alpha >= 0, 'sam.looksam_alpha', sc.looksam_alpha,
        'it must be >= 0 (0 takes plain steps between SAM steps)')
  _check(not sc.looksam_alpha or sc.every_k_steps > 1, 'sam.looksam_alpha',
        sc.looksam_alpha, 'LookSAM reuses a direction between SAM steps: '
        'also set sam.every_k_steps > 1 (they use 5)')
  _check(sc.micro_batch_size == 0 or (
      sc.micro_batch_size > 0 and per_replica % sc.micro_batch_size == 0),
        'sam.micro_batch_size', sc.micro_batch_size,
        f'use 0 (off) or a divisor of the per-replica batch {per_replica} '
        f'({num_replicas} replicas); or keep it and set --config.batch_size='
        f'{num_replicas * sc.micro_batch_size} (or a multiple)')


def _check_randaugment(dc: ml_collections.ConfigDict) -> None:
  _check(dc.randaugment_layers >= 0, 'dataset.randaugment_layers',
         dc.randaugment_layers, 'it must be >= 0 (0 turns RandAugment off)')
  _check(0 <= dc.randaugment_magnitude <= autoaugment.MAX_MAGNITUDE,
         'dataset.randaugment_magnitude', dc.randaugment_magnitude,
         f'it must be in 0..{autoaugment.MAX_MAGNITUDE}')
  _check(not dc.randaugment_layers or dc.augment in (
      'basic', 'basic_cutout', 'inception_crop'),
         'dataset.randaugment_layers', dc.randaugment_layers,
         "RandAugment follows the crop and flip of dataset.augment 'basic', "
         "'basic_cutout' or 'inception_crop': set one, or 0 layers")


def _check_probe(pc: ml_collections.ConfigDict, num_replicas: int) -> None:
  _check(pc.every_steps >= -1, 'probe.every_steps', pc.every_steps,
         'it must be >= 1, -1 for once per epoch, or 0 (off)')
  _check(pc.batch_size > 0 and (
      not pc.every_steps or pc.batch_size % num_replicas == 0),
         'probe.batch_size', pc.batch_size,
         f'it must be a positive multiple of the {num_replicas} replicas')
  _check(pc.num_batches >= 1, 'probe.num_batches', pc.num_batches,
         'it must be >= 1')
  _check(0 <= pc.rho < math.inf, 'probe.rho', pc.rho,
         'it must be finite and >= 0 (0 takes sam.rho)')
  _check(pc.hessian_iterations >= 1, 'probe.hessian_iterations',
         pc.hessian_iterations, 'it must be >= 1')


def _check_stream(config: ml_collections.ConfigDict) -> None:
  """A streamed data set ('tfds:NAME') and what it does not support."""
  dc = config.dataset
  _check(len(dc.name) > len(streaming.PREFIX), 'dataset.name', dc.name,
         "name the TFDS data set after 'tfds:', e.g. 'tfds:imagenet2012'")
  _one_of('dataset.augment', dc.augment, streaming.AUGMENTATIONS)
  _check(dc.image_size >= 1, 'dataset.image_size', dc.image_size,
         'it must be >= 1 (224 for ImageNet)')
  _check(dc.shuffle_buffer >= 1, 'dataset.shuffle_buffer', dc.shuffle_buffer,
         'it must be >= 1')
  for field, value, off in (('label_noise', dc.label_noise, 0.0),
                            ('validation_size', dc.validation_size, 0),
                            ('train_subset', dc.train_subset, -1)):
    _check(value == off, f'dataset.{field}', value,
           f'streamed data sets do not support it yet: set it to {off}')
  _check(config.probe.every_steps == 0, 'probe.every_steps',
         config.probe.every_steps,
         'the probe needs a data set in memory: set it to 0 for streams')


def _check_schedule(config: ml_collections.ConfigDict) -> None:
  """The learning-rate schedule, the rho that may follow it, and plateau."""
  sc, pc = config.schedule, config.plateau
  _one_of('schedule.name', sc.name, SCHEDULES)
  _check(config.sam.rho_schedule == 'constant' or
         sc.name in ('cosine', 'linear', 'step'),
         'sam.rho_schedule', config.sam.rho_schedule,
         'it follows a learning rate that decays: use schedule.name '
         "'cosine', 'linear' or 'step', or rho_schedule 'constant'")
  _check(0 <= sc.linear_end <= 1, 'schedule.linear_end', sc.linear_end,
         'it is a fraction of the peak rate, in [0, 1] (0.01 in GSAM)')
  _check(0 < sc.learning_rate < math.inf, 'schedule.learning_rate',
         sc.learning_rate, 'it must be finite and > 0')
  _one_of('plateau.monitor', pc.monitor, plateau.MONITORS)
  if sc.name == 'plateau' or pc.early_stopping_patience:
    _check(config.dataset.validation_size > 0, 'dataset.validation_size',
           config.dataset.validation_size,
           f'schedule.name=plateau and early stopping watch {pc.monitor}, '
           'so hold out a validation split (> 0)')
  _check(0 < pc.factor < 1, 'plateau.factor', pc.factor, 'it must be in (0, 1)')


def _check_batches_and_loops(config: ml_collections.ConfigDict,
                             num_replicas: int) -> None:
  # The training batch is a hyperparameter: never changed behind the user's
  # back. The eval batch is rounded up to the replicas (the padding is
  # masked), so it works on any slice.
  _check(config.batch_size > 0 and config.batch_size % num_replicas == 0,
         'batch_size', config.batch_size,
         f'it must be a positive multiple of the {num_replicas} replicas '
         'that share it: set --config.batch_size='
         f'{-(-max(config.batch_size, 1) // num_replicas) * num_replicas} '
         '(and scale learning_rate with it), or run on fewer cores')
  _check(config.eval_batch_size > 0, 'eval_batch_size',
         config.eval_batch_size, 'it must be > 0 (it is rounded up to a '
         'multiple of the replicas)')
  _check(config.steps_per_loop >= 1, 'steps_per_loop', config.steps_per_loop,
        'it must be >= 1')
  _check(0 <= config.stop_within_secs < math.inf, 'stop_within_secs',
         config.stop_within_secs, 'it must be finite and >= 0 (0: off)')


def validate_config(config: ml_collections.ConfigDict,
                    num_replicas: int, tpu: bool = False) -> None:
  """Checks the config before any data is loaded or model built.

  Args:
    config: the run's config.
    num_replicas: the replicas that will share each batch.
    tpu: whether they are TPU cores (TPUStrategy).

  Raises:
    ValueError: naming the offending field, its value and what is allowed.
  """
  if streaming.is_streamed(config.dataset.name):
    _check_stream(config)
  else:
    _one_of('dataset.name', config.dataset.name, input_pipeline.DATASETS)
    _one_of('dataset.augment', config.dataset.augment,
           input_pipeline.AUGMENTATIONS)
  _one_of('model.name', config.model.name, models.MODELS)
  _one_of('optimizer.name', config.optimizer.name, OPTIMIZERS)
  _one_of('optimizer.weight_decay_type', config.optimizer.weight_decay_type,
         WEIGHT_DECAY_TYPES)
  _check_schedule(config)
  _one_of('strategy', config.strategy, distribute.STRATEGIES)
  _one_of('jit_compile', config.jit_compile, ('auto', 'true', 'false'))
  _one_of('dtype_policy', config.dtype_policy, DTYPE_POLICIES)
  # float16 needs loss scaling, whose tf.cond and cross-replica merge in the
  # step a TPU program should not carry; TPUs compute in bfloat16 natively.
  _check(not tpu or config.dtype_policy != 'mixed_float16', 'dtype_policy',
         config.dtype_policy, 'TPUs compute in bfloat16, without loss '
         'scaling: use --config.dtype_policy=mixed_bfloat16 on a TPU')
  for field in ('sam.rho', 'sam.gsam_alpha', 'dataset.mixup_alpha',
                'optimizer.weight_decay',
                'optimizer.grad_clip_norm', 'schedule.warmup_epochs'):
    value = config[field.split('.')[0]][field.split('.')[1]]
    _check(0 <= value < math.inf, field, value, 'it must be finite and >= 0')
  _check_sam(config.sam, config.batch_size // max(num_replicas, 1),
             num_replicas)
  _check(config.loss_scale.initial > 0, 'loss_scale.initial',
        config.loss_scale.initial, 'it must be > 0 (2**15 is usual)')
  _check(config.loss_scale.growth_steps >= 1, 'loss_scale.growth_steps',
        config.loss_scale.growth_steps, 'it must be >= 1')
  _check(0 <= config.ema_decay < 1, 'ema_decay', config.ema_decay,
        'it must be in [0, 1); 0 turns the moving average off')
  _check(0 <= config.optimizer.label_smoothing < 1, 'optimizer.label_smoothing',
        config.optimizer.label_smoothing, 'it must be in [0, 1)')
  _check_batches_and_loops(config, num_replicas)
  _check(config.num_train_steps > 0 or (
      config.num_train_steps == -1 and config.num_epochs > 0),
        'num_train_steps', config.num_train_steps,
        'set it > 0, or -1 with config.num_epochs > 0')
  _check(config.seed >= 0, 'seed', config.seed, 'it must be >= 0')
  _check(config.keep_checkpoints >= 1, 'keep_checkpoints',
        config.keep_checkpoints, 'it must be >= 1 (a run resumes from them)')
  for field in ('log_every_steps', 'eval_every_steps',
                'checkpoint_every_steps'):
    _check(config[field] == -1 or config[field] >= 1, field, config[field],
          'it must be >= 1, or -1 for once per epoch')
  _check_probe(config.probe, num_replicas)
  _check(0 <= config.dataset.label_noise < 1, 'dataset.label_noise',
        config.dataset.label_noise, 'it must be in [0, 1)')
  _check(config.dataset.validation_size >= 0, 'dataset.validation_size',
        config.dataset.validation_size, 'it must be >= 0')
  _check(config.dataset.cutout_size >= 1, 'dataset.cutout_size',
        config.dataset.cutout_size, 'it must be >= 1')
  _check_randaugment(config.dataset)
  _check(config.dataset.train_subset == -1 or
        config.dataset.train_subset >= config.batch_size,
        'dataset.train_subset', config.dataset.train_subset,
        'it must be -1 (all) or at least config.batch_size')



# Fields that change the model, the data a run trains on (its examples, their
# labels, order and augmentation) or the optimizer's state: a resume with
# other values would not continue the same run.
STRUCTURAL_FIELDS = (
    'seed', 'batch_size', 'model', 'dataset.name', 'dataset.augment',
    'dataset.image_size', 'dataset.shuffle_buffer', 'dataset.cutout_size',
    'dataset.mixup_alpha', 'dataset.randaugment_layers',
    'dataset.randaugment_magnitude',
    'dataset.label_noise', 'dataset.validation_size',
    'dataset.train_subset', 'dataset.synthetic_image_shape',
    'dataset.synthetic_num_classes', 'dataset.synthetic_train_size',
    'dataset.synthetic_noise', 'dataset.synthetic_seed', 'optimizer.name',
    'optimizer.momentum', 'optimizer.nesterov', 'optimizer.weight_decay_type',
    'ema_decay', 'sam.looksam_alpha', 'sam.variant',
    *(f'sam.{o.name}' for o in perturbations.all_options() if o.structural))

# The others, which a resume may change (a longer run, another learning rate
# or rho, where the files are, how often to log): tests/configs_test.py
# checks that every field of configs/default.py is in one of the two lists.
RESUMABLE_FIELDS = (
    'strategy', 'tpu', 'multi_worker_timeout_secs', 'jit_compile',
    'dtype_policy', 'loss_scale',
    'dataset.data_dir', 'dataset.download', 'dataset.synthetic_test_size',
    'sam.rho', 'sam.rho_schedule', 'sam.rho_min', 'sam.ascent_mode',
    'sam.adaptive', 'sam.perturb_only', 'sam.sync_perturbation',
    'sam.inner_group_size', 'sam.ascent_steps',
    'sam.gsam_alpha', 'sam.micro_batch_size', 'sam.accumulate_micro_batches',
    'sam.every_k_steps',
    'optimizer.beta1', 'optimizer.beta2', 'optimizer.epsilon',
    'optimizer.weight_decay', 'optimizer.decay_all_params',
    'optimizer.grad_clip_norm', 'optimizer.label_smoothing', 'schedule',
    'plateau', 'eval_batch_size', 'num_epochs', 'num_train_steps',
    'steps_per_loop', 'stop_within_secs', 'log_every_steps', 'eval_every_steps',
    'checkpoint_every_steps', 'progress_every_secs', 'keep_checkpoints',
    'probe',
    'allow_structural_changes',
    *(f'sam.{o.name}' for o in perturbations.all_options()
      if not o.structural))


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
