"""Times every row side by side and reports the figures (table, JSON)."""

from collections.abc import Sequence
import functools
import importlib.util
import json
import math
import os
import platform
import statistics
import time
from typing import Any

from absl import logging
import keras
import tensorflow as tf

from sam import perturbations
from sam.benchmark import profile as profile_lib
from sam.benchmark import rows

STREAM_ROW = ('streamed TFDS JPEGs alone (500x375, Inception crop + flip to '
              '224x224)')


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
            steps_per_loop: Sequence[int] = rows.STEPS_PER_LOOP,
            precisions: Sequence[str] | None = None,
            profile_dir: str | None = None,
            stream_row: bool = True, variant_rows: bool = True,
            image_size: int = 32) -> dict[str, Any]:
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
    stream_row: time the streamed ImageNet-style input alone
      (`rows.stream_input`, `--steps` batches).
    variant_rows: time the SAM variants and options beside plain and SAM.
    image_size: the side of the models' synthetic images.

  Returns:
    The JSON-serializable figures: the headline keys (`sgd_images_per_sec`,
    `sam_images_per_sec`, `keras_sam_images_per_sec` (Keras 2),
    `keras3_sam_images_per_sec`: the rows of `headline_rows`;
    `sam_over_sgd_step_time`; None for a skipped row), `model`, `rows`
    (name -> figures, in table order; None when skipped), `profile` (row
    name -> ms/step by op type, if profile_dir and xprof) and `context`.
  """
  if profile_dir and importlib.util.find_spec('xprof') is None:
    # Said once, before the timing, which takes minutes.
    logging.warning('xprof is not installed (pip install xprof): the traces '
                    'go to %s, but no op summary of them.', profile_dir)
  if precisions is None:
    precisions = ['mixed_bfloat16'] + ['mixed_float16'] * bool(_gpu_names())
  timers, record_bytes = _input_and_conv_rows(batch_size, steps, stream_row,
                                              xla)
  for name in model_names:
    timers.update(_model_rows(
        name, batch_size, steps, rho, xla=xla, keras2=keras2,
        steps_per_loop=steps_per_loop if loop_rows else (),
        precisions=precisions if precision_rows else (),
        variant_rows=variant_rows, image_size=image_size))

  seconds = {name: [] for name, (timer, _) in timers.items() if timer}
  for round_ in range(repeats):
    for name, (timer, _) in timers.items():
      if timer:
        seconds[name].append(timer())
    logging.info('Timed round %d of %d.', round_ + 1, repeats)
  figures = {name: _figures(seconds.get(name), batch_size, row_steps)
             for name, (_, row_steps) in timers.items()}
  for name, row in figures.items():
    logging.info('%s: %s', name, row)
  headline = headline_rows(model_names[0]) if model_names else {}
  profiles = _profiles(timers, headline, profile_dir) if profile_dir else {}
  results = {'model': model_names[0] if model_names else None,
             **_headline_figures(figures, headline)}
  results.update(rows=figures, profile=profiles, context=_context(
      model_names, batch_size, steps, repeats, rho, xla,
      steps_per_loop if loop_rows else []))
  results['context'].update(stream_record_bytes=record_bytes,
                            image_size=image_size)
  return results


def headline_rows(model: str) -> dict[str, str]:
  """JSON key prefix -> row name of the headline figures (`X_images_per_sec`).

  `keras_sam` is the Keras 2 (tf_keras) SAM, the reference the benchmark was
  asked for; `keras3_sam` is this codebase's `sam.keras.SAMModel`.
  """
  return {'sgd': f'{model}: custom loop, plain (rho=0)',
          'sam': f'{model}: custom loop, SAM',
          'keras_sam': f'{model}: tf_keras (Keras 2) fit, '
                       'SharpnessAwareMinimization',
          'keras3_sam': f'{model}: Keras 3 fit, sam.keras.SAMModel'}


# Headline row -> its subdirectory of --profile_dir.
_PROFILED = {'sgd': 'plain', 'sam': 'sam', 'keras_sam': 'keras2_sam'}


def _profiles(timers: dict[str, tuple], headline: dict[str, str],
              profile_dir: str) -> dict[str, dict[str, float]]:
  """Row name -> ms/step by op type, of the timed headline rows."""
  profiles = {}
  for key, subdir in _PROFILED.items():
    timer, row_steps = timers.get(headline.get(key), (None, 0))
    if timer:
      profile = profile_lib.profile_row(timer, row_steps,
                                        os.path.join(profile_dir, subdir))
      if profile:
        profiles[headline[key]] = profile
  return profiles


def _headline_figures(figures: dict[str, Any],
                      headline: dict[str, str]) -> dict[str, float | None]:
  """X_images_per_sec (row X's best) and sam_over_sgd_step_time."""
  results = {}
  for key, row_name in headline.items():
    row = figures.get(row_name)
    results[f'{key}_images_per_sec'] = (
        row['images_per_sec_best'] if row else None)
  sgd, sam = figures.get(headline.get('sgd')), figures.get(headline.get('sam'))
  results['sam_over_sgd_step_time'] = (
      sam['ms_per_step_best'] / sgd['ms_per_step_best'] if sam and sgd
      else None)
  return results


def _input_and_conv_rows(batch_size: int, steps: int, stream_row: bool,
                         xla: bool) -> tuple[dict[str, tuple], float | None]:
  """The rows without a model: (name -> (timer, steps), record bytes)."""
  # Enough batches that the start of a fresh pipeline costs little.
  timers = {'input pipeline alone (basic augmentation)':
                (rows.input_only(batch_size, 20 * steps), 20 * steps)}
  record_bytes = None
  if stream_row:
    timer, record_bytes = rows.stream_input(batch_size, steps)
    timers[STREAM_ROW] = timer, steps
  if xla:
    for label, jit in (('graph', False), ('XLA', True)):
      timers[f'one 3x3 conv (32x32, 16 channels), forward and backward, '
             f'{label}'] = rows.conv_only(batch_size, steps, jit), steps
  return timers, record_bytes


def _model_rows(name: str, batch_size: int, steps: int, rho: float,
                xla: bool, keras2: bool, steps_per_loop: Sequence[int],
                precisions: Sequence[str], variant_rows: bool = True,
                image_size: int = 32) -> dict[str, tuple]:
  """One model's rows, set up and warmed up: name -> (timer, steps)."""
  headline = headline_rows(name)
  timers = {}
  custom_loop = functools.partial(rows.custom_loop, image_size=image_size)

  def add(row, timer, row_steps=steps):
    timers[row] = timer, row_steps
    logging.info('Set up %s.', row)

  def add_plain_and_sam(label, **overrides):
    for kind, value in (('plain', 0.0), ('SAM', rho)):
      add(f'{name}: custom loop, {kind}, {label}',
          custom_loop(name, batch_size, steps, rho=value, **overrides))

  add(headline['sgd'], custom_loop(name, batch_size, steps, rho=0.0))
  add(headline['sam'], custom_loop(name, batch_size, steps, rho=rho))
  if variant_rows:
    _variant_rows(name, batch_size, steps, rho, add, custom_loop)
  if xla:
    add_plain_and_sam('XLA', jit_compile='true')
  if steps_per_loop:
    total = math.lcm(*steps_per_loop)
    for size, timer in rows.host_loop(name, batch_size, steps_per_loop,
                                      image_size).items():
      calls = total // size
      add(f'{name}: custom loop, plain, steps_per_loop={size} '
          f'({calls} call{"s" if calls > 1 else ""} of {size})', timer, total)
  for policy in precisions:
    add_plain_and_sam(policy, dtype_policy=policy)
  add(headline['keras3_sam'],
      rows.keras3_sam_fit(name, batch_size, steps, rho, image_size))
  if keras2:
    add(f'{name}: tf_keras (Keras 2) fit, plain',
        rows.keras2_fit(name, batch_size, steps, 0.0, image_size))
    add(headline['keras_sam'],
        rows.keras2_fit(name, batch_size, steps, rho, image_size))
  return timers


def _variant_rows(name: str, batch_size: int, steps: int, rho: float, add,
                  custom_loop) -> None:
  """Adds the SAM variants' and options' rows of a model."""
  for variant in sorted(perturbations.REGISTRY):
    if variant != 'sam':
      add(f'{name}: custom loop, SAM variant={variant}',
          custom_loop(name, batch_size, steps, rho=rho, variant=variant))
  try:
    add(f'{name}: custom loop, SAM-ON (perturb_only=normalization)',
        custom_loop(name, batch_size, steps, rho=rho,
                    perturb_only='normalization'))
  except ValueError as e:
    logging.info('No SAM-ON row: %s', e)  # A model without normalization.
  add(f'{name}: custom loop, SAM, ascent pass in inference mode',
      custom_loop(name, batch_size, steps, rho=rho, ascent_mode='inference'))
  add(f'{name}: custom loop, SAM, 2 ascent steps',
      custom_loop(name, batch_size, steps, rho=rho, ascent_steps=2))
  add(f'{name}: custom loop, SAM, 2 accumulated micro-batches',
      custom_loop(name, batch_size, steps, rho=rho,
                  micro_batch_size=batch_size // 2,
                  accumulate_micro_batches=True))
  add(f'{name}: custom loop, SAM every 2nd step',
      custom_loop(name, batch_size, steps, rho=rho, every_k_steps=2))
  # LookSAM's own setting; time a multiple of 5 steps per loop.
  add(f'{name}: custom loop, LookSAM (k=5, alpha=0.7)',
      custom_loop(name, batch_size, steps, rho=rho, every_k_steps=5,
                  looksam_alpha=0.7))


def _context(model_names, batch_size, steps, repeats, rho, xla,
             steps_per_loop) -> dict[str, Any]:
  """What the figures were measured on and with."""
  return {
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
      'steps_per_loop': list(steps_per_loop),
      'cpu_model': _cpu_model(),
      'num_cpus': os.cpu_count(),
      'gpus': _gpu_names(),
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
    lines += profile_lib.profile_table(results['profile'])
  return lines


def write_json(results: dict[str, Any], path: str) -> None:
  """Writes the figures of `run_all` to `path` (local or gs://)."""
  parent = os.path.dirname(path)
  if parent:
    tf.io.gfile.makedirs(parent)
  with tf.io.gfile.GFile(path, 'w') as f:
    f.write(json.dumps(results, indent=2) + '\n')
