"""Where a step's time goes: one timed loop of a row under tf.profiler."""

import collections
import json

import tensorflow as tf

from sam.benchmark.rows import Timer


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
