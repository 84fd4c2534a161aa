"""sam.keras.SAMModel: `fit` against the custom loop, on 1, 2 and 4 replicas.

Two references: `sam.Trainer` (the project's custom loop) for the
zoo's `cnn`, and `_reference_steps`, a few lines of SAM the custom-loop way
for tiny models with batch norm or sample weights.
"""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

from configs import default
from sam import models
from sam import optim
from sam import sam as sam_lib
from sam.keras import SAMModel
from sam.trainer import Trainer
from tests.conftest import requires_xla_cpu

NUM_CLASSES = 3
BATCH = 16  # Global batch: 4 examples per replica on 4 replicas.
STEPS = 3
RTOL, ATOL = 1e-5, 1e-6


def _sparse_ce():
  return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _images(seed=0, n=BATCH * STEPS, shape=(8, 8, 3)):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, *shape)).astype(np.float32)
  y = rng.integers(0, NUM_CLASSES, n).astype(np.int32)
  return x, y


def _strategy(num_replicas, mirrored):
  if num_replicas == 1:
    return tf.distribute.get_strategy()
  return mirrored(num_replicas)


def _replica_values(variables, strategy):
  """Each variable's value on every replica: [replica][variable]."""
  per_var = [[t.numpy() for t in strategy.experimental_local_results(v.value)]
             for v in variables]
  return [list(values) for values in zip(*per_var)]


def _assert_all_close(got, want, rtol=RTOL, atol=ATOL):
  assert len(got) == len(want)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)


# The custom loop: sam.Trainer on the zoo's cnn.


def _trainer_config(adaptive, sync):
  config = default.get_config()
  config.model.name = 'cnn'
  config.schedule.name = 'constant'
  config.schedule.learning_rate = 0.05
  # Large enough to move the weights in 3 steps, so the L2 term (which SAM
  # must see at w + eps) matters at float32 tolerance.
  config.optimizer.weight_decay = 0.05
  config.sam.rho = 0.5
  config.sam.adaptive = adaptive
  config.sam.sync_perturbation = sync
  config.batch_size = BATCH
  return config


def _run_trainer(config, strategy, x, y):
  trainer = Trainer(config, strategy, NUM_CLASSES, x.shape[1:],
                          steps_per_epoch=STEPS, total_steps=STEPS)
  initial = trainer.state.model.get_weights()
  dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
  trainer.train_loop(iter(strategy.experimental_distribute_dataset(dataset)),
                     tf.constant(STEPS))
  return trainer, initial


@functools.cache
def _one_device_trainer_weights(adaptive):
  x, y = _images()
  trainer, _ = _run_trainer(_trainer_config(adaptive, True),
                            tf.distribute.get_strategy(), x, y)
  return trainer.state.model.get_weights()


def _fit_like_trainer(config, trainer, initial, strategy, x, y, **sam_kwargs):
  """SAMModel on the trainer's cnn, initial weights, L2 term and optimizer."""
  with strategy.scope():
    model = models.get_model('cnn', NUM_CLASSES, x.shape[1:])
    model.set_weights(initial)
    # The trainer's L2 term, 0.5 wd ||w||^2 over kernels, as a regularizer.
    for v in model.trainable_variables:
      if len(v.shape) > 1:
        v.regularizer = keras.regularizers.L2(config.optimizer.weight_decay / 2)
    sam_model = SAMModel(model, rho=config.sam.rho, **sam_kwargs)
    sam_model.compile(
        optimizer=optim.create_optimizer(config, trainer.state.schedule),
        loss=_sparse_ce(), metrics=['accuracy'])
  history = sam_model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False,
                          verbose=0)
  return sam_model, history


@pytest.mark.slow  # Fast: the trainer's selection (train_test).
@pytest.mark.parametrize('num_replicas', [1, 2])
def test_esam_matches_custom_loop(num_replicas, mirrored):
  """ESAM's weight perturbation and data selection through `fit` equal the
  custom loop's (whose selection train_test checks in place)."""
  strategy = _strategy(num_replicas, mirrored)
  config = _trainer_config(False, True)
  config.sam.variant = 'esam'  # beta = gamma = 0.5.
  x, y = _images()
  trainer, initial = _run_trainer(config, strategy, x, y)
  sam_model, _ = _fit_like_trainer(config, trainer, initial, strategy, x, y,
                                   variant='esam', esam_seed=config.seed)
  want = _replica_values(trainer.state.model.trainable_variables, strategy)
  got = _replica_values(sam_model.trainable_variables, strategy)
  _assert_all_close(got[-1], want[0])
  # Not SAM's update.
  config.sam.variant = 'sam'
  sam, _ = _run_trainer(config, strategy, x, y)
  assert not all(np.allclose(a, b, atol=1e-5) for a, b in zip(
      want[0], _replica_values(sam.state.model.trainable_variables,
                               strategy)[0]))


@pytest.mark.slow
@pytest.mark.parametrize('num_replicas,adaptive,sync', [
    (1, False, True), (2, False, True), (4, False, True), (2, True, True),
    (2, False, False)])
def test_fit_matches_custom_loop(num_replicas, adaptive, sync, mirrored):
  strategy = _strategy(num_replicas, mirrored)
  config = _trainer_config(adaptive, sync)
  x, y = _images()
  trainer, initial = _run_trainer(config, strategy, x, y)

  sam_model, history = _fit_like_trainer(
      config, trainer, initial, strategy, x, y, adaptive=adaptive,
      sync_perturbation=sync, eta=config.sam.eta)

  assert int(sam_model.optimizer.iterations.numpy()) == STEPS
  want = _replica_values(trainer.state.model.trainable_variables, strategy)
  got = _replica_values(sam_model.trainable_variables, strategy)
  for replica in range(num_replicas):
    _assert_all_close(got[replica], want[0])
  # Training moved the weights well beyond the tolerance.
  assert max(np.abs(a - b).max() for a, b in zip(got[0], initial)) > 1e-2
  if sync:
    # SAM on the global batch does not depend on how it is split (up to the
    # order of float32 sums across replicas).
    _assert_all_close(got[0], _one_device_trainer_weights(adaptive),
                      rtol=1e-4, atol=1e-5)
  # The logged loss and accuracy are the clean ones at w (with the L2 term),
  # averaged over the epoch, as the custom loop logs them.
  metrics = trainer.read_train_metrics()
  np.testing.assert_allclose(history.history['loss'][0],
                             metrics['train/loss'], rtol=1e-5)
  np.testing.assert_allclose(history.history['accuracy'][0],
                             metrics['train/accuracy'], rtol=1e-6)


# A direct reference for tiny models (batch norm, sample weights).


def _bn_model(seed=1):
  keras.utils.set_random_seed(seed)
  inputs = keras.Input((6,))
  h = keras.layers.Dense(8, name='dense')(inputs)
  h = keras.layers.BatchNormalization(momentum=0.5, name='bn')(h)
  h = keras.layers.ReLU()(h)
  return keras.Model(inputs, keras.layers.Dense(NUM_CLASSES, name='logits')(h))


def _vectors(seed=0, n=BATCH * STEPS):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 6)).astype(np.float32) * 2 + 1
  y = rng.integers(0, NUM_CLASSES, n).astype(np.int32)
  return x, y


def _sgd():
  return keras.optimizers.SGD(0.1, momentum=0.9)


def _reference_steps(x, y, strategy, rho=0.5, sample_weight=None,
                     ascent_mode='train'):
  """SAM on `_bn_model` as sam.train does it, with `_sgd`.

  `ascent_mode='inference'`: the gradient at w in inference mode, by hand;
  the batch-norm statistics of the pass at w + eps.

  Returns:
    The trainable values after each step (and the non-trainable ones, with
    ascent_mode='inference').
  """
  if sample_weight is None:
    sample_weight = np.ones(len(y), np.float32)
  with strategy.scope():
    model = _bn_model()
    optimizer = _sgd()
    optimizer.build(model.trainable_variables)

  def replica_step(images, labels, weights):
    ctx = tf.distribute.get_replica_context()
    state = [v.value for v in model.non_trainable_variables]

    def loss_fn(params):
      logits, new_state = model.stateless_call(params, state, images,
                                               training=True)
      per_example = tf.nn.sparse_softmax_cross_entropy_with_logits(
          labels, logits)
      return tf.reduce_sum(per_example * weights) / BATCH, new_state

    params = [v.value for v in model.trainable_variables]
    if ascent_mode == 'inference':
      with tf.GradientTape() as tape:
        tape.watch(params)
        logits = model.stateless_call(params, state, images,
                                      training=False)[0]
        loss = tf.reduce_sum(
            weights * tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels, logits)) / BATCH
      g = ctx.all_reduce('SUM', tape.gradient(loss, params))
      norm = tf.linalg.global_norm(g)
      moved = [p + rho * gi / norm for p, gi in zip(params, g)]
      with tf.GradientTape() as tape:
        tape.watch(moved)
        loss, new_state = loss_fn(moved)
      grads = tape.gradient(loss, moved)
    else:
      out = sam_lib.sam_step(loss_fn, params, rho)
      grads, new_state = out.grads, out.aux
    if ctx.num_replicas_in_sync > 1:
      new_state = ctx.all_reduce(tf.distribute.ReduceOp.MEAN, new_state)
    for variable, value in zip(model.non_trainable_variables, new_state):
      variable.assign(value)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))

  step = tf.function(lambda batch: strategy.run(replica_step, args=batch))
  dataset = tf.data.Dataset.from_tensor_slices(
      (x, y, sample_weight)).batch(BATCH)
  trajectory = []
  for batch in strategy.experimental_distribute_dataset(dataset):
    step(batch)
    trajectory.append([v.numpy() for v in (
        model.variables if ascent_mode == 'inference'
        else model.trainable_variables)])
  return trajectory


def _fit_sam(x, y, strategy, rho=0.5, callbacks=(), jit_compile=False,
             sam_kwargs=None, **fit_kwargs):
  with strategy.scope():
    sam_model = SAMModel(_bn_model(), rho=rho, **(sam_kwargs or {}))
    sam_model.compile(optimizer=_sgd(), loss=_sparse_ce(),
                      metrics=['accuracy'],
                      jit_compile=jit_compile)
  sam_model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
                callbacks=list(callbacks), **fit_kwargs)
  return sam_model


class _Recorder(keras.callbacks.Callback):
  """Every replica's variable values before training and after each batch."""

  def __init__(self, strategy):
    super().__init__()
    self.strategy = strategy
    self.values = []

  def _record(self):
    model = self.model
    self.values.append(_replica_values(
        model.trainable_variables + model.non_trainable_variables,
        self.strategy))

  def on_train_begin(self, logs=None):
    self._record()

  def on_train_batch_end(self, batch, logs=None):
    self._record()


@pytest.mark.slow
@pytest.mark.parametrize('num_replicas', [2, 4])
def test_batch_norm_first_pass_statistics_identical_on_replicas(
    num_replicas, mirrored):
  strategy = mirrored(num_replicas)
  x, y = _vectors()
  recorder = _Recorder(strategy)
  sam_model = _fit_sam(x, y, strategy, callbacks=[recorder])

  want = _reference_steps(x, y, strategy)[-1]
  _assert_all_close([v.numpy() for v in sam_model.trainable_variables], want)

  model = sam_model.model
  n_train = len(model.trainable_variables)
  assert len(recorder.values) == STEPS + 1
  for step in range(STEPS):
    before, after = recorder.values[step][0], recorder.values[step + 1]
    # Every replica holds the same values, weights and statistics alike.
    for replica in after[1:]:
      for a, b in zip(replica, after[0]):
        np.testing.assert_array_equal(a, b)
    # Moving statistics are those of a clean forward pass at the weights
    # before the step (not at w + eps), per replica shard, then averaged.
    shards = np.split(x[step * BATCH:(step + 1) * BATCH], num_replicas)
    states = [model.stateless_call(before[:n_train], before[n_train:], shard,
                                   training=True)[1] for shard in shards]
    clean = [np.mean([s[i] for s in states], axis=0)
             for i in range(len(states[0]))]
    _assert_all_close(after[0][n_train:], clean)
    assert np.abs(clean[0] - before[n_train]).max() > 1e-2


@pytest.mark.slow  # Fast: the trainer's, train_test.
@pytest.mark.parametrize('num_replicas', [1, 2])
def test_ascent_in_inference_mode_matches_reference(num_replicas, mirrored):
  """ascent_mode='inference': eps from the model in inference mode."""
  strategy = mirrored(num_replicas)
  x, y = _vectors()
  sam_model = _fit_sam(x, y, strategy,
                       sam_kwargs=dict(ascent_mode='inference'))
  want = _reference_steps(x, y, strategy, ascent_mode='inference')[-1]
  _assert_all_close([v.numpy() for v in sam_model.model.variables], want)
  train_mode = _fit_sam(x, y, strategy)
  assert not np.allclose(train_mode.model.variables[0].numpy(), want[0],
                         atol=1e-4)


def test_stateful_variant_is_saved_with_the_wrapper(tmp_path):
  """F-SAM's momentum is a variable of the wrapper: saved and loaded."""
  x, y = _vectors()
  sam_model = _fit_sam(x, y, tf.distribute.get_strategy(),
                       sam_kwargs=dict(variant='fsam'))
  assert len(sam_model.sam_state) == len(sam_model.trainable_variables) + 1
  sam_model.save(str(tmp_path / 'fsam.keras'))
  loaded = keras.saving.load_model(str(tmp_path / 'fsam.keras'))
  assert loaded.variant == 'fsam'
  for a, b in zip(loaded.sam_state, sam_model.sam_state):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
  assert np.abs(loaded.sam_state[0].numpy()).max() > 0


def test_stateful_variant_needs_a_built_model():
  inner = keras.Sequential([keras.layers.Dense(3)])
  with pytest.raises(ValueError, match="variant 'msam' keeps a state .* "
                     'build the model first'):
    SAMModel(inner, variant='msam')


def test_checkpoints_mid_fit_hold_unperturbed_weights(tmp_path):
  strategy = tf.distribute.get_strategy()
  x, y = _vectors()
  weights_ckpt = keras.callbacks.ModelCheckpoint(
      str(tmp_path / 'step{batch}.weights.h5'), save_weights_only=True,
      save_freq=1)
  model_ckpt = keras.callbacks.ModelCheckpoint(
      str(tmp_path / 'step{batch}.keras'), save_freq=1)
  _fit_sam(x, y, strategy, callbacks=[weights_ckpt, model_ckpt])
  trajectory = _reference_steps(x, y, strategy)

  for step in (1, 2):  # Checkpoints written in the middle of the epoch.
    # A weights file loads into a plain model through a fresh wrapper.
    plain = _bn_model(seed=7)
    SAMModel(plain).load_weights(str(tmp_path / f'step{step}.weights.h5'))
    _assert_all_close([v.numpy() for v in plain.trainable_variables],
                      trajectory[step - 1])
    loaded = keras.saving.load_model(str(tmp_path / f'step{step}.keras'))
    assert not isinstance(loaded.model, SAMModel)
    _assert_all_close([v.numpy() for v in loaded.model.trainable_variables],
                      trajectory[step - 1])


def test_save_load_round_trip(tmp_path):
  x, y = _vectors()
  sam_model = _fit_sam(x, y, tf.distribute.get_strategy())
  sam_model.save(str(tmp_path / 'sam.keras'))
  sam_model.model.save(str(tmp_path / 'plain.keras'))

  loaded = keras.saving.load_model(str(tmp_path / 'sam.keras'))
  assert isinstance(loaded, SAMModel)
  assert (loaded.rho, loaded.adaptive, loaded.sync_perturbation,
          loaded.eta) == (0.5, False, True, 0.01)
  assert int(loaded.optimizer.iterations.numpy()) == STEPS
  plain = keras.saving.load_model(str(tmp_path / 'plain.keras'))
  assert not isinstance(plain, SAMModel)
  want = sam_model.predict(x, verbose=0)
  np.testing.assert_allclose(want, sam_model.model.predict(x, verbose=0))
  for other in (loaded, loaded.model, plain):
    np.testing.assert_allclose(other.predict(x, verbose=0), want, rtol=1e-6)
  # The reloaded wrapper resumes training with its optimizer state.
  loaded.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
  assert int(loaded.optimizer.iterations.numpy()) == 2 * STEPS


@pytest.mark.parametrize('weighting', ['sample_weight', 'class_weight'])
def test_sample_and_class_weights(weighting):
  strategy = tf.distribute.get_strategy()
  x, y = _vectors()
  class_weight = {0: 2.0, 1: 0.5, 2: 1.0}
  sample_weight = np.array([class_weight[c] for c in y], np.float32)
  if weighting == 'sample_weight':
    sam_model = _fit_sam(x, y, strategy, sample_weight=sample_weight)
  else:
    sam_model = _fit_sam(x, y, strategy, class_weight=class_weight)
  want = _reference_steps(x, y, strategy, sample_weight=sample_weight)[-1]
  _assert_all_close([v.numpy() for v in sam_model.trainable_variables], want)


@requires_xla_cpu
def test_jit_compile_matches_reference():
  strategy = tf.distribute.get_strategy()
  x, y = _vectors()
  sam_model = _fit_sam(x, y, strategy, jit_compile=True)
  assert sam_model.jit_compile
  want = _reference_steps(x, y, strategy)[-1]
  _assert_all_close([v.numpy() for v in sam_model.trainable_variables], want,
                    rtol=1e-5, atol=1e-5)


class _CountCalls(keras.layers.Layer):
  """The identity; counts its (eager) calls."""

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self.calls = 0

  def call(self, inputs):
    self.calls += 1
    return inputs


@pytest.mark.parametrize('rho,passes', [(0.0, 1), (0.5, 2)])
def test_rho_zero_is_the_plain_optimizer_in_one_pass(rho, passes):
  x, y = _vectors()

  def build():
    inputs = keras.Input((6,))
    counter = _CountCalls()
    model = keras.Model(inputs, _bn_model()(counter(inputs)))
    return model, counter

  model, counter = build()
  sam_model = SAMModel(model, rho=rho)
  sam_model.compile(optimizer=_sgd(),
                    loss=_sparse_ce(), run_eagerly=True)
  # Counted from the first step on: building the model calls it too.
  reset = keras.callbacks.LambdaCallback(
      on_train_begin=lambda logs: setattr(counter, 'calls', 0))
  sam_model.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0,
                callbacks=[reset])
  assert counter.calls == passes * STEPS

  if rho == 0:
    plain, _ = build()
    plain.compile(optimizer=_sgd(),
                  loss=_sparse_ce())
    plain.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0)
    _assert_all_close([v.numpy() for v in sam_model.model.variables],
                      [v.numpy() for v in plain.variables])


def test_fit_with_validation_callbacks_evaluate_predict():
  x, y = _vectors(n=BATCH * 4)
  with tf.distribute.get_strategy().scope():
    sam_model = SAMModel(_bn_model(), rho=0.5)
    sam_model.compile(optimizer=keras.optimizers.Adam(1e-2),
                      loss=_sparse_ce(), metrics=['accuracy'])
  # min_delta so large that no epoch after the first counts as better.
  history = sam_model.fit(
      x, y, batch_size=BATCH, epochs=5, verbose=0,
      validation_data=_vectors(seed=1, n=BATCH),
      callbacks=[
          keras.callbacks.ReduceLROnPlateau(monitor='val_loss', factor=0.5,
                                            patience=0, min_delta=1e9),
          keras.callbacks.EarlyStopping(monitor='val_loss', patience=2,
                                        min_delta=1e9),
      ])
  assert set(history.history) >= {'loss', 'accuracy', 'val_loss',
                                  'val_accuracy', 'learning_rate'}
  assert len(history.history['loss']) == 3  # Stopped early.
  # The rate each epoch ran with: halved after every epoch but the first.
  np.testing.assert_allclose(history.history['learning_rate'],
                             [1e-2, 1e-2, 5e-3], rtol=1e-6)
  np.testing.assert_allclose(float(sam_model.optimizer.learning_rate), 2.5e-3,
                             rtol=1e-6)
  # evaluate and predict run the wrapped model.
  model = sam_model.model
  logits = sam_model.predict(x, verbose=0)
  np.testing.assert_allclose(logits, model.predict(x, verbose=0), rtol=1e-6)
  results = sam_model.evaluate(x, y, verbose=0, return_dict=True)
  want_loss = float(_sparse_ce()(y, model(x, training=False)))
  np.testing.assert_allclose(results['loss'], want_loss, rtol=1e-5)
  np.testing.assert_allclose(results['accuracy'],
                             np.mean(np.argmax(logits, -1) == y), rtol=1e-6)


def test_multi_output_losses_are_logged_at_w():
  x, y = _vectors(n=BATCH)
  keras.utils.set_random_seed(0)
  inputs = keras.Input((6,))
  model = keras.Model(inputs, {'a': keras.layers.Dense(3, name='a')(inputs),
                               'b': keras.layers.Dense(3, name='b')(inputs)})
  initial = {k: float(_sparse_ce()(y, v)) for k, v in model(x).items()}
  sam_model = SAMModel(model, rho=0.5)
  sam_model.compile(optimizer=_sgd(), loss={'a': _sparse_ce(),
                                            'b': _sparse_ce()},
                    loss_weights={'a': 1.0, 'b': 2.0})
  history = sam_model.fit(x, {'a': y, 'b': y}, batch_size=BATCH, verbose=0)
  # Per-output loss metrics update inside the first pass's stateless scope;
  # they must survive it.
  logs = {k: v[0] for k, v in history.history.items()}
  np.testing.assert_allclose(logs['a_loss'], initial['a'], rtol=1e-5)
  np.testing.assert_allclose(logs['b_loss'], initial['b'], rtol=1e-5)
  np.testing.assert_allclose(logs['loss'], initial['a'] + 2 * initial['b'],
                             rtol=1e-5)


class _Subclassed(keras.Model):
  """A subclassed model, unbuilt until it sees data."""

  def __init__(self):
    super().__init__(name='subclassed')
    self.dense = keras.layers.Dense(NUM_CLASSES)
    self.bn = keras.layers.BatchNormalization()

  def call(self, inputs, training=False):
    return self.bn(self.dense(inputs), training=training)


def test_unbuilt_subclassed_model_is_built_by_fit():
  x, y = _vectors()
  inner = _Subclassed()
  sam_model = SAMModel(inner)
  assert not inner.built
  sam_model.compile(optimizer=_sgd(), loss=_sparse_ce())
  sam_model.fit(x, y, batch_size=BATCH, verbose=0)
  assert len(inner.trainable_variables) == 4
  assert int(sam_model.optimizer.iterations.numpy()) == STEPS


@pytest.mark.parametrize('kwargs,match', [
    (dict(rho=-0.1), 'rho=-0.1'),
    (dict(rho='0.05'), 'rho='),
    (dict(rho=True), 'rho=True'),
    (dict(eta=-1.0), 'eta=-1.0'),
    (dict(adaptive=1), 'adaptive=1'),
    (dict(variant='samm'), r"variant='samm' is invalid: it must be one of"),
    (dict(ascent_mode='eval'), "ascent_mode='eval' is invalid"),
    (dict(variant='fsam', ascent_steps=2),
     "variant 'fsam' keeps one state for all replicas"),
    (dict(variant='fsam', adaptive=True), 'exclude each other'),
    (dict(variant='esam', esam_beta=0.0),
     r'esam_beta=0.0 is invalid: .*\(0, 1\]'),
    (dict(esam_seed=0.5), 'esam_seed=0.5 is invalid: it must be an int'),
    (dict(variant='esam', ascent_mode='inference'),
     "esam_gamma=0.5 is invalid: ESAM's data selection needs"),
])
def test_bad_arguments_fail_at_construction(kwargs, match):
  with pytest.raises(ValueError, match=match):
    SAMModel(_bn_model(), **kwargs)


@pytest.mark.parametrize('model', [None, 'resnet20', keras.layers.Dense(3)])
def test_non_model_fails_at_construction(model):
  with pytest.raises(TypeError, match='model must be a Keras 3 model'):
    SAMModel(model)


@pytest.mark.slow  # Fast: accumulation through SAMModel, perturbations_test.
@pytest.mark.parametrize('micro_batches,num_replicas', [(2, 1), (2, 2)])
def test_micro_batches_accumulate_as_replicas_do(micro_batches,
                                                 num_replicas, mirrored):
  """micro_batches=k: batch norm over each micro-batch, one eps for all: the
  same as SAM on k times the replicas (the reference), weights and moving
  statistics alike; the logged loss is that of the whole batch at w."""
  x, y = _vectors()
  sam_model = _fit_sam(x, y, mirrored(num_replicas),
                       sam_kwargs={'micro_batches': micro_batches})
  strategy = mirrored(num_replicas * micro_batches)
  want = _reference_steps(x, y, strategy)[-1]
  _assert_all_close([v.numpy() for v in sam_model.trainable_variables], want)
  whole = _fit_sam(x, y, mirrored(num_replicas * micro_batches))
  _assert_all_close(
      [v.numpy() for v in sam_model.model.non_trainable_variables],
      [v.numpy() for v in whole.model.non_trainable_variables])
  for name in ('loss', 'accuracy'):
    assert float(sam_model.get_metrics_result()[name]) == pytest.approx(
        float(whole.get_metrics_result()[name]), rel=1e-5), name


def test_micro_batches_that_do_not_divide_the_batch_name_the_fix():
  x, y = _vectors()
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=r'micro_batches=2\): the batch of each replica '
                     r'must divide into 2 \(batch the data with drop_rem'):
    _fit_sam(x[:3], y[:3], tf.distribute.get_strategy(),
             sam_kwargs={'micro_batches': 2})
