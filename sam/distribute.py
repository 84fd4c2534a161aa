"""Builds the tf.distribute strategy that a config and the machine ask for."""

import importlib.util
import json
import os
import signal
import socket
import threading
import time
import urllib.request

from absl import logging
import tensorflow as tf

from sam import environment
from sam import stopping

STRATEGIES = ('auto', 'tpu', 'multi_worker', 'mirrored', 'default')


def tpu_name(config_tpu: str = '') -> str:
  """The TPU this process drives: config.tpu, else TPU_NAME ('' is none)."""
  return config_tpu or os.environ.get('TPU_NAME', '')


def resolve_name(name: str, tpu: str = '') -> str:
  """Maps 'auto' to the strategy this machine and environment call for."""
  if name not in STRATEGIES:
    raise ValueError(f'config.strategy={name!r} is not one of {STRATEGIES}.')
  if name != 'auto':
    return name
  if environment.has_tpu_chips() or tpu_name(tpu):
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
    tpu: TPU name or address for the cluster resolver (config.tpu); ''
      takes TPU_NAME, and without it the local VM's chips.
    multi_worker_timeout_secs: how long a multi-worker task waits for the
      other tasks in TF_CONFIG to start (config.multi_worker_timeout_secs).
    signals: the run's StopFlag; a signal ends the wait for those tasks.

  Returns:
    The strategy.
  """
  name = resolve_name(name, tpu)
  if name == 'tpu':
    strategy = _tpu_strategy(tpu_name(tpu))
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


_METADATA = ('http://metadata.google.internal/computeMetadata/v1/instance/'
             'attributes/')


def tpu_vm_metadata(key: str) -> str | None:
  """An attribute of this TPU VM from the GCE metadata server, e.g.
  'agent-worker-number', 'accelerator-type', 'worker-network-endpoints'
  (GCE sets no environment variable for them); None where there is none."""
  request = urllib.request.Request(_METADATA + key,
                                   headers={'Metadata-Flavor': 'Google'})
  try:
    with urllib.request.urlopen(request, timeout=5) as response:
      return response.read().decode()
  except OSError:
    return None


_POD_COMMAND = (
    'gcloud compute tpus tpu-vm ssh TPU_NAME --zone=ZONE --worker=0 '
    "--command='cd PATH && TPU_NAME=TPU_NAME TPU_LOAD_LIBRARY=0 "
    ".venv/bin/python main.py --config=... --workdir=gs://...'")


def check_pod_worker() -> None:
  """Refuses, in one line, a process started without a TPU name on a pod
  slice's host: TensorFlow drives a pod slice from one process, on worker 0,
  that names the slice (docs/tpu.md); on its own the host would train alone
  on its own chips."""
  endpoints = tpu_vm_metadata('worker-network-endpoints')
  hosts = len(endpoints.split(',')) if endpoints else 1
  if hosts <= 1:
    return
  worker = tpu_vm_metadata('agent-worker-number') or '?'
  slice_type = tpu_vm_metadata('accelerator-type') or 'a pod slice'
  what = ('do not start it here' if worker != '0' else
          'name the slice here')
  raise ValueError(
      f'This VM is worker {worker} of {slice_type} ({hosts} hosts), and no '
      'TPU is named. TensorFlow drives a pod slice from one process on '
      f'worker 0 that names the slice ({what}): {_POD_COMMAND}')


def _tpu_strategy(tpu: str) -> tf.distribute.TPUStrategy:
  """Connects to the local TPU VM's chips, or to the TPU named `tpu`."""
  if not tpu and not environment.has_tpu_chips():
    raise ValueError(
        "config.strategy='tpu' but this machine is no TPU VM: found no "
        '/dev/accel* or /dev/vfio/N devices and no TPU_NAME. Run on a Cloud '
        'TPU VM (created with a tpu-vm-tf-* runtime version), name a TPU '
        'with --config.tpu, or use --config.strategy=auto.')
  if tpu in ('', 'local'):
    check_pod_worker()
  elif not tpu.startswith('grpc://'):
    missing = [m for m in ('googleapiclient', 'oauth2client')
               if importlib.util.find_spec(m) is None]
    if missing:
      raise ValueError(
          f'Naming a TPU (TPU {tpu!r}) makes TensorFlow ask the Cloud TPU '
          f'API for its hosts, which needs {" and ".join(missing)}: pip '
          'install -r requirements-tpu-client.txt.')
  try:
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
        tpu=tpu or 'local')
    tf.config.experimental_connect_to_cluster(resolver)
    topology = tf.tpu.experimental.initialize_tpu_system(resolver)
  except (ValueError, RuntimeError, tf.errors.OpError) as e:
    raise ValueError(
        f'Could not initialize the TPU {tpu or "of this VM"} '
        f'(config.tpu or TPU_NAME: {tpu!r}): {e}. Check that the TPU exists '
        'and is READY, that its runtime version matches this TensorFlow '
        f'({tf.__version__}), and that no other process holds it.') from None
  strategy = tf.distribute.TPUStrategy(resolver)
  _log_tpu(tpu, topology, strategy)
  return strategy


def _log_tpu(tpu: str, topology, strategy: tf.distribute.Strategy) -> None:
  """The TPU preflight's log: what was found, against what was created."""
  accelerator = tpu_vm_metadata('accelerator-type') if not tpu or (
      tpu == 'local') else None
  expected = expected_replicas(accelerator) if accelerator else None
  logging.info(
      'TPU %s: %d replicas on %d hosts%s; PJRT: %s.', tpu or 'of this VM',
      strategy.num_replicas_in_sync, getattr(topology, 'num_tasks', 1),
      f' ({accelerator} has {expected})' if expected else '',
      ', '.join(f'{v}={os.environ[v]}' for v in environment.PJRT_VARIABLES
                if v in os.environ) or 'off')
  if expected and expected != strategy.num_replicas_in_sync:
    logging.warning('This TPU VM is a %s, which has %d TensorFlow devices, '
                    'but %d replicas started: is the slice healthy?',
                    accelerator, expected, strategy.num_replicas_in_sync)


def expected_replicas(accelerator_type: str) -> int | None:
  """TensorFlow's TPU devices in a slice, from its accelerator type: the
  suffix counts TensorCores on v2, v3 (one device each), v4 and v5p (two
  per chip, one megacore device); chips on v5e and v6e (one core each)."""
  generation, _, size = accelerator_type.rpartition('-')
  if not size.isdigit():
    return None
  if generation in ('v4', 'v5p'):
    return int(size) // 2
  return int(size)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  """Whether this process writes summaries, checkpoints and results."""
  resolver = getattr(strategy, 'cluster_resolver', None)
  if isinstance(strategy, tf.distribute.TPUStrategy):
    # One client drives the whole slice (check_pod_worker refused the other
    # hosts): its resolver's task is the chief.
    return resolver is None or not resolver.task_id
  if resolver is None or not resolver.task_type:
    return True
  if resolver.task_type == 'chief':
    return True
  # Without a 'chief' task, worker 0 is the chief by convention.
  has_chief = 'chief' in resolver.cluster_spec().as_dict()
  return not has_chief and resolver.task_type == 'worker' and (
      resolver.task_id == 0)
