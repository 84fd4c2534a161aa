"""The benchmark's rows: each builds, warms up and returns a `Timer`.

A timer runs one timed loop of its row and returns its seconds; building it
runs one untimed loop first (the warm-up: tracing, first-call costs).
"""

import atexit
from collections.abc import Callable, Iterator, Sequence
import math
import shutil
import tempfile
import time
from typing import Any

from absl import logging
import keras
import tensorflow as tf

from configs import default
from sam import input_pipeline
from sam import keras as sam_keras
from sam import models
from sam.benchmark import stream
from sam.trainer import Trainer

# steps_per_loop of the host-loop rows; each row times their least common
# multiple of steps.
STEPS_PER_LOOP = (1, 10, 100)

# Config fields at the top level (the other overrides are config.sam's).
_TOP_LEVEL = ('jit_compile', 'dtype_policy')


def _config(model: str, batch_size: int, image_size: int = 32, **overrides):
  config = default.get_config()
  config.dataset.name = 'synthetic'
  config.dataset.synthetic_image_shape = (image_size, image_size, 3)
  config.dataset.synthetic_train_size = 4 * batch_size
  config.model.name = model
  config.batch_size = batch_size
  config.jit_compile = 'false'
  for key, value in overrides.items():
    if key in _TOP_LEVEL:
      config[key] = value
    else:
      config.sam[key] = value
  return config


# Times one loop of a row, in seconds.
Timer = Callable[[], float]


def _timer(run: Callable[[], None]) -> Timer:
  """Calls `run` once (the warm-up); returns a timer of further calls."""
  run()

  def timer():
    start = time.perf_counter()
    run()
    return time.perf_counter() - start

  return timer


def _trainer(model: str, batch_size: int,
             **overrides) -> tuple[Trainer, Iterator[Any]]:
  """A Trainer on one device and its distributed synthetic data."""
  config = _config(model, batch_size, **overrides)
  data = input_pipeline.load(config)
  strategy = tf.distribute.get_strategy()
  trainer = Trainer(config, strategy, data.num_classes, data.image_shape,
                    4, 10**6)
  iterator = iter(strategy.distribute_datasets_from_function(
      lambda ctx: input_pipeline.train_dataset(data, config, ctx)))
  return trainer, iterator


def custom_loop(model: str, batch_size: int, steps: int,
                **overrides) -> Timer:
  """Times `steps` steps (one train_loop call) of sam.Trainer.

  Args:
    model: the model name.
    batch_size: the batch size.
    steps: steps per timed loop.
    **overrides: config.sam fields, `jit_compile`, `dtype_policy`, and
      `image_size` (the synthetic images' side, 32 by default).

  Returns:
    The row's timer, warmed up.
  """
  trainer, iterator = _trainer(model, batch_size, **overrides)
  num_steps = tf.constant(steps)

  def run():
    trainer.train_loop(iterator, num_steps)
    trainer.state.train_sums.numpy()  # Waits for the loop to finish.

  return _timer(run)


def host_loop(model: str, batch_size: int,
              steps_per_loop: Sequence[int] = STEPS_PER_LOOP,
              image_size: int = 32) -> dict[int, Timer]:
  """Times lcm(steps_per_loop) plain steps, by steps per call.

  One Trainer serves every size: `train_loop` takes the step count as a
  tensor, so a new size does not retrace it.

  Args:
    model: the model name.
    batch_size: the batch size.
    steps_per_loop: steps per call of `train_loop`.
    image_size: the synthetic images' side.

  Returns:
    steps per call -> its timer, warmed up.
  """
  trainer, iterator = _trainer(model, batch_size, rho=0.0,
                               image_size=image_size)
  total = math.lcm(*steps_per_loop)
  timers = {}
  for size in steps_per_loop:
    num_steps = tf.constant(size)

    def run(calls=total // size, num_steps=num_steps):
      for _ in range(calls):
        trainer.train_loop(iterator, num_steps)
        # As train.train_and_evaluate after every loop (its NaN check).
        trainer.state.train_sums.numpy()

    timers[size] = _timer(run)
  return timers


def train_data(batch_size: int, image_size: int = 32) -> tf.data.Dataset:
  """The synthetic training batches every row reads (basic augmentation)."""
  config = _config('cnn', batch_size, image_size)
  return input_pipeline.train_dataset(input_pipeline.load(config), config,
                                      tf.distribute.InputContext())


def _input_timer(dataset: tf.data.Dataset, steps: int) -> Timer:
  """Times reading `steps` batches of a data set."""
  def run():
    # A fresh iterator each time: a kept one would refill its prefetch
    # buffer (autotuned to a fast reader: many batches) while the next rows
    # are timed, and hand them out at once in its next timed loop.
    iterator = iter(dataset)
    for _ in range(steps):
      next(iterator)[0].numpy()

  return _timer(run)


def input_only(batch_size: int, steps: int) -> Timer:
  return _input_timer(train_data(batch_size), steps)


def stream_input(batch_size: int, steps: int) -> tuple[Timer, float]:
  """Times `steps` batches of a streamed TFDS data set of ImageNet-sized
  JPEGs (sam/benchmark/stream.py), Inception crop and flip at 224.

  Returns:
    (the timer, the mean size of a record in bytes).
  """
  data_dir = tempfile.mkdtemp(prefix='sam_benchmark_')
  # The timer reads it until the benchmark ends.
  atexit.register(shutil.rmtree, data_dir, ignore_errors=True)
  stream.prepare(data_dir, 4 * batch_size)
  config = default.get_config()
  config.dataset.update(name=f'tfds:{stream.NAME}', data_dir=data_dir,
                        augment='inception_crop', image_size=224,
                        shuffle_buffer=1024)
  config.batch_size = batch_size
  dataset = input_pipeline.train_dataset(
      input_pipeline.load(config), config, tf.distribute.InputContext())
  return _input_timer(dataset, steps), stream.mean_jpeg_bytes(data_dir)


def conv_only(batch_size: int, steps: int, jit_compile: bool) -> Timer:
  """Times `steps` forward and backward passes of one 3x3 conv."""
  images = tf.random.stateless_normal([batch_size, 32, 32, 16], seed=(0, 0))
  kernel = tf.random.stateless_normal([3, 3, 16, 16], seed=(0, 1))

  @tf.function(jit_compile=jit_compile)
  def conv_step(images, kernel):
    # Both gradients, as inside a network: the input's and the kernel's.
    with tf.GradientTape() as tape:
      tape.watch([images, kernel])
      loss = tf.reduce_sum(tf.square(tf.nn.conv2d(images, kernel, 1, 'SAME')))
    return tape.gradient(loss, [images, kernel])

  def run():
    for _ in range(steps):
      grads = conv_step(images, kernel)
    grads[1].numpy()

  return _timer(run)


def _fit_timer(model, callbacks, batch_size: int, steps: int,
               image_size: int) -> Timer:
  """Times a `steps`-step epoch of model.fit on synthetic data.

  Args:
    model: a compiled Keras 2 or Keras 3 model.
    callbacks: that Keras's callbacks module.
    batch_size: the batch size.
    steps: steps per epoch.
    image_size: the synthetic images' side.

  Returns:
    The row's timer, warmed up: it runs `fit` for one epoch and returns
    the epoch's time (fit's own set-up is not timed).
  """
  # The custom loop's data and augmentation: an input pipeline of its own
  # costs every row the same CPU time.
  ds = train_data(batch_size, image_size)
  epochs = []

  class Clock(callbacks.Callback):

    def on_epoch_begin(self, epoch, logs=None):
      self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
      epochs.append(time.perf_counter() - self.start)

  def timer():
    model.fit(ds, epochs=1, steps_per_epoch=steps, verbose=0, shuffle=False,
              callbacks=[Clock()])
    return epochs[-1]

  timer()  # The warm-up: traces the train function, which fit keeps.
  return timer


def keras2_fit(model_name: str, batch_size: int, steps: int,
               rho: float, image_size: int = 32) -> Timer | None:
  """tf_keras fit, with its SharpnessAwareMinimization model if rho > 0."""
  try:
    import tf_keras  # pylint: disable=g-import-not-at-top
  except ImportError:
    logging.warning('tf_keras is not installed: skipping Keras 2 rows.')
    return None
  model = models.get_model(model_name, 10, (image_size, image_size, 3),
                           keras_module=tf_keras)
  if rho:
    model = tf_keras.models.experimental.SharpnessAwareMinimization(
        model, rho=rho)
  model.compile(
      optimizer=tf_keras.optimizers.SGD(0.01, momentum=0.9),
      loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  return _fit_timer(model, tf_keras.callbacks, batch_size, steps,
                    image_size)


def keras3_sam_fit(model_name: str, batch_size: int, steps: int,
                   rho: float, image_size: int = 32) -> Timer:
  """Keras 3 fit with sam.keras.SAMModel."""
  model = sam_keras.SAMModel(
      models.get_model(model_name, 10, (image_size, image_size, 3)), rho=rho)
  model.compile(
      optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  return _fit_timer(model, keras.callbacks, batch_size, steps, image_size)
