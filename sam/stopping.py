"""SIGTERM and Ctrl-C: a run stops where nothing is lost, and says so."""

import signal
import threading

from absl import logging


class Stopped(BaseException):
  """A signal during start-up: the run ends before training; nothing to save.

  A BaseException, as KeyboardInterrupt is, so that no `except Exception`
  on the way out swallows it.
  """


class StopFlag:
  """Turns SIGTERM and SIGINT into a flag that the run reads where it is safe.

  SIGTERM (a preemption, `gcloud ... stop`, `kill`) and a first Ctrl-C make
  the host loop finish its current call, save a checkpoint and return; the
  same command resumes from there. During the start-up (the wait for the
  other hosts, the data, the model) the run stops after the current stage
  instead (`stop_if_requested`), before anything is trained. A second Ctrl-C
  stops at once (KeyboardInterrupt), losing the steps since the last
  checkpoint. The flag is read, never raised from the handler: an exception
  raised wherever a signal lands (inside TensorFlow's tracing, say) can
  break the clean-up on its way out. Only the main thread can install signal
  handlers, so elsewhere (tests in threads) this is inert.
  """

  _SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested_by: str | None = None
    self._previous = {}

  @property
  def requested(self) -> bool:
    return self.requested_by is not None

  def stop_if_requested(self) -> None:
    """Raises Stopped if a signal came: the start-up's stage boundaries."""
    if self.requested:
      raise Stopped(f'{self.requested_by} before training started; nothing '
                    'was trained. Run the same command to start again.')

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for signum in self._SIGNALS:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if signum == signal.SIGINT and self.requested_by == name:
      raise KeyboardInterrupt
    logging.warning('%s: stopping after the current loop (or start-up '
                    'stage)%s.', name,
                    ' (Ctrl-C again to stop at once)'
                    if signum == signal.SIGINT else '')
    self.requested_by = self.requested_by or name

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
