"""Builds the tf.distribute strategy that a config and the machine ask for."""

import glob
import json
import os

from absl import logging
import tensorflow as tf

STRATEGIES = ('auto', 'tpu', 'multi_worker', 'mirrored', 'default')


def _on_tpu_vm() -> bool:
  # TPU VMs expose their chips as /dev/accel* (v2-v4) or /dev/vfio/N (v5+);
  # TPU_NAME is set where a remote TPU is named.
  return bool(glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*') or
              os.environ.get('TPU_NAME'))


def resolve_name(name: str) -> str:
  """Maps 'auto' to the strategy this machine and environment call for."""
  if name not in STRATEGIES:
    raise ValueError(f'config.strategy={name!r} is not one of {STRATEGIES}.')
  if name != 'auto':
    return name
  if _on_tpu_vm():
    return 'tpu'
  if _tf_config():
    return 'multi_worker'
  if tf.config.list_physical_devices('GPU'):
    return 'mirrored'
  return 'default'


def create_strategy(name: str = 'auto',
                    tpu: str = '') -> tf.distribute.Strategy:
  """Creates the strategy; call it first, before any other TensorFlow op.

  Args:
    name: one of STRATEGIES (config.strategy).
    tpu: TPU name or address for the cluster resolver; '' is the local VM.

  Returns:
    The strategy.
  """
  name = resolve_name(name)
  if name == 'tpu':
    strategy = _tpu_strategy(tpu)
  elif name == 'multi_worker':
    logging.info('Multi-worker task: %s', _tf_config().get('task', {}))
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
  elif name == 'mirrored':
    strategy = tf.distribute.MirroredStrategy()
  else:
    strategy = tf.distribute.get_strategy()
  logging.info('Strategy %s (%s) with %d replicas.', name,
               type(strategy).__name__, strategy.num_replicas_in_sync)
  return strategy


def _tf_config() -> dict:
  """TF_CONFIG, parsed; one line naming it if it is no JSON object."""
  raw = os.environ.get('TF_CONFIG', '')
  try:
    value = json.loads(raw) if raw else {}
    if not isinstance(value, dict):
      raise ValueError('not a JSON object')
  except ValueError as e:
    raise ValueError(
        f'TF_CONFIG={raw!r} is invalid ({e}): set it to a JSON object such as '
        '{"cluster": {"worker": ["host1:port", "host2:port"]}, "task": '
        '{"type": "worker", "index": 0}}, or unset it.') from None
  return value


def _tpu_strategy(tpu: str) -> tf.distribute.TPUStrategy:
  """Connects to the local TPU VM's chips, or to the TPU named `tpu`."""
  if not tpu and not _on_tpu_vm():
    raise ValueError(
        "config.strategy='tpu' but this machine is no TPU VM: found no "
        '/dev/accel* or /dev/vfio/N devices and no TPU_NAME. Run on a Cloud '
        'TPU VM (created with a tpu-vm-tf-* runtime version), name a TPU '
        'with --config.tpu, or use --config.strategy=auto.')
  try:
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
        tpu=tpu or 'local')
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
  except (ValueError, RuntimeError, tf.errors.OpError) as e:
    raise ValueError(
        f'Could not initialize the TPU {tpu or "of this VM"} '
        f'(config.tpu={tpu!r}): {e}. Check that the TPU exists and is '
        'READY, that its runtime version matches this TensorFlow '
        f'({tf.__version__}), and that no other process holds it.') from None
  return tf.distribute.TPUStrategy(resolver)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  """Whether this process writes summaries, checkpoints and results."""
  if isinstance(strategy, tf.distribute.TPUStrategy):
    # A pod slice runs one client per host; the Cloud TPU runtime numbers
    # the hosts in TPU_WORKER_ID, and host 0 is the chief.
    return int(os.environ.get('TPU_WORKER_ID', '0')) == 0
  resolver = getattr(strategy, 'cluster_resolver', None)
  if resolver is None or not resolver.task_type:
    return True
  if resolver.task_type == 'chief':
    return True
  # Without a 'chief' task, worker 0 is the chief by convention.
  has_chief = 'chief' in resolver.cluster_spec().as_dict()
  return not has_chief and resolver.task_type == 'worker' and (
      resolver.task_id == 0)
