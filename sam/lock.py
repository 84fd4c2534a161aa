"""One run per workdir: a second run on a live workdir is refused.

Two runs on one workdir (a job resubmitted while the old one still runs)
would interleave their checkpoints, config.json and logs. `hold(workdir)`
takes the workdir for the life of the run:

* a local workdir: an exclusive `fcntl.flock` on `WORKDIR/lock`, which the
  kernel drops when the process ends, however it ends. The file stays (it
  names the last holder); its presence means nothing.
* a gs:// workdir (object stores have no locks): a lease, the object
  `WORKDIR/lock.json` naming its owner and when it was last renewed. The
  run renews it every `heartbeat_secs` and deletes it at exit. A run that
  finds another owner's lease renewed less than `ttl_secs` ago refuses to
  start. A run that crashed (or was SIGKILLed) leaves its lease behind: it
  expires `ttl_secs` (default 5 minutes) after its last renewal, after which
  the next run takes the workdir over; deleting `lock.json` frees it at once.
  Two runs that start within a second of each other both write a lease, then
  read it back after `settle_secs`: the one whose lease is not there refuses.
  Lease ages compare clocks of different machines (GCE VMs keep them in sync
  with NTP).

Only the chief (the host that writes checkpoints) takes the lock.
"""

from collections.abc import Iterator
import contextlib
import fcntl
import json
import os
import socket
import threading
import time
from typing import Any

from absl import logging
import tensorflow as tf

from sam import workdir as workdir_lib

TTL_SECS = 300.0
HEARTBEAT_SECS = 60.0
SETTLE_SECS = 2.0


class WorkdirBusyError(RuntimeError):
  """Another run holds the workdir."""


def _owner() -> str:
  return f'pid {os.getpid()} on {socket.gethostname()}'


def _busy(workdir: str, owner: str, detail: str = '') -> WorkdirBusyError:
  return WorkdirBusyError(
      f'--workdir={workdir} is in use by another run ({owner}{detail}). Wait '
      'for it to end or stop it, or choose another --workdir.')


@contextlib.contextmanager
def hold(workdir: str, ttl_secs: float = TTL_SECS,
         heartbeat_secs: float = HEARTBEAT_SECS,
         settle_secs: float = SETTLE_SECS,
         lease: bool | None = None) -> Iterator[None]:
  """Holds the workdir (which must exist) while the context is open.

  Args:
    workdir: the run's workdir, local or gs:// (any '://' path takes a
      lease).
    ttl_secs: a lease not renewed for this long is expired.
    heartbeat_secs: how often the lease is renewed.
    settle_secs: the wait before a new lease is read back.
    lease: take a lease object rather than a file lock; None: for gs://
      (any '://') paths only.

  Raises:
    WorkdirBusyError: if another run holds it.
  """
  if lease if lease is not None else '://' in workdir:
    with _lease(workdir, ttl_secs, heartbeat_secs, settle_secs):
      yield
  else:
    with _flock(workdir):
      yield


@contextlib.contextmanager
def _flock(workdir: str) -> Iterator[None]:
  with open(os.path.join(workdir, 'lock'), 'a+') as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      raise _busy(workdir, f.read().strip() or 'unknown') from None
    f.seek(0)
    f.truncate()
    f.write(_owner() + '\n')
    f.flush()
    yield  # Closing the file releases the lock.


def _read(path: str) -> dict[str, Any] | None:
  """The lease in `path`, or None: none, or one that holds nothing."""
  lease, problem = workdir_lib.read_object(path, ('owner', 'renewed'))
  if lease is not None and not all(
      isinstance(lease.get(k, 0.0), (int, float)) and
      not isinstance(lease.get(k), bool) for k in ('renewed', 'ttl_secs')):
    lease, problem = None, 'a lock.json whose times are no numbers'
  if problem:
    logging.warning('The workdir lease %s is %s: it holds no one.', path,
                    problem)
  return lease


def _write(path: str, owner: str, ttl_secs: float) -> None:
  with tf.io.gfile.GFile(path, 'w') as f:
    json.dump({'owner': owner, 'renewed': time.time(), 'ttl_secs': ttl_secs},
              f)


@contextlib.contextmanager
def _lease(workdir: str, ttl_secs: float, heartbeat_secs: float,
           settle_secs: float) -> Iterator[None]:
  path = os.path.join(workdir, 'lock.json')
  owner = _owner()
  lease = _read(path)
  if lease and lease.get('owner') != owner:
    age = time.time() - float(lease.get('renewed', 0))
    if age < float(lease.get('ttl_secs', ttl_secs)):
      raise _busy(workdir, lease.get('owner', 'unknown'),
                  f'; its lease {path} was renewed {age:.0f} s ago and '
                  f'expires {lease.get("ttl_secs", ttl_secs):.0f} s after '
                  'that, or at once if you delete it')
    logging.warning('Taking over %s: the lease of %s expired %.0f s ago.',
                    workdir, lease.get('owner'), age)
  _write(path, owner, ttl_secs)
  time.sleep(settle_secs)
  lease = _read(path)
  if not lease or lease.get('owner') != owner:
    raise _busy(workdir, (lease or {}).get('owner', 'unknown'),
                '; it took the lease as this run started')
  stop = threading.Event()

  def renew():
    failed = False
    while not stop.wait(heartbeat_secs):
      try:
        _write(path, owner, ttl_secs)
        failed = False
      except tf.errors.OpError as e:
        if not failed:  # Said once per spell of failures.
          logging.warning('Could not renew the workdir lease %s: %s', path, e)
        failed = True

  heartbeat = threading.Thread(target=renew, daemon=True,
                               name='workdir-lease')
  heartbeat.start()
  try:
    yield
  finally:
    stop.set()
    heartbeat.join()
    try:
      if (_read(path) or {}).get('owner') == owner:
        tf.io.gfile.remove(path)
    except tf.errors.OpError as e:
      logging.warning('Could not delete the workdir lease %s: %s', path, e)
