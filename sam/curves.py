"""Training curves of several runs from their TensorBoard summaries.

`read_scalars(workdir)` reads every `events.out.tfevents*` file directly in
a workdir (local or gs://; a resumed run adds a file per start) and returns
each tag's (steps, values). clu's metric writers write scalars as tensor
summaries (TF2 `tf.summary.scalar`), older writers as `simple_value`; both
are read. When a resumed run wrote a step twice, the later write wins.

`plot_curves(runs, path)` draws loss and accuracy side by side, train dashed,
validation dotted (if the run held one out) and test solid, one colour per
run.
"""

from collections.abc import Mapping
import io
import os

from absl import logging
from matplotlib import figure
from matplotlib.backends import backend_agg
import numpy as np
import tensorflow as tf

from sam import landscape

Scalars = dict[str, tuple[np.ndarray, np.ndarray]]


def read_scalars(workdir: str) -> Scalars:
  """All scalar summaries in a workdir.

  Args:
    workdir: a run's workdir, local or gs://.

  Returns:
    tag -> (steps, values), sorted by step.

  Raises:
    FileNotFoundError: if the workdir holds no event files.
  """
  # Listed, not globbed: a workdir's path may hold [ ] * ? (a sweep's name).
  names = tf.io.gfile.listdir(workdir) if tf.io.gfile.isdir(workdir) else []
  paths = [os.path.join(workdir, name) for name in names
           if name.startswith('events.out.tfevents')]
  if not paths:
    raise FileNotFoundError(f'No events.out.tfevents* files in {workdir}.')
  # (wall_time, step, value) per tag, so later writes of a step win.
  points: dict[str, list[tuple[float, int, float]]] = {}
  for path in paths:
    try:
      _read_events(path, points)
    except tf.errors.DataLossError:
      # A run still writing (or killed mid-write) leaves a truncated last
      # record: keep what came before it.
      logging.warning('%s ends in a truncated record; read up to it.', path)
  scalars = {}
  for tag, rows in points.items():
    by_step = {step: number for _, step, number in sorted(rows)}
    steps = np.array(sorted(by_step))
    scalars[tag] = (steps, np.array([by_step[s] for s in steps]))
  return scalars


def _read_events(path: str,
                 points: dict[str, list[tuple[float, int, float]]]) -> None:
  """Appends the scalars of one event file to `points`."""
  # tf.data rather than summary_iterator, which warns of its deprecation.
  for record in tf.data.TFRecordDataset(path):
    event = tf.compat.v1.Event.FromString(record.numpy())
    for value in event.summary.value:
      if value.HasField('tensor'):
        array = tf.make_ndarray(value.tensor)
        if array.ndim or not np.issubdtype(array.dtype, np.number):
          continue  # Not a scalar (text, image or histogram summaries).
        number = float(array)
      elif value.HasField('simple_value'):
        number = float(value.simple_value)
      else:
        continue
      points.setdefault(value.tag, []).append(
          (event.wall_time, event.step, number))


def plot_curves(runs: Mapping[str, Scalars], path: str,
                title: str = '') -> None:
  """Train/test loss and accuracy of several runs, side by side.

  Args:
    runs: label -> the run's `read_scalars`.
    path: the PNG to write (local or gs://).
    title: the figure's title.
  """
  fig = figure.Figure(figsize=(9, 3.4), dpi=90)
  axes = fig.subplots(1, 2)
  palette = ['tab:red', 'tab:blue', 'tab:green', 'tab:purple', 'tab:orange']
  losses = []
  for (label, scalars), color in zip(runs.items(), palette * 10):
    for ax, metric in zip(axes, ('loss', 'accuracy')):
      for split, style, name in (('train', '--', 'train'),
                                 ('val', ':', 'validation'),
                                 ('eval', '-', 'test')):
        tag = f'{split}/{metric}'
        if tag not in scalars:
          continue
        steps, values = scalars[tag]
        if metric == 'loss':
          losses.append(values)
        scale = 100 if metric == 'accuracy' else 1
        ax.plot(steps, scale * values, style, color=color,
                label=f'{label} ({name})', marker='.' if len(steps) < 20
                else None)
  axes[0].set_ylabel('loss')
  landscape.loss_axis(axes[0], losses)
  axes[1].set_ylabel('accuracy (%)')
  for ax in axes:
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
  axes[1].legend(fontsize=8)
  if title:
    fig.suptitle(title)
  backend_agg.FigureCanvasAgg(fig)
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', bbox_inches='tight')
  with tf.io.gfile.GFile(path, 'wb') as f:
    f.write(buffer.getvalue())
