"""Builds the tf.distribute strategy that a config and the machine ask for."""

import glob
import json
import os
import signal
import socket
import threading
import time

from absl import logging
import tensorflow as tf

from sam import stopping

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


class PeersMissingError(RuntimeError):
  """Tasks named in TF_CONFIG did not start within the timeout."""


def create_strategy(name: str = 'auto', tpu: str = '',
                    multi_worker_timeout_secs: float = 600,
                    signals: stopping.StopFlag | None = None
                    ) -> tf.distribute.Strategy:
  """Creates the strategy; call it first, before any other TensorFlow op.

  Args:
    name: one of STRATEGIES (config.strategy).
    tpu: TPU name or address for the cluster resolver; '' is the local VM.
    multi_worker_timeout_secs: how long a multi-worker task waits for the
      other tasks in TF_CONFIG to start (config.multi_worker_timeout_secs).
    signals: the run's StopFlag; a signal ends the wait for those tasks.

  Returns:
    The strategy.
  """
  name = resolve_name(name)
  if name == 'tpu':
    strategy = _tpu_strategy(tpu)
  elif name == 'multi_worker':
    tf_config = _tf_config()
    logging.info('Multi-worker task: %s', tf_config.get('task', {}))
    wait_for_peers(tf_config, multi_worker_timeout_secs, signals)
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    if threading.current_thread() is threading.main_thread():
      # TensorFlow's preemption notifier took SIGTERM over at the C level,
      # and swallows it; give it back to the Python handler in force.
      signal.signal(signal.SIGTERM, signal.getsignal(signal.SIGTERM))
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


def wait_for_peers(tf_config: dict, timeout_secs: float,
                   signals: stopping.StopFlag | None = None) -> None:
  """Returns once every other chief and worker task in TF_CONFIG answers.

  MultiWorkerMirroredStrategy() waits for its peers forever, in C++ that
  holds the GIL, so neither a timeout nor a signal handler could end it.
  This wait comes first and is bounded: each task listens on its own
  TF_CONFIG port (TensorFlow's server takes the port over when this
  returns) and connects to every peer's port until all answer, whether the
  peer is still here or already in TensorFlow's own wait. A signal to
  `signals` ends it.

  Args:
    tf_config: TF_CONFIG, parsed.
    timeout_secs: how long to wait before giving up.
    signals: the run's StopFlag, read between the tries.

  Raises:
    stopping.Stopped: on SIGTERM or Ctrl-C.
    PeersMissingError: naming the tasks that never answered.
    ValueError: TF_CONFIG names no address for this task, or its port is
      taken by another process here.
  """
  if timeout_secs <= 0:
    raise ValueError(f'config.multi_worker_timeout_secs={timeout_secs} must '
                     'be positive (seconds to wait for the other tasks).')
  cluster, task = tf_config.get('cluster', {}), tf_config.get('task', {})
  tasks = {f'{job} {i}': address for job in ('chief', 'worker')
           for i, address in enumerate(cluster.get(job, []))}
  me = f'{task.get("type")} {task.get("index")}'
  if me not in tasks:
    if task.get('type') in ('chief', 'worker'):
      raise ValueError(f'TF_CONFIG names this task {me}, but its cluster has '
                       f'no such task: {cluster}. Fix the task type or index.')
    return  # An evaluator, say: no part in the training collectives.
  port = int(tasks.pop(me).rsplit(':', 1)[1])
  try:
    listener = socket.create_server(('', port), backlog=128)
  except OSError as e:
    raise ValueError(
        f'TF_CONFIG gives this task ({me}) port {port}, which another process '
        f'here holds ({e.strerror}): end it (a run of an earlier job?) or '
        'give this task a free port in TF_CONFIG.') from None
  deadline = time.monotonic() + timeout_secs
  with listener:
    while tasks:
      tasks = {t: a for t, a in tasks.items() if not _answers(a)}
      if tasks and time.monotonic() > deadline:
        missing = ', '.join(f'{t} ({a})' for t, a in tasks.items())
        raise PeersMissingError(
            f'Waited {timeout_secs:g} s for the other tasks in TF_CONFIG; '
            f'these never answered: {missing}. Start the same command on '
            "each of them with its own TF_CONFIG task, unset a stale "
            'TF_CONFIG, or wait longer with '
            '--config.multi_worker_timeout_secs.')
      if tasks:
        time.sleep(0.5)
      if signals is not None:
        signals.stop_if_requested()


def _answers(address: str) -> bool:
  host, port = address.rsplit(':', 1)
  try:
    with socket.create_connection((host.strip('[]'), int(port)), timeout=2):
      return True
  except OSError:
    return False


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
