"""The trainer: replica equivalence, replica sync, rho = 0, exact resume."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from sam import config_checks
from sam import input_pipeline
from sam import mixup
from sam import optim
from sam import state as state_lib
from sam import step as step_lib
from sam import train
from sam.models import true_gradient
from sam.trainer import Trainer
from tests.conftest import requires_xla_cpu
from tests.conftest import tiny_config


def _trainer(config, strategy, total_steps):
  """A fresh Trainer and an iterator over its distributed training data."""
  data = input_pipeline.load(config)
  epoch_steps = input_pipeline.steps_per_epoch(data, config.batch_size)
  trainer = Trainer(config, strategy, data.num_classes,
                          data.image_shape, epoch_steps, total_steps)
  dataset = strategy.distribute_datasets_from_function(
      lambda ctx: input_pipeline.train_dataset(data, config, ctx))
  return trainer, iter(dataset)


def _train(config, strategy, steps):
  """Runs `steps` steps with a fresh Trainer; returns it."""
  trainer, iterator = _trainer(config, strategy, steps)
  trainer.train_loop(iterator, tf.constant(steps))
  return trainer


def _values(variables, replica=0, strategy=None):
  """NumPy values of Keras or tf variables, from one replica's copy."""
  if strategy is None:
    return [v.numpy() for v in variables]
  return [strategy.experimental_local_results(
      v.value if isinstance(v, keras.Variable) else v)[replica].numpy()
          for v in variables]


def _assert_same_as_one_device(config, mirrored, num_replicas, steps,
                               variables=lambda t: t.state.model.variables):
  """Trains on one and on `num_replicas` replicas: the variables agree.

  Returns:
    (one-replica trainer, many-replica trainer, its strategy).
  """
  one = _train(config, mirrored(1), steps)
  strategy = mirrored(num_replicas)
  many = _train(config, strategy, steps)
  for a, b in zip(_values(variables(one)),
                  _values(variables(many), 0, strategy)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  return one, many, strategy


@pytest.mark.parametrize('num_replicas', [
    2, pytest.param(4, marks=pytest.mark.slow)])
@pytest.mark.parametrize('adaptive', [False, True])
def test_replicas_match_single_device(mirrored, num_replicas, adaptive):
  """Same global batch: same weights after SAM steps, on 1 or R replicas."""
  config = tiny_config(**{'sam.rho': 0.1, 'sam.adaptive': adaptive,
                          'optimizer.grad_clip_norm': 1.0})
  _assert_same_as_one_device(config, mirrored, num_replicas, 3)


def test_variant_asam_is_adaptive():
  """The perturbation by name (sam.variant) is the one by flag."""
  by_flag = _train(tiny_config(**{'sam.rho': 0.5, 'sam.adaptive': True}),
                   tf.distribute.get_strategy(), 2)
  by_name = _train(tiny_config(**{'sam.rho': 0.5, 'sam.variant': 'asam'}),
                   tf.distribute.get_strategy(), 2)
  plain_sam = _train(tiny_config(**{'sam.rho': 0.5}),
                     tf.distribute.get_strategy(), 2)
  for a, b in zip(_values(by_flag.state.model.trainable_variables),
                  _values(by_name.state.model.trainable_variables)):
    np.testing.assert_array_equal(a, b)
  assert max(np.abs(a - c).max() for a, c in zip(
      _values(by_flag.state.model.trainable_variables),
      _values(plain_sam.state.model.trainable_variables))) > 1e-6


@pytest.mark.parametrize('micro_batch_size', [
    0, pytest.param(4, marks=pytest.mark.slow)])
def test_the_step_passes_the_variant_mask_and_names(monkeypatch,
                                                    micro_batch_size):
  seen = []
  real = step_lib.sam_lib.sam_step

  def spy(*args, **kwargs):
    seen.append(kwargs)
    return real(*args, **kwargs)

  monkeypatch.setattr(step_lib.sam_lib, 'sam_step', spy)
  config = tiny_config(**{
      'sam.rho': 0.5, 'sam.variant': 'asam', 'sam.adaptive_biases': False,
      'sam.perturb_only': '^conv', 'sam.micro_batch_size': micro_batch_size})
  trainer = _train(config, tf.distribute.get_strategy(), 1)
  paths = [v.path for v in trainer.state.model.trainable_variables]
  assert seen and all(
      kwargs['variant'] == 'asam' and kwargs['adaptive_biases'] is False and
      kwargs['names'] == paths and
      kwargs['mask'] == [p.startswith('conv') for p in paths]
      for kwargs in seen)


def test_accumulated_micro_batches_are_sam_on_the_whole_batch():
  """sam.accumulate_micro_batches: one eps for all micro-batches."""
  whole = _train(tiny_config(**{'sam.rho': 0.5}),
                 tf.distribute.get_strategy(), 3)
  accumulated = _train(tiny_config(**{
      'sam.rho': 0.5, 'sam.micro_batch_size': 4,
      'sam.accumulate_micro_batches': True}), tf.distribute.get_strategy(), 3)
  m_sharpness = _train(tiny_config(**{
      'sam.rho': 0.5, 'sam.micro_batch_size': 4}),
                       tf.distribute.get_strategy(), 3)
  want = _values(whole.state.model.trainable_variables)
  for got, ref in zip(_values(accumulated.state.model.trainable_variables),
                      want):
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
  assert max(np.abs(a - b).max() for a, b in zip(
      _values(m_sharpness.state.model.trainable_variables), want)) > 1e-5


def test_perturb_only_that_selects_nothing_is_one_line(tmp_path):
  config = tiny_config(**{'sam.perturb_only': 'normalization'})  # No BN.
  with pytest.raises(ValueError, match="perturb_only='normalization' "
                     'selects none of the 8 trainable variables'):
    train.train_and_evaluate(config, str(tmp_path))


def _manual_sam_sgd(config, steps, sam_steps=None, looksam_alpha=0.0,
                    ascent_training=True, variables=None, esam_shards=0,
                    mixup_shards=1):
  """SAM + SGD computed another way: perturb Keras variables in place.

  `sam_steps` lists the steps that use SAM (default: all); with
  `looksam_alpha`, the others add LookSAM's reused direction, computed here
  on flattened NumPy vectors. `ascent_training=False` runs the pass at w in
  inference mode. `esam_shards`: ESAM's data selection (config.sam.
  esam_gamma) within each of that many equal parts of the batch (the
  replicas'). Under config.dataset.mixup_alpha each of `mixup_shards`
  equal parts of the batch is mixed as replica i mixes its part. Returns the
  values of the trainable variables (or of `variables(model)`).
  """
  data = input_pipeline.load(config)
  keras.utils.set_random_seed(config.seed)
  from sam import models  # pylint: disable=g-import-not-at-top
  model = models.get_model(config.model.name, data.num_classes,
                           data.image_shape)
  batches = iter(input_pipeline.train_dataset(
      data, config, tf.distribute.InputContext()))
  wd = config.optimizer.weight_decay
  rho = config.sam.rho

  def loss_of(images, labels, training=True):
    logits = model(images, training=training)
    loss = tf.reduce_mean(
        tf.nn.softmax_cross_entropy_with_logits(labels, logits)
        if labels.dtype.is_floating else
        tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
    return loss + 0.5 * wd * sum(
        tf.reduce_sum(v**2) for v in model.trainable_variables
        if len(v.shape) > 1)

  shapes = [v.shape for v in model.trainable_variables]

  def flat(tensors):
    return np.concatenate([np.ravel(t) for t in tensors])

  def unflat(vector):
    return np.split(vector, np.cumsum([np.prod(s) for s in shapes])[:-1])

  direction = None
  for step in range(steps):
    images, labels = next(batches)
    if config.dataset.mixup_alpha:
      images, labels = _mixed(images, labels, data.num_classes, config, step,
                              mixup_shards)
    sam_step = rho and (sam_steps is None or step in sam_steps)
    with tf.GradientTape() as tape:
      loss = loss_of(images, labels, ascent_training or not sam_step)
    grads = tape.gradient(loss, model.trainable_variables)
    saved = [v.numpy() for v in model.trainable_variables]
    if sam_step:
      clean = flat(grads)
      norm = tf.linalg.global_norm(grads)
      # (Only for ESAM: a training-mode call updates batch-norm statistics.)
      before = esam_shards and _example_losses(model, images, labels)
      for v, g in zip(model.trainable_variables, grads):
        v.assign_add(rho * g / norm)
      if esam_shards:
        rise = np.split(_example_losses(model, images, labels) - before,
                        esam_shards)
        keep = int(len(rise[0]) * config.sam.esam_gamma)
        kept = np.concatenate([i * len(r) + np.argsort(-r)[:keep]
                               for i, r in enumerate(rise)])
        images, labels = tf.gather(images, kept), tf.gather(labels, kept)
      with tf.GradientTape() as tape:
        loss = loss_of(images, labels)
      grads = tape.gradient(loss, model.trainable_variables)
      g_s = flat(grads)
      direction = g_s - clean.dot(g_s) / clean.dot(clean) * clean
    elif looksam_alpha:
      g = flat(grads)
      g = g + looksam_alpha * (np.linalg.norm(g) /
                               np.linalg.norm(direction)) * direction
      grads = [x.reshape(s) for x, s in zip(unflat(g), shapes)]
    for v, s, g in zip(model.trainable_variables, saved, grads):
      v.assign(s - config.schedule.learning_rate * g)
  return [v.numpy() for v in (variables or (
      lambda m: m.trainable_variables))(model)]


def _mixed(images, labels, num_classes, config, step, shards):
  """The batch as `shards` replicas mix their parts at `step`: each rolled
  within itself, with the step's one lambda."""
  weight = mixup.draw_weight(config.dataset.mixup_alpha, config.seed, step)
  parts = [mixup.mix(x, y, num_classes, weight)
           for x, y in zip(tf.split(images, shards), tf.split(labels, shards))]
  return tuple(tf.concat(p, 0) for p in zip(*parts))


def _example_losses(model, images, labels):
  return tf.nn.sparse_softmax_cross_entropy_with_logits(
      labels, model(images, training=True)).numpy()


def _three_steps_match_manual(config, strategy, **manual):
  """The trainer's weights after 3 steps equal _manual_sam_sgd(config, 3,
  **manual)'s, which are returned."""
  trainer = _train(config, strategy, 3)
  want = _manual_sam_sgd(config, 3, **manual)
  for got, ref in zip(
      _values(trainer.state.model.trainable_variables, 0, strategy), want):
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
  return want


@pytest.mark.parametrize('num_replicas', [
    pytest.param(1, marks=pytest.mark.slow), 2])
def test_esam_data_selection_matches_manual_reference(mirrored, num_replicas):
  """ESAM's SDS: the pass at w + eps on each replica's half whose loss rose
  most, its loss the mean over all replicas' kept examples (beta = 1: every
  weight perturbed, by rho)."""
  config = tiny_config(**{'sam.rho': 0.5, 'optimizer.momentum': 0.0,
                          'sam.variant': 'esam', 'sam.esam_beta': 1.0,
                          'sam.esam_gamma': 0.5})
  want = _three_steps_match_manual(config, mirrored(num_replicas),
                                   esam_shards=num_replicas)
  # Not SAM on the whole batch.
  assert not all(np.allclose(a, b, atol=1e-4)
                 for a, b in zip(want, _manual_sam_sgd(config, 3)))


@pytest.mark.parametrize('num_replicas', [
    pytest.param(1, marks=pytest.mark.slow), 2])
def test_mixup_matches_manual_reference(mirrored, num_replicas):
  """Both SAM passes on each replica's mixed part, against soft targets."""
  config = tiny_config(**{'sam.rho': 0.5, 'optimizer.momentum': 0.0,
                          'dataset.mixup_alpha': 0.4})
  want = _three_steps_match_manual(config, mirrored(num_replicas),
                                   mixup_shards=num_replicas)
  config.dataset.mixup_alpha = 0.0
  assert not all(np.allclose(a, b, atol=1e-4)
                 for a, b in zip(want, _manual_sam_sgd(config, 3)))


def test_esam_data_selection_needs_the_training_mode_ascent():
  config = tiny_config(**{'sam.variant': 'esam',
                          'sam.ascent_mode': 'inference'})
  with pytest.raises(ValueError, match="ESAM's data selection needs "
                     "sam.ascent_mode='train'"):
    config_checks.validate_config(config, 1)
  config.sam.esam_gamma = 1.0
  config_checks.validate_config(config, 1)
  config.sam.ascent_mode, config.sam.esam_gamma = 'train', 0.1
  with pytest.raises(ValueError, match='it must keep at least one of the 8 '
                     'examples per replica'):
    config_checks.validate_config(config, 2)
  config.sam.variant = 'sam'  # Then esam_gamma plays no part.
  config_checks.validate_config(config, 2)


@pytest.mark.slow  # Fast: ESAM on 2 replicas in perturbations_test.
def test_esam_weight_perturbation_on_replicas_matches_single_device(mirrored):
  """SWP's draw is the same on every replica (one per step), and with
  beta < 1 it is not SAM."""
  config = tiny_config(**{'sam.rho': 0.1, 'sam.variant': 'esam',
                          'sam.esam_gamma': 1.0})
  one, _, _ = _assert_same_as_one_device(config, mirrored, 2, 3)
  config.sam.variant = 'sam'
  sam = _train(config, tf.distribute.get_strategy(), 3)
  assert not all(np.allclose(a, b, atol=1e-5) for a, b in zip(
      _values(one.state.model.variables), _values(sam.state.model.variables)))


@pytest.mark.parametrize('rho', [0.0, 0.1])
def test_matches_manual_reference(rho):
  """The trainer's SAM (functional) equals in-place perturb-and-restore."""
  config = tiny_config(**{'sam.rho': rho, 'optimizer.momentum': 0.0})
  trainer = _train(config, tf.distribute.get_strategy(), 3)
  for got, want in zip(_values(trainer.state.model.trainable_variables),
                       _manual_sam_sgd(config, 3)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_ascent_in_inference_mode_matches_manual_reference(shallow_resnet20):
  """sam.ascent_mode='inference': eps from the model in inference mode.

  The batch-norm statistics come from the one pass in training mode, at
  w + eps, so the reference's in-place statistics match too.
  """
  config = tiny_config(**{'sam.rho': 0.1, 'optimizer.momentum': 0.0,
                          'model.name': 'resnet20',
                          'sam.ascent_mode': 'inference'})
  trainer = _train(config, tf.distribute.get_strategy(), 2)
  def variables(model):
    return model.variables

  want = _manual_sam_sgd(config, 2, ascent_training=False,
                         variables=variables)
  for got, ref in zip(_values(trainer.state.model.variables), want):
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
  # Not what the training-mode ascent gives.
  train_mode = _manual_sam_sgd(config, 2, variables=variables)
  assert not all(np.allclose(a, b, atol=1e-5)
                 for a, b in zip(want, train_mode))


@pytest.mark.slow  # The draws themselves: models_shake_test (fast).
def test_sam_ascent_takes_the_true_gradient_of_shake_models():
  """The ascent gradient (its logged norm) is the SAM code's true gradient."""
  config = tiny_config(**{'model.name': 'shake_shake_26_2x32d',
                          'sam.rho': 0.05, 'optimizer.weight_decay': 0.0})
  trainer, iterator = _trainer(config, tf.distribute.get_strategy(), 1)
  model = trainer.state.model
  params = [tf.constant(v.numpy()) for v in model.trainable_variables]
  model_state = [tf.constant(v.numpy())
                 for v in model.non_trainable_variables]
  images, labels = next(iter(input_pipeline.train_dataset(
      input_pipeline.load(config), config, tf.distribute.InputContext())))

  def ascent_norm(true):
    with tf.GradientTape() as tape, true_gradient.true_gradient(true):
      tape.watch(params)
      logits, _ = model.stateless_call(params, model_state, images,
                                       training=True)
      loss = tf.reduce_mean(
          tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
    return float(tf.linalg.global_norm(tape.gradient(loss, params)))

  trainer.train_loop(iterator, tf.constant(1))
  logged = trainer.read_train_metrics()['train/grad_norm']
  assert logged == pytest.approx(ascent_norm(True), rel=1e-4)
  assert logged != pytest.approx(ascent_norm(False), rel=1e-2)


def test_rho_zero_is_plain_optimizer():
  """rho = 0 with SGD momentum equals a plain Keras tape-and-apply loop."""
  config = tiny_config(**{'sam.rho': 0.0})
  trainer = _train(config, tf.distribute.get_strategy(), 3)
  data = input_pipeline.load(config)
  keras.utils.set_random_seed(config.seed)
  from sam import models  # pylint: disable=g-import-not-at-top
  model = models.get_model('cnn', data.num_classes, data.image_shape)
  optimizer = keras.optimizers.SGD(0.05, momentum=0.9)
  batches = iter(input_pipeline.train_dataset(
      data, config, tf.distribute.InputContext()))
  for _ in range(3):
    images, labels = next(batches)
    with tf.GradientTape() as tape:
      logits = model(images, training=True)
      loss = tf.reduce_mean(
          tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
      loss += 0.5 * 5e-4 * sum(tf.reduce_sum(v**2)
                               for v in model.trainable_variables
                               if len(v.shape) > 1)
    optimizer.apply_gradients(
        zip(tape.gradient(loss, model.trainable_variables),
            model.trainable_variables))
  for got, want in zip(_values(trainer.state.model.trainable_variables),
                       _values(model.trainable_variables)):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_batch_norm_statistics_are_those_of_the_pass_at_w(shallow_resnet20):
  """The moving statistics after a SAM step: the first pass's, not w + eps's."""
  config = tiny_config(**{'model.name': 'resnet20', 'sam.rho': 0.5})
  trainer, iterator = _trainer(config, tf.distribute.get_strategy(), 1)
  model = trainer.state.model
  images, _ = next(iter(input_pipeline.train_dataset(
      input_pipeline.load(config), config, tf.distribute.InputContext())))
  _, want = model.stateless_call(
      [tf.constant(v.numpy()) for v in model.trainable_variables],
      [tf.constant(v.numpy()) for v in model.non_trainable_variables],
      images, training=True)
  trainer.train_loop(iterator, tf.constant(1))
  for got, ref in zip(model.non_trainable_variables, want):
    np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-5,
                               atol=1e-6, err_msg=got.path)


@pytest.mark.slow
def test_replicas_stay_identical_with_batch_norm(mirrored, shallow_resnet20):
  """Weights, BN moving statistics and optimizer slots match on replicas."""
  strategy = mirrored(2)
  config = tiny_config(**{'model.name': 'resnet20', 'sam.rho': 0.05})
  trainer = _train(config, strategy, 3)
  variables = trainer.state.model.variables + trainer.state.optimizer.variables
  moving = [v for v in trainer.state.model.non_trainable_variables]
  assert moving, 'resnet20 should have batch-norm moving statistics'
  for a, b in zip(_values(variables, 0, strategy),
                  _values(variables, 1, strategy)):
    np.testing.assert_array_equal(a, b)
  # The moving statistics did move (from the first pass).
  assert any(np.abs(v).max() > 0 for v in _values(moving, 0, strategy)
             if v.ndim == 1)


def _scalars(workdir):
  """{tag: {step: value}} from the TensorBoard event files in workdir."""
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  acc = event_accumulator.EventAccumulator(workdir)
  acc.Reload()
  return {tag: {e.step: float(tf.make_ndarray(e.tensor_proto))
                for e in acc.Tensors(tag)}
          for tag in acc.Tags()['tensors']}


@pytest.mark.slow
def test_resume_matches_uninterrupted(tmp_path, shallow_resnet20):
  config = tiny_config(**{'num_train_steps': 6, 'steps_per_loop': 4,
                          'model.name': 'resnet20'})
  straight = train.train_and_evaluate(config, str(tmp_path / 'a'))
  half = tiny_config(**{'num_train_steps': 3, 'steps_per_loop': 4,
                        'model.name': 'resnet20'})
  train.train_and_evaluate(half, str(tmp_path / 'b'))
  resumed = train.train_and_evaluate(config, str(tmp_path / 'b'))
  assert resumed['step'] == straight['step'] == 6
  reader_a = tf.train.load_checkpoint(str(tmp_path / 'a' / 'checkpoints'))
  reader_b = tf.train.load_checkpoint(str(tmp_path / 'b' / 'checkpoints'))
  names = [n for n in reader_a.get_variable_to_shape_map()
           if 'VARIABLE_VALUE' in n and 'save_counter' not in n]
  assert any('model' in n for n in names)
  for name in names:  # Bitwise: resuming changes nothing.
    np.testing.assert_array_equal(reader_a.get_tensor(name),
                                  reader_b.get_tensor(name), err_msg=name)
  logged_a, logged_b = _scalars(str(tmp_path / 'a')), _scalars(
      str(tmp_path / 'b'))
  for tag in ('train/loss', 'train/accuracy', 'train/perturbed_loss'):
    assert sorted(logged_a[tag]) == list(range(1, 7))
    for step, value in logged_a[tag].items():
      np.testing.assert_allclose(logged_b[tag][step], value, rtol=1e-5,
                                 err_msg=f'{tag} at step {step}')
  assert straight['eval/accuracy'] == pytest.approx(resumed['eval/accuracy'])


@pytest.mark.slow  # What it writes: the resume tests here and main_test.
def test_end_to_end_learns_and_writes_workdir(tmp_path, shallow_resnet20):
  """A trivially learnable set reaches ~100% with SAM; the workdir is full."""
  config = tiny_config(**{
      'model.name': 'resnet20', 'sam.rho': 0.05, 'num_train_steps': 60,
      'steps_per_loop': 10, 'log_every_steps': 10, 'eval_every_steps': 30,
      'checkpoint_every_steps': 30, 'dataset.synthetic_image_shape': (
          16, 16, 3), 'dataset.synthetic_train_size': 512, 'batch_size': 32,
      'schedule.name': 'cosine'})
  workdir = str(tmp_path)
  results = train.train_and_evaluate(config, workdir)
  assert results['eval/accuracy'] >= 0.97
  assert results['eval/examples'] == 40  # Every test example exactly once.
  with open(os.path.join(workdir, 'results.json')) as f:
    assert json.load(f)['step'] == 60
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['sam']['rho'] == 0.05
  assert tf.train.latest_checkpoint(os.path.join(workdir, 'checkpoints'))
  logged = _scalars(workdir)
  assert sorted(logged['eval/accuracy']) == [30, 60]
  for tag in ('train/loss', 'train/perturbed_loss', 'train/sharpness',
              'train/grad_norm', 'train/learning_rate'):
    assert sorted(logged[tag]) == [10, 20, 30, 40, 50, 60], tag


@pytest.mark.parametrize('field,value,message', [
    ('model.name', 'resnet7', 'config.model.name'),
    ('dataset.name', 'imagenet', 'config.dataset.name'),
    ('sam.rho', -0.1, 'config.sam.rho'),
    ('sam.variant', 'samm', "config.sam.variant='samm'"),
    ('sam.inner_group_size', 3, 'config.sam.inner_group_size=3'),
    ('sam.ascent_steps', 0, 'config.sam.ascent_steps=0'),
    ('sam.accumulate_micro_batches', True, 'set sam.micro_batch_size too'),
    ('batch_size', 15, 'config.batch_size'),
    ('optimizer.name', 'rmsprop', 'config.optimizer.name'),
    ('sam.looksam_alpha', 0.7, 'sam.every_k_steps > 1'),
    ('dtype_policy', 'float16', 'config.dtype_policy'),
    ('loss_scale.initial', 0.0, 'config.loss_scale.initial'),
    ('sam.rho', float('inf'), 'config.sam.rho=inf'),
    ('sam.esam_beta', 0.0, 'config.sam.esam_beta=0.0'),
    ('sam.rho_schedule', 'learning_rate', 'a learning rate that decays'),
    ('sam.rho_min', 0.1, 'config.sam.rho_min=0.1 is invalid: it must be in'),
    ('sam.esam_gamma', 1.5, 'config.sam.esam_gamma=1.5 is invalid'),
    ('dataset.mixup_alpha', -0.2, 'config.dataset.mixup_alpha=-0.2'),
    ('dataset.randaugment_layers', 2, "RandAugment follows the crop and flip "
     "of dataset.augment 'basic'"),
    ('dataset.randaugment_magnitude', 11,
     'config.dataset.randaugment_magnitude=11'),
    ('schedule.learning_rate', float('inf'), 'config.schedule.learning_rate'),
    ('schedule.linear_end', 1.5, 'config.schedule.linear_end=1.5'),
    ('num_train_steps', 0, 'config.num_train_steps=0'),
    ('seed', -1, 'config.seed=-1'),
    ('keep_checkpoints', 0, 'config.keep_checkpoints=0'),
    # Found once the data is loaded, still before the model is built.
    ('batch_size', 128, 'config.batch_size=128 is invalid: the training set '
     'has 64 examples'),
    ('dataset.validation_size', 64, 'config.dataset.validation_size=64'),
])
def test_bad_config_fails_before_training(mirrored, tmp_path, field, value,
                                          message):
  config = tiny_config(**{field: value})
  with pytest.raises(ValueError, match=message.replace('.', r'\.')):
    train.train_and_evaluate(config, str(tmp_path), mirrored(2))
  assert not os.path.exists(tmp_path / 'checkpoints')


def test_missing_data_names_where_it_looked(tmp_path):
  config = tiny_config(**{'dataset.name': 'fashion_mnist',
                          'dataset.data_dir': str(tmp_path / 'nowhere')})
  with pytest.raises(input_pipeline.DataNotFoundError,
                     match='config.dataset.data_dir') as e:
    train.train_and_evaluate(config, str(tmp_path / 'w'))
  assert 'nowhere' in str(e.value)
  assert not os.path.exists(tmp_path / 'w' / 'checkpoints')


def test_clipping_uses_the_cross_replica_norm(mirrored):
  """One SGD step of a clipped gradient moves w by exactly lr * clip."""
  clip = 1e-3
  config = tiny_config(**{'sam.rho': 0.0, 'optimizer.momentum': 0.0,
                          'optimizer.grad_clip_norm': clip})
  strategy = mirrored(2)
  data = input_pipeline.load(config)
  before = Trainer(config, tf.distribute.get_strategy(),
                         data.num_classes, data.image_shape, 4, 4)
  initial = _values(before.state.model.trainable_variables)
  after = _train(config, strategy, 1)
  moved = np.sqrt(sum(((a - b)**2).sum() for a, b in zip(
      _values(after.state.model.trainable_variables, 0, strategy), initial)))
  # float32 round-off of w - w' limits the precision; clipping per replica
  # would be off by a factor of about sqrt(2).
  np.testing.assert_allclose(moved, config.schedule.learning_rate * clip,
                             rtol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize('all_params', [False, True])
def test_decoupled_weight_decay_shrinks_kernels_only(all_params,
                                                     shallow_resnet20):
  """One step: w = w0 - lr * g - lr * wd * w0 on kernels; BN: no decay.

  Unless optimizer.decay_all_params, which decays batch norm's gamma too.
  """
  def one_step(weight_decay):
    config = tiny_config(**{'sam.rho': 0.0, 'optimizer.momentum': 0.0,
                            'model.name': 'resnet20',
                            'optimizer.weight_decay': weight_decay,
                            'optimizer.weight_decay_type': 'decoupled',
                            'optimizer.decay_all_params': all_params})
    trainer = _train(config, tf.distribute.get_strategy(), 1)
    return _values(trainer.state.model.trainable_variables)

  config = tiny_config(**{'model.name': 'resnet20'})
  data = input_pipeline.load(config)
  initial = _values(Trainer(config, tf.distribute.get_strategy(),
                            data.num_classes, data.image_shape, 4,
                            4).state.model.trainable_variables)
  decayed, plain = one_step(0.1), one_step(0.0)
  lr = config.schedule.learning_rate
  assert any(w0.ndim == 1 and w0.any() for w0 in initial)  # gamma = 1.
  for w0, got, want in zip(initial, decayed, plain):
    if w0.ndim > 1 or all_params:
      np.testing.assert_allclose(got, want - lr * 0.1 * w0, atol=1e-6)
    else:
      np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize('name,step,want', [
    ('constant', 0, 0.01), ('constant', 4, 0.05), ('constant', 99, 0.1),
    ('cosine', 9, 0.1), ('cosine', 55, 0.05), ('cosine', 100, 0.0),
    ('step', 9, 0.1), ('step', 30, 0.02), ('step', 60, 0.004),
    # Linear from 0.1 at step 10 to 0.1 * linear_end = 0.01 at step 100.
    ('linear', 4, 0.05), ('linear', 9, 0.1), ('linear', 55, 0.055),
    ('linear', 100, 0.01),
])
def test_schedules(name, step, want):
  # 10 warm-up steps: step s < 10 gets (s + 1) / 10 of the peak.
  schedule = optim.Schedule(name, 0.1, warmup_steps=10, total_steps=100,
                            boundaries=(30, 60), decay_factor=0.2,
                            linear_end=0.1)
  np.testing.assert_allclose(float(schedule(step)), want, atol=1e-7)


@pytest.mark.parametrize('name,step,want', [
    # Cosine from 0.1 to 0: rho from 0.2 to 0.02 (the learning rate's
    # fraction of the way from 0 to 0.1), rising with the warm-up.
    ('cosine', 0, 0.02 + 0.18 * 0.1), ('cosine', 9, 0.2),
    ('cosine', 55, 0.11), ('cosine', 100, 0.02),
    # Steps 0.1, 0.02, 0.004: lr_min is 0.004.
    ('step', 0, 0.02 + 0.18 * 0.006 / 0.096), ('step', 9, 0.2),
    ('step', 30, 0.02 + 0.18 * 0.016 / 0.096), ('step', 60, 0.02),
    # Linear from 0.1 to 0.01: halfway at step 55.
    ('linear', 9, 0.2), ('linear', 55, 0.11), ('linear', 100, 0.02),
])
def test_rho_follows_the_learning_rate(name, step, want):
  config = tiny_config(**{'sam.rho': 0.2, 'sam.rho_min': 0.02,
                          'sam.rho_schedule': 'learning_rate'})
  schedule = optim.Schedule(name, 0.1, warmup_steps=10, total_steps=100,
                            boundaries=(30, 60), decay_factor=0.2,
                            linear_end=0.1)
  np.testing.assert_allclose(float(optim.sam_rho(config, schedule, step)),
                             want, rtol=1e-5)
  # A warm-up below lr_min leaves rho at rho_min; 'constant' is sam.rho.
  slow = optim.Schedule('step', 0.1, warmup_steps=1000, total_steps=2000,
                        boundaries=(1500,), decay_factor=0.2)
  np.testing.assert_allclose(float(optim.sam_rho(config, slow, 0)), 0.02)
  config.sam.rho_schedule = 'constant'
  assert optim.sam_rho(config, schedule, step) == 0.2


def test_the_step_takes_the_scheduled_rho(tmp_path):
  """At step 0 of a 4-step warm-up, rho is a quarter of the way up."""
  def weights(**fields):
    config = tiny_config(**{'schedule.name': 'cosine',
                            'schedule.warmup_epochs': 1.0, **fields})
    trainer = _train(config, tf.distribute.get_strategy(), 1)
    return trainer, _values(trainer.state.model.trainable_variables)

  trainer, scheduled = weights(**{'sam.rho': 0.4, 'sam.rho_min': 0.0,
                                  'sam.rho_schedule': 'learning_rate'})
  _, constant = weights(**{'sam.rho': 0.1})
  _, at_max = weights(**{'sam.rho': 0.4})
  for a, b in zip(scheduled, constant):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert not all(np.allclose(a, b) for a, b in zip(scheduled, at_max))
  assert trainer.read_train_metrics()['train/rho'] == pytest.approx(0.1)


# TensorFlow 2.16's XLA on CPU compiled ViT-Ti/16's step for over 7 minutes
# at 9 GB of memory (ResNet-50's over 10 minutes, in CI); 2.21 takes 71 s.
_SLOW_XLA_BEFORE_2_20 = pytest.mark.skipif(
    tuple(map(int, tf.__version__.split('.')[:2])) < (2, 20),
    reason="TensorFlow 2.16's XLA compiles it for over 7 minutes")


@pytest.mark.slow
@requires_xla_cpu
@pytest.mark.parametrize('model,side,atol', [
    ('resnet20', 8, 5e-5), ('wrn16_4', 8, 5e-5), ('cnn', 8, 5e-5),
    # 53 layers, batch norm over 16 values at 1 x 1 in the last stage: a
    # few weights differ by up to 2e-4 (of the zero-initialized gammas,
    # which two steps move by about 5e-4): it compiles, and runs alike.
    pytest.param('resnet50', 32, 1e-3, marks=_SLOW_XLA_BEFORE_2_20),
    pytest.param('vit_ti16', 32, 5e-5, marks=_SLOW_XLA_BEFORE_2_20),
    pytest.param('mixer_s16', 32, 5e-5, marks=_SLOW_XLA_BEFORE_2_20)])
def test_xla_step_matches_graph_step(model, side, atol,
                                    shallow_imagenet_models,
                                    shallow_resnet20):
  """The whole replica step (two SAM passes, update, metrics) compiles."""
  results = {}
  for jit in ('true', 'false'):
    config = tiny_config(**{'model.name': model, 'jit_compile': jit,
                            'sam.rho': 0.05, 'optimizer.grad_clip_norm': 1.0,
                            'dataset.synthetic_image_shape': (side, side, 3)})
    trainer = _train(config, tf.distribute.get_strategy(), 2)
    assert trainer.jit_compile == (jit == 'true')
    data = input_pipeline.load(config)
    dataset = tf.distribute.get_strategy().distribute_datasets_from_function(
        lambda ctx, data=data, config=config: input_pipeline.eval_dataset(
            data, config, ctx))
    results[jit] = (_values(trainer.state.model.variables),
                    trainer.state.train_sums.numpy(),
                    trainer.evaluate(dataset, input_pipeline.num_eval_steps(
                        data, config.eval_batch_size)))
  # XLA fuses and reorders float sums (and expands the fused batch-norm
  # gradient into its own ops): after two SAM steps the weights agree to
  # about 2e-5 and the gradient norms to about 2e-4, not bit for bit.
  for a, b in zip(results['true'][0], results['false'][0]):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=atol)
  np.testing.assert_allclose(results['true'][1], results['false'][1],
                             rtol=1e-3)
  for key, value in results['false'][2].items():
    assert results['true'][2][key] == pytest.approx(value, rel=1e-3), key


def test_validation_metrics_are_logged(tmp_path):
  config = tiny_config(**{'dataset.validation_size': 16,
                          'num_train_steps': 2})
  results = train.train_and_evaluate(config, str(tmp_path))
  assert results['val/examples'] == 16 and results['eval/examples'] == 40
  assert 'val/accuracy' in _scalars(str(tmp_path))


def test_looksam_reuses_the_direction_between_sam_steps():
  config = tiny_config(**{'sam.rho': 0.1, 'optimizer.momentum': 0.0,
                          'sam.every_k_steps': 3, 'sam.looksam_alpha': 0.7})
  trainer = _train(config, tf.distribute.get_strategy(), 4)
  want = _manual_sam_sgd(config, 4, sam_steps=(0, 3), looksam_alpha=0.7)
  weights = _values(trainer.state.model.trainable_variables)
  for got, expected in zip(weights, want):
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
  # The reuse changed the update (the test would pass vacuously otherwise).
  plain = _manual_sam_sgd(config, 4, sam_steps=(0, 3))
  assert not all(np.allclose(a, b, atol=1e-6) for a, b in zip(want, plain))


@pytest.mark.slow  # Fast: SAM on replicas above, every k steps below.
@pytest.mark.parametrize('looksam_alpha', [0.0, 0.7])
def test_every_k_steps_on_replicas_matches_single_device(mirrored,
                                                         looksam_alpha):
  """SAM every 2nd step, plain or LookSAM in between, on 2 replicas."""
  config = tiny_config(**{'sam.rho': 0.1, 'sam.every_k_steps': 2,
                          'sam.looksam_alpha': looksam_alpha})
  one, many, strategy = _assert_same_as_one_device(config, mirrored, 2, 4)
  for a, b in zip(_values(one.state.looksam_direction),
                  _values(many.state.looksam_direction, 1, strategy)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('variant', [
    'fsam', pytest.param('msam', marks=pytest.mark.slow)])
def test_stateful_variants_on_replicas_match_single_device(mirrored, variant):
  """F-SAM's and MSAM's momentum: one for all replicas, as on one device."""
  config = tiny_config(**{'sam.rho': 0.1, 'sam.variant': variant})
  one, many, strategy = _assert_same_as_one_device(config, mirrored, 2, 3)
  assert one.state.sam_state
  for a, b in zip(_values(one.state.sam_state),
                  _values(many.state.sam_state, 1, strategy)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert any(np.abs(v).max() > 0 for v in _values(one.state.sam_state))


def test_msam_momentum_is_the_sgd_velocity():
  """MSAM's v, computed another way: Keras SGD's velocity is -lr v."""
  config = tiny_config(**{'sam.rho': 0.1, 'sam.variant': 'msam'})
  trainer = _train(config, tf.distribute.get_strategy(), 3)
  optimizer = trainer.state.optimizer
  for variable, v in zip(trainer.state.model.trainable_variables,
                         _values(trainer.state.sam_state)):
    velocity = optimizer.momentums[optimizer._get_variable_index(variable)]  # pylint: disable=protected-access
    np.testing.assert_allclose(v, -velocity.numpy() / 0.05, rtol=1e-4,
                               atol=1e-6)


def test_fsam_with_sigma_0_is_sam():
  """F-SAM ascends along g - sigma m: sigma = 0 is SAM, sigma = 1 is not."""
  def weights(**overrides):
    config = tiny_config(**{'sam.rho': 0.1, **overrides})
    return _values(_train(config, tf.distribute.get_strategy(), 3)
                   .state.model.trainable_variables)
  sam_weights = weights()
  for a, b in zip(weights(**{'sam.variant': 'fsam', 'sam.fsam_sigma': 0.0}),
                  sam_weights):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert not all(np.allclose(a, b, atol=1e-6) for a, b in zip(
      weights(**{'sam.variant': 'fsam'}), sam_weights))


@pytest.mark.parametrize('overrides,saved', [
    ({'sam.variant': 'fsam'}, 'sam_state/'),
    pytest.param({'sam.variant': 'msam'}, 'sam_state/',
                 marks=pytest.mark.slow),
    pytest.param({'dataset.label_noise': 0.4}, 'noise_sums/',
                 marks=pytest.mark.slow)])
def test_resume_keeps_variant_state_and_noise_sums(tmp_path, overrides,
                                                    saved):
  """F-SAM's, MSAM's momentum and the label-noise sums are in the
  checkpoint: 2 + 2 steps equal 4 steps."""
  overrides = {'sam.rho': 0.1, 'steps_per_loop': 2, **overrides}
  straight = tiny_config(**overrides)
  train.train_and_evaluate(straight, str(tmp_path / 'a'))
  train.train_and_evaluate(tiny_config(**overrides, num_train_steps=2),
                           str(tmp_path / 'b'))
  train.train_and_evaluate(straight, str(tmp_path / 'b'))
  reader_a, reader_b = (tf.train.load_checkpoint(str(tmp_path / d /
                                                     'checkpoints'))
                        for d in 'ab')
  names = [n for n in reader_a.get_variable_to_shape_map()
           if 'VARIABLE_VALUE' in n and 'save_counter' not in n]
  assert any(n.startswith(saved) for n in names)
  for name in names:  # Bitwise: resuming changes nothing.
    np.testing.assert_array_equal(reader_a.get_tensor(name),
                                  reader_b.get_tensor(name), err_msg=name)


@pytest.mark.parametrize('num_replicas', [
    1, pytest.param(2, marks=pytest.mark.slow)])
def test_label_noise_splits_the_train_metrics(mirrored, num_replicas):
  """Clean and flipped examples apart: weighted, they give the whole."""
  config = tiny_config(**{'dataset.label_noise': 0.4, 'sam.rho': 0.1,
                          'optimizer.weight_decay': 0.0})
  metrics = _train(config, mirrored(num_replicas), 4).read_train_metrics()
  flipped = metrics['train/flipped_fraction']
  assert flipped == 26 / 64  # One epoch: round(0.4 * 64) of 64 examples.
  for name in ('accuracy', 'loss'):
    assert metrics[f'train/{name}'] == pytest.approx(
        (1 - flipped) * metrics[f'train/clean_{name}'] +
        flipped * metrics[f'train/flipped_{name}'], rel=1e-5)
  assert 'train/flipped_fraction' not in _train(
      tiny_config(), mirrored(num_replicas), 1).read_train_metrics()


@pytest.mark.parametrize('field,value', [
    ('sam.ascent_steps', 2), ('sam.sync_perturbation', False),
    ('sam.micro_batch_size', 4)])
def test_stateful_variant_with_per_replica_eps_is_one_line(field, value):
  config = tiny_config(**{'sam.variant': 'fsam', field: value})
  with pytest.raises(ValueError, match="config.sam: variant 'fsam' keeps one "
                     'state for all replicas'):
    config_checks.validate_config(config, 2)


def test_sam_every_k_steps_alternates_with_plain_steps():
  config = tiny_config(**{'sam.rho': 0.1, 'optimizer.momentum': 0.0,
                          'sam.every_k_steps': 2})
  trainer = _train(config, tf.distribute.get_strategy(), 4)
  for got, want in zip(_values(trainer.state.model.trainable_variables),
                       _manual_sam_sgd(config, 4, sam_steps=(0, 2))):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('calls', [
    *(pytest.param(c, marks=pytest.mark.slow)
      for c in [(7,), (4, 3), (1, 2, 4)]), (2, 1, 1, 3)])
def test_sam_every_k_steps_counts_across_loop_calls(calls):
  """SAM at steps 0, 3, 6 however the 7 steps are split into loop calls."""
  config = tiny_config(**{'sam.rho': 0.1, 'optimizer.momentum': 0.0,
                          'sam.every_k_steps': 3})
  trainer, iterator = _trainer(config, tf.distribute.get_strategy(), 7)
  for steps in calls:
    trainer.train_loop(iterator, tf.constant(steps))
  assert trainer.step == 7
  for got, want in zip(_values(trainer.state.model.trainable_variables),
                       _manual_sam_sgd(config, 7, sam_steps=(0, 3, 6))):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize('num_replicas', [2, 4])
def test_micro_batches_are_the_same_on_any_replica_count(mirrored, num_replicas,
                                                         shallow_resnet20):
  """m = 4: the same 4-example micro-batches, however they are placed."""
  config = tiny_config(**{'sam.rho': 0.1, 'sam.micro_batch_size': 4,
                          'model.name': 'resnet20'})
  one, _, _ = _assert_same_as_one_device(
      config, mirrored, num_replicas, 2,
      variables=lambda t: t.state.model.trainable_variables)
  plain = _train(tiny_config(**{'sam.rho': 0.1, 'model.name': 'resnet20'}),
                 mirrored(1), 2)
  assert not np.allclose(_values(one.state.model.trainable_variables)[0],
                         _values(plain.state.model.trainable_variables)[0])


def test_gsam_runs_in_the_trainer(mirrored):
  config = tiny_config(**{'sam.rho': 0.1, 'sam.gsam_alpha': 0.2})
  _assert_same_as_one_device(
      config, mirrored, 2, 2,
      variables=lambda t: t.state.model.trainable_variables)


@pytest.mark.slow
def test_ema_of_weights(mirrored, shallow_resnet20):
  decay = 0.5
  config = tiny_config(**{'ema_decay': decay, 'model.name': 'resnet20'})
  strategy = mirrored(2)
  data = input_pipeline.load(config)
  trainer = Trainer(config, strategy, data.num_classes,
                          data.image_shape, 4, 4)
  iterator = iter(strategy.distribute_datasets_from_function(
      lambda ctx: input_pipeline.train_dataset(data, config, ctx)))
  variables = (trainer.state.model.trainable_variables +
               trainer.state.model.non_trainable_variables)
  want = _values(variables, 0, strategy)
  for _ in range(3):
    trainer.train_loop(iterator, tf.constant(1))
    want = [decay * w + (1 - decay) * v
            for w, v in zip(want, _values(variables, 0, strategy))]
  averages = trainer.state.ema[0] + trainer.state.ema[1]
  for replica in (0, 1):
    got = [strategy.experimental_local_results(a)[replica].numpy()
           for a in averages]
    for g, w in zip(got, want):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
  dataset = strategy.distribute_datasets_from_function(
      lambda ctx: input_pipeline.eval_dataset(data, config, ctx))
  steps = input_pipeline.num_eval_steps(data, config.eval_batch_size)
  plain = trainer.evaluate(dataset, steps)
  ema = trainer.evaluate(dataset, steps, 'ema_eval', ema=True)
  assert ema['ema_eval/examples'] == 40
  assert ema['ema_eval/loss'] != pytest.approx(plain['eval/loss'])


def test_top5_accuracy_for_100_classes(tmp_path):
  config = tiny_config(**{'dataset.synthetic_num_classes': 100,
                          'num_train_steps': 2})
  results = train.train_and_evaluate(config, str(tmp_path))
  assert results['eval/top5_accuracy'] >= results['eval/accuracy']
  assert 'eval/top5_accuracy' not in train.train_and_evaluate(
      tiny_config(**{'num_train_steps': 2}), str(tmp_path / 'ten'))


@pytest.mark.slow
def test_mixed_bfloat16_computes_in_bfloat16_with_float32_weights(
    shallow_resnet20):
  config = tiny_config(**{'model.name': 'resnet20', 'sam.rho': 0.05})
  full = _train(config, tf.distribute.get_strategy(), 3)
  config.dtype_policy = 'mixed_bfloat16'
  mixed = _train(config, tf.distribute.get_strategy(), 3)
  # The policy applies to this model only, not to later ones.
  assert keras.config.dtype_policy().name == 'float32'
  assert mixed.state.model.get_layer('stem_conv').compute_dtype == 'bfloat16'
  assert mixed.state.model.get_layer('logits').compute_dtype == 'float32'
  assert all(v.dtype == 'float32' for v in mixed.state.model.variables)
  assert all(v.dtype in ('float32', 'int64')
             for v in mixed.state.optimizer.variables)
  sums = mixed.state.train_sums.numpy()
  assert np.isfinite(sums).all()
  # Close to the float32 run (the same data and initialization), yet not
  # equal: bfloat16 keeps 8 bits of mantissa. (Losses and grad norm; the
  # count of correct predictions may differ by one.)
  np.testing.assert_allclose(sums[:3], full.state.train_sums.numpy()[:3],
                             rtol=0.05)
  got, want = (np.concatenate([v.ravel() for v in _values(
      t.state.model.trainable_variables)]) for t in (mixed, full))
  assert 1e-5 < np.linalg.norm(got - want) / np.linalg.norm(want) < 0.05


@pytest.mark.slow
def test_mixed_float16_tracks_float32_with_loss_scaling(shallow_resnet20):
  config = tiny_config(**{'model.name': 'resnet20', 'sam.rho': 0.05,
                          'loss_scale.growth_steps': 2})
  full = _train(config, tf.distribute.get_strategy(), 3)
  config.dtype_policy = 'mixed_float16'
  mixed = _train(config, tf.distribute.get_strategy(), 3)
  assert mixed.state.model.get_layer('stem_conv').compute_dtype == 'float16'
  assert all(v.dtype in ('float32', 'int64')
             for v in (*mixed.state.model.variables,
                       *mixed.state.optimizer.variables))
  sums = dict(zip(state_lib.TRAIN_FIELDS, mixed.state.train_sums.numpy()))
  assert sums['skipped'] == 0
  # Two finite steps in a row doubled the scale once; one more counted.
  assert mixed.state.loss_scale.numpy() == 2.0**16
  assert mixed.state.good_steps.numpy() == 1
  # Unscaled: close to the float32 run (as the bfloat16 test above).
  np.testing.assert_allclose(mixed.state.train_sums.numpy()[:3],
                             full.state.train_sums.numpy()[:3], rtol=0.05)
  got, want = (np.concatenate([v.ravel() for v in _values(
      t.state.model.trainable_variables)]) for t in (mixed, full))
  assert 1e-6 < np.linalg.norm(got - want) / np.linalg.norm(want) < 0.05


@pytest.mark.slow
@pytest.mark.parametrize('num_replicas', [1, 2])
@pytest.mark.parametrize('looksam', [False, True])
def test_loss_scaling_skips_overflowing_steps(mirrored, num_replicas,
                                              looksam, shallow_resnet20):
  """A scale that overflows float16 changes nothing but step and scale."""
  config = tiny_config(**{
      'model.name': 'resnet20', 'sam.rho': 0.05, 'dtype_policy':
      'mixed_float16', 'loss_scale.initial': 2.0**24,
      'optimizer.momentum': 0.9, 'ema_decay': 0.5})
  if looksam:
    config.sam.every_k_steps = 2
    config.sam.looksam_alpha = 0.7
  strategy = mirrored(num_replicas)
  trainer, iterator = _trainer(config, strategy, 100)

  def state(replica=0):
    return _values([*trainer.state.model.variables,
                    *trainer.state.optimizer.variables[1:],
                    *trainer.state.looksam_direction,
                    *trainer.state.ema[0]], replica, strategy)

  # Averages away from the weights, so that an update would show.
  for average in trainer.state.ema[0]:
    average.assign(tf.zeros_like(average))
  before = state()
  trainer.train_loop(iterator, tf.constant(2))  # A SAM and a LookSAM step.
  for a, b in zip(before, state()):
    np.testing.assert_array_equal(a, b)
  assert trainer.step == 2
  assert trainer.state.loss_scale.numpy() == 2.0**22
  metrics = trainer.read_train_metrics()
  assert metrics['train/skipped_steps'] == 2
  assert metrics['train/loss_scale'] == 2.0**22
  # Means over applied steps only: there were none.
  assert 'train/loss' not in metrics and 'train/grad_norm' not in metrics
  # The scale comes down until the gradients fit in float16; then training
  # goes on (the replicas' copies stay identical).
  trainer.train_loop(iterator, tf.constant(20))
  assert trainer.step == 22
  metrics = trainer.read_train_metrics()
  assert 0 < metrics['train/skipped_steps'] < 20
  assert metrics['train/loss_scale'] < 2.0**20
  assert all(np.isfinite(metrics[f'train/{key}']) for key in (
      'loss', 'perturbed_loss', 'grad_norm', 'accuracy'))
  after = state()
  assert any(not np.array_equal(a, b) for a, b in zip(before, after))
  assert all(np.isfinite(a).all() for a in after)
  for a, b in zip(after, state(1) if num_replicas > 1 else after):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
@requires_xla_cpu
def test_loss_scaling_skips_under_xla(mirrored, shallow_resnet20):
  """The skip (a cond, and merge_call under MirroredStrategy) compiles."""
  config = tiny_config(**{
      'model.name': 'resnet20', 'sam.rho': 0.05, 'jit_compile': 'true',
      'dtype_policy': 'mixed_float16', 'loss_scale.initial': 2.0**40})
  initial = _train(config, mirrored(1), 0)
  trainer = _train(config, mirrored(1), 3)
  assert trainer.jit_compile
  assert trainer.step == 3
  assert trainer.state.loss_scale.numpy() == 2.0**37
  for a, b in zip(_values(initial.state.model.variables),
                  _values(trainer.state.model.variables)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_every_k_metrics_are_means_over_the_sam_steps(tmp_path):
  """With SAM every 2nd step, a logged interval of 2 steps holds one SAM
  step: its perturbed loss, sharpness and norm are that step's, as logged
  at every step (the plain steps have none)."""
  def scalars(name, **overrides):
    config = tiny_config(**{'sam.rho': 0.1, 'sam.every_k_steps': 2,
                            'num_train_steps': 4, **overrides})
    train.train_and_evaluate(config, str(tmp_path / name))
    return _scalars(str(tmp_path / name))

  every_step = scalars('a', log_every_steps=1, steps_per_loop=1)
  every_2nd = scalars('b', log_every_steps=2, steps_per_loop=2)
  for tag in ('train/perturbed_loss', 'train/sharpness', 'train/grad_norm'):
    assert set(every_step[tag]) == {1, 3}  # The SAM steps (0 and 2 done).
    for sam_step, logged in ((1, 2), (3, 4)):
      np.testing.assert_allclose(every_2nd[tag][logged],
                                 every_step[tag][sam_step], rtol=1e-5)
  assert every_step['train/grad_norm'][1] > 0


@pytest.mark.parametrize('field', ['sam.adaptive', 'sam.variant'])
def test_asam_logs_the_norm_of_t_g_by_its_name(field):
  config = tiny_config(**{'sam.rho': 0.5,
                          field: True if field == 'sam.adaptive' else 'asam'})
  metrics = _train(config, tf.distribute.get_strategy(), 2).read_train_metrics()
  assert metrics['train/asam_grad_norm'] > 0
  assert 'train/grad_norm' not in metrics


def _official_sam_steps(weights, batches, num_replicas, config):
  """google-research/sam's `train_step` (sam_jax/training_utils/
  flax_training.py, at dae9904), written again in JAX for the tiny convnet:
  the loss is the replica's mean cross-entropy plus 0.5 wd ||w||^2 over
  every parameter (biases included); with sync_perturbations=False (its
  default) each replica perturbs by rho g / ||g|| of its own gradient
  (`dual_vector`, no guard); the gradients at w + eps are averaged over the
  replicas (`pmean`), clipped by their global norm (`clip_by_global_norm`,
  its gradient_clipping) and applied by flax's Momentum with nesterov=True
  (v = beta v + g; w -= lr (g + beta v))."""
  jax = pytest.importorskip('jax')
  jnp = jax.numpy
  wd, rho = config.optimizer.weight_decay, config.sam.rho
  lr, beta = config.schedule.learning_rate, config.optimizer.momentum
  clip = config.optimizer.grad_clip_norm

  def forward(w, x):
    for kernel, bias in (w[0:2], w[2:4]):
      x = jax.nn.relu(jax.lax.conv_general_dilated(
          x, kernel, (1, 1), 'SAME',
          dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + bias)
      x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1),
                                (1, 2, 2, 1), 'VALID')
    x = jax.nn.relu(x.reshape(len(x), -1) @ w[4] + w[5])
    return x @ w[6] + w[7]

  def loss(w, x, y):
    log_p = jax.nn.log_softmax(forward(w, x))
    cross_entropy = -jnp.mean(log_p[jnp.arange(len(y)), y])
    return cross_entropy + wd * 0.5 * sum(jnp.sum(p**2) for p in w)

  def norm(tree):
    return jnp.sqrt(sum(jnp.sum(t**2) for t in tree))

  w = [jnp.asarray(p) for p in weights]
  velocity = [jnp.zeros_like(p) for p in w]
  for images, labels in batches:
    grads = []
    for x, y in zip(np.split(images, num_replicas),
                    np.split(labels, num_replicas)):
      g = jax.grad(loss)(w, x, y)
      noised = [p + rho * d / norm(g) for p, d in zip(w, g)]
      grads.append(jax.grad(loss)(noised, x, y))
    g = [sum(parts) / num_replicas for parts in zip(*grads)]
    g_norm = norm(g)
    if clip > 0:
      g = [jnp.where(g_norm < clip, d, d / g_norm * clip) for d in g]
    velocity = [beta * v + d for v, d in zip(velocity, g)]
    w = [p - lr * (d + beta * v) for p, d, v in zip(w, g, velocity)]
  return [np.asarray(p) for p in w]


@pytest.mark.slow  # 15 to 30 s a case; the harness has the rule's fast cases.
@pytest.mark.parametrize('clip', [5.0, 0.0])
@pytest.mark.parametrize('num_replicas', [1, 2, 4])
def test_steps_are_those_of_the_official_sam_code(mirrored, num_replicas,
                                                  clip):
  """The official code's defaults (eps per replica, L2 on every parameter
  inside the loss SAM sees, clipping of the averaged gradient, Nesterov
  momentum): our steps equal its train_step's, with its clipping at 5
  (which acts: the averaged gradient's norm is about 40 to 60 here) and
  without."""
  config = tiny_config(**{
      'sam.rho': 0.5, 'sam.sync_perturbation': False,
      'optimizer.weight_decay': 1e-3, 'optimizer.decay_all_params': True,
      'optimizer.grad_clip_norm': clip, 'optimizer.nesterov': True,
      'optimizer.momentum': 0.9})
  strategy = mirrored(num_replicas)
  trainer, iterator = _trainer(config, strategy, 2)
  weights = _values(trainer.state.model.trainable_variables, 0, strategy)
  trainer.train_loop(iterator, tf.constant(2))
  data = input_pipeline.load(config)
  batches = iter(input_pipeline.train_dataset(
      data, config, tf.distribute.InputContext()))
  want = _official_sam_steps(
      weights, [[t.numpy() for t in next(batches)] for _ in range(2)],
      num_replicas, config)
  for got, ref in zip(
      _values(trainer.state.model.trainable_variables, 0, strategy), want):
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
