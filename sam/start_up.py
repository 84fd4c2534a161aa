"""TensorFlow's C++ notices as it loads, held off the console.

TensorFlow reads TF_CPP_MIN_LOG_LEVEL once its log is set up; 2.21 prints
some INFO lines before that, whatever the level: e.g. wherever its oneDNN
operations are on (TF_ENABLE_ONEDNN_OPTS=1, or by default on a CPU with
AVX512_VNNI, as the AMD EPYC these lines come from):

  WARNING: All log messages before absl::InitializeLog() is called are ...
  I0000 00:00:1796631568.941801   25907 port.cc:153] oneDNN custom ...

`Held()` routes the process's stderr (file descriptor 2, where C++ writes)
through a filter process while TensorFlow loads: lines in absl's format
below the level go to `lines()` (main.py writes them into the workdir's
log), and every other line, a Python warning, an error or the last words of
an abort, reaches the console at once. The filter is a process, not a
thread, so that what TensorFlow prints before it aborts still gets through.
"""

import os
import re
import signal
import subprocess
import sys
from typing import IO

# absl's prefix: severity (INFO, WARNING, ERROR, FATAL), then MMDD.
_ABSL_LINE = re.compile(r'([IWEF])\d{4} ')
_BEFORE_INIT = ('WARNING: All log messages before absl::InitializeLog() is '
                'called are written to STDERR')


def level(line: str) -> int | None:
  """The absl severity of a C++ log line (0 INFO to 3 FATAL), else None."""
  if line.startswith(_BEFORE_INIT):
    return 1
  match = _ABSL_LINE.match(line)
  return 'IWEF'.index(match.group(1)) if match else None


def min_level(environ=None) -> int:
  """TF_CPP_MIN_LOG_LEVEL; 0 if unset or not a number."""
  value = (os.environ if environ is None else environ).get(
      'TF_CPP_MIN_LOG_LEVEL', '0')
  return int(value) if value.strip().isdigit() else 0


def split(source: IO[bytes], console: IO[bytes], held: IO[bytes],
          below: int) -> None:
  """Copies each line of `source` to `held` if it is a log line below
  `below`, else to `console` at once; reads to the end whatever fails."""
  for line in source:
    severity = level(line.decode('utf-8', 'replace'))
    out = held if severity is not None and severity < below else console
    try:
      out.write(line)
      out.flush()
    except OSError:  # Held lines of a process that died: nobody to read.
      pass


class Held:
  """Holds C++ log lines below TF_CPP_MIN_LOG_LEVEL until `lines()`.

  Nothing is held where the level is 0 (every line was asked for).
  """

  def __init__(self):
    self._console = None
    self._filter = None
    below = min_level()
    if below <= 0:
      return
    sys.stderr.flush()
    try:
      self._filter = subprocess.Popen(
          [sys.executable, '-I', '-S', os.path.abspath(__file__), str(below)],
          stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    except OSError:  # No interpreter to start (embedded): nothing held.
      return
    self._console = os.dup(2)
    os.dup2(self._filter.stdin.fileno(), 2)

  def lines(self) -> list[str]:
    """Gives stderr back; returns the lines held (once)."""
    if self._filter is None:
      return []
    sys.stderr.flush()
    os.dup2(self._console, 2)
    os.close(self._console)
    try:
      held, _ = self._filter.communicate(timeout=10)
    except subprocess.TimeoutExpired:  # A child of ours holds the pipe.
      self._filter.kill()
      held = b''
    self._filter = None
    return held.decode('utf-8', 'replace').splitlines()


if __name__ == '__main__':
  # The filter: its stderr is the console, its stdout what is held. It ends
  # when the pipe does (the loading process gave stderr back, or died);
  # Ctrl-C or SIGTERM sent to the whole group are for the loading process.
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  split(sys.stdin.buffer, sys.stderr.buffer, sys.stdout.buffer,
        int(sys.argv[1]))
  os._exit(0)  # Each line was flushed; a dead reader's buffer is dropped.
