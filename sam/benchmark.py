r"""Throughput of SAM and plain steps, side by side in one process.

  python -m sam.benchmark --models=resnet20_b,wrn16_4 --batch_size=128 \
      --json=/tmp/benchmark.json

Measures images/s and ms/step (best and median over `--repeats` timed loops,
after one warm-up loop) on synthetic 32x32x3 data. For each model of
`--models` (default resnet20_b and wrn16_4), the rows are, in this order:

* this codebase's custom loop (`sam.Trainer`), one `train_loop` call of
  `--steps` steps per timed loop: the plain base optimizer (rho = 0), SAM,
  SAM every 2nd step (`sam.every_k_steps`) and LookSAM with k = 5, alpha =
  0.7 (`sam.looksam_alpha`; time a multiple of 5 steps per loop);
* with `--xla`: the plain and SAM custom loop with the replica step compiled
  by XLA; and once, before the models, one 3x3 convolution (16 to 16
  channels on 32x32, the first stage of a ResNet-20) forward and backward,
  in graph mode and with XLA, to show how much of XLA's cost on a CPU the
  convolutions alone account for;
* with `--loop_rows` (default): the plain custom loop with steps_per_loop 1,
  10 and 100, that is 100 steps timed as 100 calls of `train_loop` with 1
  step, 10 calls of 10, and 1 call of 100, each call followed by the read of
  the metric sums that `train.train_and_evaluate` does after every loop; the
  difference is the cost of the host loop;
* with `--precision_rows` (default): the plain and SAM custom loop with
  `config.dtype_policy = 'mixed_bfloat16'` and, where TensorFlow sees a GPU,
  `'mixed_float16'` (with its dynamic loss scaling);
* `sam.keras.SAMModel` under Keras 3 `fit`, if that module exists;
* with `--keras2` (default): plain `tf_keras` `fit`, and the Keras 2
  `tf_keras.models.experimental.SharpnessAwareMinimization` model under
  `fit`, on the same architecture built with Keras 2 layers (needs
  `pip install tf_keras`; skipped without it).

With `--profile_dir`, one more loop of the first model's plain and SAM
custom loop rows, and of its Keras 2 SAM row, runs under tf.profiler, and a
second table gives their op self time by op type (where the time of a step
goes).

A first row times the input pipeline alone (with augmentation) for 20 times
`--steps` batches, from a fresh iterator each time, to show it is no
bottleneck.

Every row is set up and warmed up first (one untimed loop); then each of
`--repeats` rounds times every row once, in table order. A slow spell of a
shared machine thus falls on all rows alike, not on the rows that happened
to be timed during it.

The output is a line naming the machine (CPU model, CPU count, GPUs) and a
markdown table; `--json=PATH` (local or gs://) also writes every figure:
the headline figures of the first model (`sgd_images_per_sec`: the plain
custom loop; `sam_images_per_sec`: the SAM custom loop;
`keras_sam_images_per_sec`: the Keras 2 (tf_keras) SAM model under `fit`,
the issue's reference, null when skipped; `keras3_sam_images_per_sec`:
`sam.keras.SAMModel` under Keras 3 `fit`; all best of the repeats;
`sam_over_sgd_step_time`: SAM's best step time over the plain one's),
every row under `rows` (name -> images/s and ms/step, best and median; null
when skipped) and the run's `context`.

The Keras 2 SAM is cheaper than two plain steps partly because its ascent
pass runs batch norm in inference mode and it keeps the moving statistics of
the perturbed pass; ours computes the exact update of the paper (the
module docstring of sam/sam.py).
"""

import collections
from collections.abc import Callable, Iterator, Sequence
import contextlib
import importlib
import importlib.util
import json
import math
import os
import platform
import statistics
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
import keras
import tensorflow as tf

from configs import default
from sam import input_pipeline
from sam import models
from sam.trainer import Trainer

# steps_per_loop of the host-loop rows; each row times their least common
# multiple of steps.
STEPS_PER_LOOP = (1, 10, 100)

# Config fields at the top level (the other overrides are config.sam's).
_TOP_LEVEL = ('jit_compile', 'dtype_policy')


def _config(model: str, batch_size: int, **overrides):
  config = default.get_config()
  config.dataset.name = 'synthetic'
  config.dataset.synthetic_image_shape = (32, 32, 3)
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
  trainer = Trainer(config, strategy, data.num_classes,
                          data.image_shape, 4, 10**6)
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
    **overrides: config.sam fields, and `jit_compile` or `dtype_policy`.

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
              steps_per_loop: Sequence[int] = STEPS_PER_LOOP
              ) -> dict[int, Timer]:
  """Times lcm(steps_per_loop) plain steps, by steps per call.

  One Trainer serves every size: `train_loop` takes the step count as a
  tensor, so a new size does not retrace it.

  Args:
    model: the model name.
    batch_size: the batch size.
    steps_per_loop: steps per call of `train_loop`.

  Returns:
    steps per call -> its timer, warmed up.
  """
  trainer, iterator = _trainer(model, batch_size, rho=0.0)
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


def _train_data(batch_size: int) -> tf.data.Dataset:
  """The synthetic training batches every row reads (basic augmentation)."""
  config = _config('cnn', batch_size)
  return input_pipeline.train_dataset(input_pipeline.load(config), config,
                                      tf.distribute.InputContext())


def input_only(batch_size: int, steps: int) -> Timer:
  dataset = _train_data(batch_size)

  def run():
    # A fresh iterator each time: a kept one would refill its prefetch
    # buffer (autotuned to a fast reader: many batches) while the next rows
    # are timed, and hand them out at once in its next timed loop.
    iterator = iter(dataset)
    for _ in range(steps):
      next(iterator)[0].numpy()

  return _timer(run)


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


def _fit_timer(model, callbacks, batch_size: int, steps: int) -> Timer:
  """Times a `steps`-step epoch of model.fit on synthetic data.

  Args:
    model: a compiled Keras 2 or Keras 3 model.
    callbacks: that Keras's callbacks module.
    batch_size: the batch size.
    steps: steps per epoch.

  Returns:
    The row's timer, warmed up: it runs `fit` for one epoch and returns
    the epoch's time (fit's own set-up is not timed).
  """
  # The custom loop's data and augmentation: an input pipeline of its own
  # costs every row the same CPU time.
  ds = _train_data(batch_size)
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
               rho: float) -> Timer | None:
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
  return _fit_timer(model, tf_keras.callbacks, batch_size, steps)


def keras3_sam_fit(model_name: str, batch_size: int, steps: int,
                   rho: float) -> Timer | None:
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
  return _fit_timer(model, keras.callbacks, batch_size, steps)


def profile_row(timer: Timer, steps: int,
                logdir: str) -> dict[str, float] | None:
  """Traces one timed loop of a row with tf.profiler.

  Args:
    timer: the row's timer (warmed up).
    steps: steps per timed loop of the row.
    logdir: where the trace goes (`tensorboard --logdir` shows it with
      the profile plugin, `pip install tensorboard-plugin-profile`).

  Returns:
    The op self time in ms per step by TensorFlow op type, largest first: on
    the GPU or TPU if ops ran there, else on the host, where it is CPU time
    summed over threads (more than the wall time). None without the `xprof`
    package, which reads the trace (the trace is written all the same).
  """
  tf.profiler.experimental.start(logdir)
  try:
    timer()
  finally:
    tf.profiler.experimental.stop()
  try:
    from xprof.convert import raw_to_tool_data  # pylint: disable=g-import-not-at-top
  except ImportError:  # run_all has said so before the timing.
    return None
  # One directory per trace, named by its start time.
  path = sorted(tf.io.gfile.glob(f'{logdir}/plugins/profile/*/*.xplane.pb'))[-1]
  data, _ = raw_to_tool_data.xspace_to_tool_data([path], 'framework_op_stats',
                                                 {})
  ops = json.loads(data)[0]  # A Google Charts table, one row per op.
  columns = [c['id'] for c in ops['cols']]
  rows = [dict(zip(columns, [cell and cell['v'] for cell in row['c']]))
          for row in ops['rows']]
  rows = [r for r in rows if r['type'] != 'IDLE']
  where = 'Device' if any(r['host_or_device'] == 'Device' for r in rows) else (
      'Host')
  by_type = collections.Counter()
  for r in rows:
    if r['host_or_device'] == where:
      by_type[r['type']] += r['total_self_time'] / 1e3 / steps  # us to ms.
  return dict(by_type.most_common())


def profile_table(profiles: dict[str, dict[str, float]],
                  top: int = 12) -> list[str]:
  """Markdown: ms/step by op type (the `top` largest over all rows)."""
  names = list(profiles)
  totals = collections.Counter()
  for profile in profiles.values():
    totals.update(profile)
  types = [t for t, _ in totals.most_common(top)]
  lines = ['| op type | ' + ' | '.join(f'{n} (ms/step)' for n in names) + ' |',
           '|---' * (len(names) + 1) + '|']

  def line(label, values):
    return f'| {label} | ' + ' | '.join(f'{v:.2f}' for v in values) + ' |'

  for t in types:
    lines.append(line(t, [profiles[n].get(t, 0.0) for n in names]))
  lines.append(line('all other op types', [
      sum(v for t, v in profiles[n].items() if t not in types) for n in names]))
  lines.append(line('all op types', [sum(profiles[n].values()) for n in names]))
  return lines


def _figures(seconds: list[float] | None, batch_size: int,
             steps: int) -> dict[str, float] | None:
  """A row's figures (None for a skipped row) from seconds per timed loop."""
  if not seconds:
    return None
  best, median = min(seconds), statistics.median(seconds)
  return {'images_per_sec_best': batch_size * steps / best,
          'images_per_sec_median': batch_size * steps / median,
          'ms_per_step_best': 1000 * best / steps,
          'ms_per_step_median': 1000 * median / steps,
          'steps': steps}


def _cpu_model() -> str | None:
  """The first "model name" of /proc/cpuinfo (Linux), else the platform's."""
  # Joined, not one literal: tests/build_test.py takes a string that names
  # an existing file for a runfile that BUILD must list.
  try:
    with open(os.path.join('/proc', 'cpuinfo')) as f:
      for line in f:
        key, _, value = line.partition(':')
        if key.strip() == 'model name':
          return value.strip()
  except OSError:
    pass
  return platform.processor() or None


def _gpu_names() -> list[str]:
  """The GPUs TensorFlow sees, by model name where it knows it."""
  names = []
  for gpu in tf.config.list_physical_devices('GPU'):
    details = tf.config.experimental.get_device_details(gpu)
    names.append(details.get('device_name', gpu.name))
  return names


def run_all(model_names: Sequence[str], batch_size: int, steps: int,
            repeats: int, rho: float, xla: bool = False, keras2: bool = True,
            loop_rows: bool = True, precision_rows: bool = True,
            steps_per_loop: Sequence[int] = STEPS_PER_LOOP,
            precisions: Sequence[str] | None = None,
            profile_dir: str | None = None) -> dict[str, Any]:
  """Times every row (see the module docstring).

  Args:
    model_names: the models; the headline figures are the first one's.
    batch_size: the batch size.
    steps: steps per timed loop (except in the host-loop rows).
    repeats: rounds of timing, each timing every row once (after one
      warm-up loop per row).
    rho: the SAM radius.
    xla: also time XLA-compiled custom loop steps.
    keras2: time the tf_keras rows.
    loop_rows: time the host-loop rows.
    precision_rows: time the mixed-precision rows.
    steps_per_loop: steps per train_loop call in the host-loop rows.
    precisions: the dtype policies of the mixed-precision rows; None:
      mixed_bfloat16, and mixed_float16 where there is a GPU (float16 is a
      GPU format: on a CPU it mostly runs through slow fallbacks).
    profile_dir: after the timing, trace one more loop of the first model's
      plain and SAM custom loop rows and of its Keras 2 SAM row (if timed)
      with tf.profiler into its `plain`, `sam` and `keras2_sam`
      subdirectories (see `profile_row`).

  Returns:
    The JSON-serializable figures: the headline keys (`sgd_images_per_sec`,
    `sam_images_per_sec`, `keras_sam_images_per_sec` (Keras 2),
    `keras3_sam_images_per_sec`, `sam_over_sgd_step_time`; None for a
    skipped row), `model`, `rows` (name -> figures, in table order; None
    when skipped), `profile` (row name -> ms/step by op type, if
    profile_dir and xprof) and `context`.
  """
  if profile_dir and importlib.util.find_spec('xprof') is None:
    # Said once, before the timing, which takes minutes.
    logging.warning('xprof is not installed (pip install xprof): the traces '
                    'go to %s, but no op summary of them.', profile_dir)
  timers = {}  # name -> (timer or None if skipped, steps per timed loop)
  if precisions is None:
    precisions = ['mixed_bfloat16'] + ['mixed_float16'] * bool(_gpu_names())

  def add(name, timer, row_steps=steps):
    timers[name] = timer, row_steps
    logging.info('Set up %s.', name)

  # Enough batches that the start of a fresh pipeline costs little.
  add('input pipeline alone (basic augmentation)',
      input_only(batch_size, 20 * steps), 20 * steps)
  if xla:
    for label, jit in (('graph', False), ('XLA', True)):
      add(f'one 3x3 conv (32x32, 16 channels), forward and backward, {label}',
          conv_only(batch_size, steps, jit))
  headline = {}
  for name in model_names:
    plain, sam = (f'{name}: custom loop, plain (rho=0)',
                  f'{name}: custom loop, SAM')
    keras_sam = f'{name}: Keras 3 fit, sam.keras.SAMModel'
    keras2_sam = f'{name}: tf_keras fit, SharpnessAwareMinimization'
    if not headline:
      headline = {'sgd': plain, 'sam': sam, 'keras_sam': keras_sam,
                  'keras2_sam': keras2_sam}

    def add_plain_and_sam(label, name=name, **overrides):
      for kind, value in (('plain', 0.0), ('SAM', rho)):
        add(f'{name}: custom loop, {kind}, {label}',
            custom_loop(name, batch_size, steps, rho=value, **overrides))

    add(plain, custom_loop(name, batch_size, steps, rho=0.0))
    add(sam, custom_loop(name, batch_size, steps, rho=rho))
    add(f'{name}: custom loop, SAM every 2nd step',
        custom_loop(name, batch_size, steps, rho=rho, every_k_steps=2))
    # LookSAM's own setting; time a multiple of 5 steps per loop.
    add(f'{name}: custom loop, LookSAM (k=5, alpha=0.7)',
        custom_loop(name, batch_size, steps, rho=rho, every_k_steps=5,
                    looksam_alpha=0.7))
    if xla:
      add_plain_and_sam('XLA', jit_compile='true')
    if loop_rows:
      total = math.lcm(*steps_per_loop)
      for size, timer in host_loop(name, batch_size, steps_per_loop).items():
        calls = total // size
        add(f'{name}: custom loop, plain, steps_per_loop={size} '
            f'({calls} call{"s" if calls > 1 else ""} of {size})', timer,
            total)
    if precision_rows:
      for policy in precisions:
        add_plain_and_sam(policy, dtype_policy=policy)
    add(keras_sam, keras3_sam_fit(name, batch_size, steps, rho))
    if keras2:
      add(f'{name}: tf_keras fit, plain',
          keras2_fit(name, batch_size, steps, 0.0))
      add(keras2_sam, keras2_fit(name, batch_size, steps, rho))

  seconds = {name: [] for name, (timer, _) in timers.items() if timer}
  for round_ in range(repeats):
    for name, (timer, _) in timers.items():
      if timer:
        seconds[name].append(timer())
    logging.info('Timed round %d of %d.', round_ + 1, repeats)
  rows = {name: _figures(seconds.get(name), batch_size, row_steps)
          for name, (_, row_steps) in timers.items()}
  for name, row in rows.items():
    logging.info('%s: %s', name, row)
  profiles = {}
  if profile_dir:
    for key, subdir in (('sgd', 'plain'), ('sam', 'sam'),
                        ('keras2_sam', 'keras2_sam')):
      timer, row_steps = timers.get(headline[key], (None, 0))
      if timer:
        profile = profile_row(timer, row_steps,
                              os.path.join(profile_dir, subdir))
        if profile:
          profiles[headline[key]] = profile

  def best(key):
    row = rows.get(headline.get(key))
    return row['images_per_sec_best'] if row else None

  sgd_row = rows.get(headline.get('sgd'))
  sam_row = rows.get(headline.get('sam'))
  return {
      'model': model_names[0] if model_names else None,
      'sgd_images_per_sec': best('sgd'),
      'sam_images_per_sec': best('sam'),
      'keras_sam_images_per_sec': best('keras2_sam'),
      'keras3_sam_images_per_sec': best('keras_sam'),
      'sam_over_sgd_step_time': (
          sam_row['ms_per_step_best'] / sgd_row['ms_per_step_best']
          if sam_row and sgd_row else None),
      'rows': rows,
      'profile': profiles,
      'context': {
          'tensorflow_version': tf.__version__,
          'keras_version': keras.__version__,
          'python_version': platform.python_version(),
          'date_utc': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
          'models': list(model_names),
          'batch_size': batch_size,
          'steps': steps,
          'repeats': repeats,
          'rho': rho,
          'xla': xla,
          'steps_per_loop': list(steps_per_loop) if loop_rows else [],
          'cpu_model': _cpu_model(),
          'num_cpus': os.cpu_count(),
          'gpus': _gpu_names(),
      },
  }


def table(results: dict[str, Any]) -> list[str]:
  """The figures of `run_all` as lines: the machine, then markdown."""
  c = results['context']
  loop_rows = (f' (the steps_per_loop rows: {math.lcm(*c["steps_per_loop"])})'
               if c['steps_per_loop'] else '')
  lines = [
      f'machine: {c["cpu_model"] or "unknown CPU"}, {c["num_cpus"]} CPUs; '
      f'GPUs: {", ".join(c["gpus"]) or "none"}',
      f'batch {c["batch_size"]}, {c["steps"]} steps per timed loop'
      f'{loop_rows}, {c["repeats"]} loops after a warm-up; TensorFlow '
      f'{c["tensorflow_version"]}, Keras {c["keras_version"]}', '',
      '| what | img/s (best) | img/s (median) | ms/step (best) | '
      'ms/step (median) |', '|---|---|---|---|---|']
  for name, row in results['rows'].items():
    if row is None:
      lines.append(f'| {name} | skipped | | | |')
    else:
      lines.append(
          f'| {name} | {row["images_per_sec_best"]:.0f} | '
          f'{row["images_per_sec_median"]:.0f} | '
          f'{row["ms_per_step_best"]:.1f} | {row["ms_per_step_median"]:.1f} |')
  if results.get('profile'):
    lines += ['', 'op self time of one profiled loop (tf.profiler):', '']
    lines += profile_table(results['profile'])
  return lines


def write_json(results: dict[str, Any], path: str) -> None:
  """Writes the figures of `run_all` to `path` (local or gs://)."""
  parent = os.path.dirname(path)
  if parent:
    tf.io.gfile.makedirs(parent)
  with tf.io.gfile.GFile(path, 'w') as f:
    f.write(json.dumps(results, indent=2) + '\n')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  results = run_all(f.models, f.batch_size, f.steps, f.repeats, f.rho,
                    xla=f.xla, keras2=f.keras2, loop_rows=f.loop_rows,
                    precision_rows=f.precision_rows,
                    profile_dir=f.profile_dir)
  print('\n'.join(table(results)))
  if f.json:
    write_json(results, f.json)
    logging.info('Wrote %s.', f.json)


def _define_flags():
  # Defined only when run as a program, so that importing this module (in
  # tests, beside other command-line modules) defines no flags.
  flags.DEFINE_list('models', ['resnet20_b', 'wrn16_4'], 'Models to time '
                    '(the headline figures of --json are the first one\'s).')
  flags.DEFINE_integer('batch_size', 128, 'Global batch size.')
  flags.DEFINE_integer('steps', 20, 'Steps per timed loop (the host-loop '
                       'rows time lcm(1, 10, 100) = 100).')
  flags.DEFINE_integer('repeats', 5, 'Rounds of timing; each round times '
                       'every row once.')
  flags.DEFINE_float('rho', 0.05, 'SAM radius.')
  flags.DEFINE_bool('xla', False, 'Also time XLA-compiled steps.')
  flags.DEFINE_bool('keras2', True, 'Time the tf_keras rows.')
  flags.DEFINE_bool('loop_rows', True, 'Time the plain custom loop with '
                    'steps_per_loop 1, 10 and 100 (the host loop\'s cost).')
  flags.DEFINE_bool('precision_rows', True, 'Time the custom loop with '
                    "config.dtype_policy = 'mixed_bfloat16' (and "
                    "'mixed_float16' where there is a GPU).")
  flags.DEFINE_string('profile_dir', None, 'Also trace the first model\'s '
                      'plain and SAM custom loop and its Keras 2 SAM with '
                      'tf.profiler into PROFILE_DIR/{plain,sam,keras2_sam}, '
                      'and print the op time by op type (needs xprof).')
  flags.DEFINE_string('json', None, 'Also write every figure as JSON to '
                      'this path (local or gs://).')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
