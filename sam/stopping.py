"""SIGTERM and Ctrl-C: a run stops where nothing is lost, and says so."""

import signal
import threading
import time

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


class LoopLength:
  """Caps the steps of the next loop so that, after SIGTERM, the loop in
  flight and the checkpoint after it end within `within_secs`.

  A spot TPU VM gets about 30 s between SIGTERM and the stop, and the
  compiled loop cannot be interrupted between its steps; so loops are kept
  short enough: their length comes from the step and save times the run
  measured itself (the first loop, whose time includes the compilation,
  runs one step). A loop ends where it would anyway; only its length
  changes, not what it computes.
  """

  def __init__(self, within_secs: float):
    self.within_secs = within_secs
    self._step_secs: float | None = None
    self._save_secs = 0.0

  def cap(self, steps_per_loop: int) -> int:
    """The most steps the next loop may run."""
    if self.within_secs <= 0:
      return steps_per_loop
    if self._step_secs is None:
      return 1
    fit = int((self.within_secs - self._save_secs) / self._step_secs)
    return max(1, min(steps_per_loop, fit))

  def timed(self, steps: int, start: float) -> None:
    """Records a loop of `steps` steps that began at `start` (monotonic)."""
    self._step_secs = (time.monotonic() - start) / steps

  def timed_save(self, start: float) -> None:
    self._save_secs = time.monotonic() - start
