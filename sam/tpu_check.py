r"""The first command on a new TPU VM or pod slice: is it ready to train?

  python -m sam.tpu_check --workdir=gs://BUCKET/tpu_check

On a pod slice, from worker 0 with the slice named (docs/tpu.md):

  TPU_NAME=NAME python -m sam.tpu_check --workdir=gs://BUCKET/tpu_check

It builds the strategy as `main.py` does (same config fields, same
environment set-up before TensorFlow loads), prints the devices, compiles
and runs SAM steps of the config's model (`--config`, by default
configs/cifar10_sam.py) on every core on synthetic data of the config's
shapes, checks that every replica holds the same weights, writes a
checkpoint into the workdir (local or gs://) and restores it, times one
loop and the save against the spot VM's 30 s notice, and ends with one line:
`Ready: ...` (exit 0) or `Not ready: ...` (exit 1) saying what to fix.
"""

import sys

from sam import environment

if __name__ == '__main__':
  environment.prepare(sys.argv)

# pylint: disable=g-import-not-at-top,wrong-import-position
import os  # noqa: E402
import time  # noqa: E402

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from sam import config_checks  # noqa: E402
from sam import distribute  # noqa: E402
from sam import input_pipeline  # noqa: E402
from sam import streaming  # noqa: E402
from sam.trainer import Trainer  # noqa: E402

# A spot VM's time between SIGTERM and the stop (Compute Engine).
NOTICE_SECS = 30
# The shapes of the config's data set, for synthetic data.
_SHAPES = {'cifar10': ((32, 32, 3), 10), 'cifar100': ((32, 32, 3), 100),
           'fashion_mnist': ((28, 28, 1), 10)}


def synthetic_like(config):
  """The config, on synthetic data of its data set's shapes."""
  dc = config.dataset
  if streaming.is_streamed(dc.name):
    shape, classes = (dc.image_size, dc.image_size, 3), 1000
  else:
    shape, classes = _SHAPES.get(dc.name, (dc.synthetic_image_shape,
                                           dc.synthetic_num_classes))
  dc.name, dc.augment = 'synthetic', 'none'
  dc.synthetic_image_shape, dc.synthetic_num_classes = shape, classes
  dc.synthetic_train_size = 2 * config.batch_size
  dc.validation_size, dc.train_subset = 0, -1
  dc.randaugment_layers = 0
  return config


def _replicas_agree(variables, strategy) -> bool:
  for v in variables:
    values = [x.numpy() for x in strategy.experimental_local_results(
        getattr(v, 'value', v))]
    if any(not np.array_equal(values[0], x) for x in values[1:]):
      return False
  return True


def check(config, workdir: str, steps: int = 0) -> tuple[bool, str]:
  """Runs the checks; returns (ready, the final line). Prints as it goes."""
  config = synthetic_like(config)
  steps = steps or config.steps_per_loop
  strategy = distribute.create_strategy(config.strategy, config.tpu,
                                        config.multi_worker_timeout_secs)
  replicas = strategy.num_replicas_in_sync
  print(f'TensorFlow {tf.__version__}; {type(strategy).__name__} with '
        f'{replicas} replicas on {tf.config.list_logical_devices()}')
  config_checks.validate_config(
      config, replicas, tpu=isinstance(strategy, tf.distribute.TPUStrategy))
  data = input_pipeline.load(config)
  trainer = Trainer(config, strategy, data.num_classes, data.image_shape,
                    steps_per_epoch=2, total_steps=10**6)
  iterator = iter(strategy.distribute_datasets_from_function(
      lambda ctx: input_pipeline.train_dataset(data, config, ctx)))

  def loop(n):
    start = time.monotonic()
    trainer.train_loop(iterator, tf.constant(n))
    sums = trainer.state.train_sums.numpy()  # Waits for the loop's end.
    return time.monotonic() - start, np.isfinite(sums).all()

  compile_secs, finite = loop(1)
  print(f'Compiled and ran one step of {config.model.name} with '
        f'sam.rho={config.sam.rho} on every replica: {compile_secs:.1f} s')
  loop_secs, finite_too = loop(steps)
  rate = steps * config.batch_size / loop_secs
  print(f'One loop of {steps} steps: {loop_secs:.2f} s ({rate:.0f} images/s)')
  if not (finite and finite_too):
    return False, 'the loss or gradient norm was not finite on random data'
  model, checkpoint = trainer.state.model, trainer.state.checkpoint
  if not _replicas_agree(model.variables, strategy):
    return False, 'the replicas hold different weights after the steps'
  directory = os.path.join(workdir, 'tpu_check')
  start = time.monotonic()
  try:
    path = checkpoint.write(os.path.join(directory, 'ckpt'))
  except tf.errors.OpError as e:
    return False, f'cannot write to --workdir={workdir}: {e.message}'
  save_secs = time.monotonic() - start
  saved = [v.numpy() for v in model.variables]
  for v in model.variables:
    v.assign(tf.zeros_like(v))
  checkpoint.read(path).assert_existing_objects_matched()
  if any(not np.array_equal(a, v.numpy())
         for a, v in zip(saved, model.variables)):
    return False, f'the checkpoint read back from {path} differs'
  tf.io.gfile.rmtree(directory)
  print(f'Wrote and restored a checkpoint in {directory}: {save_secs:.2f} s')
  worst = loop_secs + save_secs
  if worst > NOTICE_SECS:
    note = (f'one loop and a save ({worst:.0f} s) would overrun a spot '
            f"VM's {NOTICE_SECS} s notice without config.stop_within_secs")
  else:
    note = f'one loop and a save take {worst:.1f} s'
  return True, (f'{replicas} replicas train {config.model.name} at '
                f'{rate:.0f} images/s; {note}')


def _define_flags() -> None:
  """The command's flags (here, not at import: main.py has its own)."""
  flags.DEFINE_string(
      'workdir', None, 'Where the test checkpoint goes (local or gs://): the '
      "runs' workdir or bucket, to test that it is writable from here.")
  config_flags.DEFINE_config_file(
      'config', 'configs/cifar10_sam.py', 'The config whose model, batch and '
      'strategy to check.', lock_config=False)
  flags.DEFINE_integer(
      'steps', 0, 'Steps of the timed loop; 0 takes config.steps_per_loop.')
  flags.mark_flags_as_required(['workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  fv = flags.FLAGS
  try:
    ready, line = check(fv.config, fv.workdir, fv.steps)
  except (ValueError, distribute.PeersMissingError) as e:
    ready, line = False, str(e)
  print(f'{"Ready" if ready else "Not ready"}: {line}', flush=True)
  if not ready:
    sys.exit(1)


if __name__ == '__main__':
  _define_flags()
  app.run(main)
