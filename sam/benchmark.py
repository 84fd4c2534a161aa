r"""Throughput of SAM and plain steps, side by side in one process.

  python -m sam.benchmark --models=resnet20_b,wrn16_4 --batch_size=128

Measures images/s and ms/step (min and median over `--repeats` timed loops of
`--steps` steps, after one warm-up loop) on synthetic 32x32x3 data for:

* this codebase's custom loop (`sam.train.Trainer`): the plain base
  optimizer (rho = 0), SAM, and SAM every 2nd step (`sam.every_k_steps`);
  with `--xla`, also with the replica step compiled by XLA;
* the Keras 2 `tf_keras.models.experimental.SharpnessAwareMinimization` model
  under `fit`, and plain `tf_keras` `fit`, on the same architecture built with
  Keras 2 layers (needs `pip install tf_keras`; skipped without it);
* `sam.keras.SAMModel` under Keras 3 `fit`, if that module exists;
* the input pipeline alone (with augmentation), to show it is no bottleneck.

The Keras 2 SAM is cheaper than two plain steps partly because its ascent
pass runs batch norm in inference mode and it keeps the moving statistics of
the perturbed pass; ours computes the exact update of DESIGN.md.
"""

from collections.abc import Callable
import contextlib
import importlib
import statistics
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np
import tensorflow as tf

from configs import default
from sam import input_pipeline
from sam import models
from sam import train


def _config(model: str, batch_size: int, **sam):
  config = default.get_config()
  config.dataset.name = 'synthetic'
  config.dataset.synthetic_image_shape = (32, 32, 3)
  config.dataset.synthetic_train_size = 4 * batch_size
  config.model.name = model
  config.batch_size = batch_size
  config.jit_compile = 'false'
  for key, value in sam.items():
    if key == 'jit_compile':
      config.jit_compile = value
    else:
      config.sam[key] = value
  return config


def _time(run: Callable[[], None], repeats: int) -> list[float]:
  """Seconds per call of `run`, after one warm-up call."""
  run()
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    seconds.append(time.perf_counter() - start)
  return seconds


def custom_loop(model: str, batch_size: int, steps: int, repeats: int,
                **sam) -> list[float]:
  """Seconds per `steps` steps of sam.train.Trainer on one device."""
  config = _config(model, batch_size, **sam)
  data = input_pipeline.load(config)
  strategy = tf.distribute.get_strategy()
  trainer = train.Trainer(config, strategy, data.num_classes,
                          data.image_shape, 4, 10**6)
  iterator = iter(strategy.distribute_datasets_from_function(
      lambda ctx: input_pipeline.train_dataset(data, config, ctx)))
  num_steps = tf.constant(steps)

  def run():
    trainer.train_loop(iterator, num_steps)
    trainer.train_sums.numpy()  # Waits for the loop to finish.

  return _time(run, repeats)


def input_only(batch_size: int, steps: int, repeats: int) -> list[float]:
  config = _config('cnn', batch_size)
  data = input_pipeline.load(config)
  iterator = iter(input_pipeline.train_dataset(
      data, config, tf.distribute.InputContext()))

  def run():
    for _ in range(steps):
      next(iterator)[0].numpy()

  return _time(run, repeats)


@contextlib.contextmanager
def _builders_using(keras_module):
  """Points the model builders at another Keras (the same architecture).

  Batch norm becomes that Keras's own layer (Keras 2's is fused in training,
  as our `resnet.FusedBatchNormalization`).
  """
  modules = [importlib.import_module(f'sam.models.{m}')
             for m in ('resnet', 'wide_resnet', 'simple')]
  resnet = modules[0]
  saved = [m.keras for m in modules], resnet.batch_norm
  for m in modules:
    m.keras = keras_module
  resnet.batch_norm = lambda name: keras_module.layers.BatchNormalization(
      momentum=resnet.BN_MOMENTUM, epsilon=resnet.BN_EPSILON, name=name)
  try:
    yield
  finally:
    for m, k in zip(modules, saved[0]):
      m.keras = k
    resnet.batch_norm = saved[1]


def _fit_seconds(model, callbacks, batch_size: int, steps: int,
                 repeats: int) -> list[float]:
  """Seconds per `steps`-step epoch of model.fit on synthetic data.

  Args:
    model: a compiled Keras 2 or Keras 3 model.
    callbacks: that Keras's callbacks module.
    batch_size: the batch size.
    steps: steps per epoch.
    repeats: timed epochs, after one warm-up epoch.

  Returns:
    Seconds per timed epoch.
  """
  rng = np.random.default_rng(0)
  x = rng.normal(size=(4 * batch_size, 32, 32, 3)).astype(np.float32)
  y = rng.integers(0, 10, 4 * batch_size).astype(np.int32)
  ds = tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(
      batch_size, drop_remainder=True).prefetch(2)
  epochs = []

  class Clock(callbacks.Callback):

    def on_epoch_begin(self, epoch, logs=None):
      self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
      epochs.append(time.perf_counter() - self.start)

  model.fit(ds, epochs=repeats + 1, steps_per_epoch=steps, verbose=0,
            callbacks=[Clock()])
  return epochs[1:]


def keras2_fit(model_name: str, batch_size: int, steps: int, repeats: int,
               rho: float) -> list[float] | None:
  """tf_keras fit, with its SharpnessAwareMinimization model if rho > 0."""
  try:
    import tf_keras  # pylint: disable=g-import-not-at-top
  except ImportError:
    logging.warning('tf_keras is not installed: skipping Keras 2 rows.')
    return None
  with _builders_using(tf_keras):
    model = models.get_model(model_name, 10, (32, 32, 3))
  if rho:
    model = tf_keras.models.experimental.SharpnessAwareMinimization(
        model, rho=rho)
  model.compile(
      optimizer=tf_keras.optimizers.SGD(0.01, momentum=0.9),
      loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  return _fit_seconds(model, tf_keras.callbacks, batch_size, steps, repeats)


def keras3_sam_fit(model_name: str, batch_size: int, steps: int,
                   repeats: int, rho: float) -> list[float] | None:
  """Keras 3 fit with sam.keras.SAMModel, if the wrapper exists."""
  try:
    sam_keras = importlib.import_module('sam.keras')
  except ImportError:
    return None
  import keras  # pylint: disable=g-import-not-at-top
  model = sam_keras.SAMModel(models.get_model(model_name, 10, (32, 32, 3)),
                             rho=rho)
  model.compile(
      optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  return _fit_seconds(model, keras.callbacks, batch_size, steps, repeats)


def _row(name: str, seconds: list[float] | None, batch_size: int,
         steps: int) -> str:
  if not seconds:
    return f'| {name} | skipped | | | |'
  best, median = min(seconds), statistics.median(seconds)
  return (f'| {name} | {batch_size * steps / best:.0f} | '
          f'{batch_size * steps / median:.0f} | {1000 * best / steps:.1f} | '
          f'{1000 * median / steps:.1f} |')


def run_all(model_names, batch_size, steps, repeats, rho, xla=False,
            keras2=True) -> list[str]:
  """The benchmark table, as markdown lines."""
  lines = [f'batch {batch_size}, {steps} steps per timed loop, {repeats} '
           f'loops after a warm-up; TensorFlow {tf.__version__}', '',
           '| what | img/s (best) | img/s (median) | ms/step (best) | '
           'ms/step (median) |', '|---|---|---|---|---|']

  def add(name, seconds):
    lines.append(_row(name, seconds, batch_size, steps))
    logging.info(lines[-1])

  add('input pipeline alone (basic augmentation)',
      input_only(batch_size, steps, repeats))
  for name in model_names:
    add(f'{name}: custom loop, plain (rho=0)',
        custom_loop(name, batch_size, steps, repeats, rho=0.0))
    add(f'{name}: custom loop, SAM',
        custom_loop(name, batch_size, steps, repeats, rho=rho))
    add(f'{name}: custom loop, SAM every 2nd step',
        custom_loop(name, batch_size, steps, repeats, rho=rho,
                    every_k_steps=2))
    if xla:
      add(f'{name}: custom loop, plain, XLA',
          custom_loop(name, batch_size, steps, repeats, rho=0.0,
                      jit_compile='true'))
      add(f'{name}: custom loop, SAM, XLA',
          custom_loop(name, batch_size, steps, repeats, rho=rho,
                      jit_compile='true'))
    add(f'{name}: Keras 3 fit, sam.keras.SAMModel',
        keras3_sam_fit(name, batch_size, steps, repeats, rho))
    if keras2:
      add(f'{name}: tf_keras fit, plain',
          keras2_fit(name, batch_size, steps, repeats, 0.0))
      add(f'{name}: tf_keras fit, SharpnessAwareMinimization',
          keras2_fit(name, batch_size, steps, repeats, rho))
  return lines


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  print('\n'.join(run_all(f.models, f.batch_size, f.steps, f.repeats, f.rho,
                          f.xla, f.keras2)))


def _define_flags():
  # Defined only when run as a program, so that importing this module (in
  # tests, beside other command-line modules) defines no flags.
  flags.DEFINE_list('models', ['resnet20_b'], 'Models to time.')
  flags.DEFINE_integer('batch_size', 128, 'Global batch size.')
  flags.DEFINE_integer('steps', 20, 'Steps per timed loop.')
  flags.DEFINE_integer('repeats', 5, 'Timed loops per row.')
  flags.DEFINE_float('rho', 0.05, 'SAM radius.')
  flags.DEFINE_bool('xla', False, 'Also time XLA-compiled steps.')
  flags.DEFINE_bool('keras2', True, 'Time the tf_keras rows.')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
