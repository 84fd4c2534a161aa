"""Loss landscapes: 1-D and 2-D slices around a checkpoint, lines between two.

Li et al., "Visualizing the Loss Landscape of Neural Nets", NeurIPS 2018:
plot L(w + a d1 + b d2) for random directions d1, d2 scaled filter by filter
to the norms of the weights' filters ("filter normalization"), so that the
plots of two networks are comparable whatever the scale of their weights
(ReLU nets are scale-invariant filter by filter; unnormalized directions
would make the larger-weight net look flatter). Biases and batch-norm
parameters (1-D params) get no direction: they stay at their values.
Goodfellow et al. (2015) plot the line (1 - t) w_A + t w_B between two
solutions, e.g. an SGD and a SAM minimum.

Everything here takes an `evaluate(params, state=None) -> (loss, accuracy)`
(`sam.sharpness.evaluate_params` builds one that runs batch-wise under a
strategy), so the grids are plain NumPy and the plots plain matplotlib, drawn
with the Agg canvas (no display, no global pyplot state). Outputs may go to
gs:// (written through `tf.io.gfile`).
"""

from collections.abc import Callable, Mapping, Sequence
import io
import json
from typing import Any

from matplotlib import cm
from matplotlib import colors
from matplotlib import figure
from matplotlib import ticker
from matplotlib.backends import backend_agg
import numpy as np
import tensorflow as tf

Evaluate = Callable[..., tuple[float, float]]
Params = Sequence[np.ndarray | tf.Tensor]


def random_direction(params: Params, seed: int = 0) -> list[np.ndarray]:
  """A Gaussian direction, filter-normalized to `params` (Li et al. 2018).

  Each filter of a kernel (the slice along its last axis: an output channel
  of a Keras conv kernel [h, w, in, out], an output unit of a dense kernel
  [in, out]) is scaled to the norm of the same filter of the weights; 1-D
  params (biases, batch-norm scales and offsets) get zero.

  Args:
    params: the weights w, one array per trainable variable.
    seed: of the Gaussian draw; the same seed gives the same draw for any
      params of the same shapes, so two models can share a direction.

  Returns:
    d, one float array per param.
  """
  rng = np.random.default_rng(seed)
  direction = []
  for p in params:
    p = np.asarray(p)
    d = rng.standard_normal(p.shape).astype(p.dtype)
    if p.ndim <= 1:
      direction.append(np.zeros_like(p))
      continue
    axes = tuple(range(p.ndim - 1))
    d_norm = np.sqrt(np.sum(d**2, axis=axes, keepdims=True))
    p_norm = np.sqrt(np.sum(p**2, axis=axes, keepdims=True))
    direction.append(d * p_norm / (d_norm + 1e-10))
  return direction


def _moved(params: Params, steps: Sequence[tuple[float, Params]]
           ) -> list[np.ndarray]:
  out = [np.asarray(p, np.float32).copy() for p in params]
  for scale, direction in steps:
    for o, d in zip(out, direction):
      o += scale * np.asarray(d, o.dtype)
  return out


def surface(evaluate: Evaluate, params: Params, directions: Sequence[Params],
            coordinates: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
  """Loss and accuracy on the grid w + sum_i c_i d_i (1-D or 2-D).

  Args:
    evaluate: `evaluate(params) -> (loss, accuracy)`.
    params: the centre w.
    directions: one direction (a 1-D slice) or two (a 2-D surface).
    coordinates: one array of coefficients per direction.

  Returns:
    {'coordinates': list, 'loss': grid, 'accuracy': grid}; grids are
    indexed [i] in 1-D and [i, j] (i along the first direction) in 2-D.
  """
  if len(directions) != len(coordinates) or len(directions) not in (1, 2):
    raise ValueError('Give one or two directions, each with coordinates.')
  coordinates = [np.asarray(c, np.float64) for c in coordinates]
  shape = tuple(len(c) for c in coordinates)
  loss = np.zeros(shape)
  accuracy = np.zeros(shape)
  for index in np.ndindex(*shape):
    point = _moved(params, [(c[i], d) for c, i, d in
                            zip(coordinates, index, directions)])
    loss[index], accuracy[index] = evaluate(point)
  return {'coordinates': coordinates, 'loss': loss, 'accuracy': accuracy}


def loss_rise(result: Mapping[str, Any], radii: Sequence[float]
              ) -> dict[float, float]:
  """How fast the loss of a 1-D or 2-D grid rises away from its centre.

  A number to compare basins by: the mean of L - L(centre) over the grid
  points at distance r (within half a grid step) from the centre, which is
  the point of the grid closest to the origin.

  Args:
    result: from `surface`.
    radii: the distances r, in direction units.

  Returns:
    r -> the mean rise (NaN where no grid point lies at that distance).
  """
  coordinates = [np.asarray(c) for c in result['coordinates']]
  grids = np.meshgrid(*coordinates, indexing='ij')
  distance = np.sqrt(sum(g**2 for g in grids))
  loss = np.asarray(result['loss'])
  centre = loss[np.unravel_index(np.argmin(distance), distance.shape)]
  half_step = max(np.min(np.diff(c)) for c in coordinates) / 2
  rise = {}
  for r in radii:
    ring = np.abs(distance - r) <= half_step + 1e-9
    rise[r] = float(np.mean(loss[ring] - centre)) if ring.any() else np.nan
  return rise


def line(evaluate: Evaluate, params_a: Params, params_b: Params,
         ts: np.ndarray, state_a: Params | None = None,
         state_b: Params | None = None) -> dict[str, np.ndarray]:
  """Loss and accuracy along (1 - t) w_A + t w_B.

  Non-trainable state (batch-norm moving statistics), if given, is
  interpolated with t clipped to [0, 1]: beyond the endpoints a linear
  extrapolation of a moving variance can turn negative.

  Args:
    evaluate: `evaluate(params, state) -> (loss, accuracy)`.
    params_a: w_A (t = 0).
    params_b: w_B (t = 1), of the same shapes.
    ts: the values of t.
    state_a: non-trainable values of A, or None to use the model's own.
    state_b: those of B.

  Returns:
    {'coordinates': [ts], 'loss': [len(ts)], 'accuracy': [len(ts)]}.
  """
  ts = np.asarray(ts, np.float64)
  delta = [np.asarray(b, np.float32) - np.asarray(a, np.float32)
           for a, b in zip(params_a, params_b)]
  loss, accuracy = np.zeros(len(ts)), np.zeros(len(ts))
  for i, t in enumerate(ts):
    state = None
    if state_a is not None and len(state_a):
      s = float(np.clip(t, 0.0, 1.0))
      state = [(1 - s) * np.asarray(a) + s * np.asarray(b)
               for a, b in zip(state_a, state_b)]
    loss[i], accuracy[i] = evaluate(_moved(params_a, [(t, delta)]), state)
  return {'coordinates': [ts], 'loss': loss, 'accuracy': accuracy}


def save_grid(result: Mapping[str, Any], path_prefix: str,
              **metadata: Any) -> None:
  """Writes a grid as `path_prefix.npz` and `path_prefix.json`.

  Args:
    result: from `surface` or `line`, or a dict label -> such results.
    path_prefix: local or gs:// path without extension.
    **metadata: JSON-able settings to store beside the grid.
  """
  flat = {}

  def walk(node, prefix):
    for key, value in node.items():
      name = f'{prefix}{key}'
      if isinstance(value, Mapping):
        walk(value, name + '/')
      elif key == 'coordinates':
        for i, c in enumerate(value):
          flat[f'{name}_{i}'] = np.asarray(c)
      else:
        flat[name] = np.asarray(value)

  walk(result, '')
  buffer = io.BytesIO()
  np.savez(buffer, **flat)
  with tf.io.gfile.GFile(path_prefix + '.npz', 'wb') as f:
    f.write(buffer.getvalue())
  with tf.io.gfile.GFile(path_prefix + '.json', 'w') as f:
    json.dump({'metadata': metadata,
               'arrays': {k: v.tolist() for k, v in flat.items()}}, f)


def _save(fig: figure.Figure, path: str) -> None:
  backend_agg.FigureCanvasAgg(fig)
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=fig.dpi, bbox_inches='tight')
  with tf.io.gfile.GFile(path, 'wb') as f:
    f.write(buffer.getvalue())


_LINESTYLES = {'train': '--', 'validation': ':', 'test': '-'}


def loss_axis(ax: Any, values: Sequence[np.ndarray]) -> None:
  """A log scale for losses spanning decades, with plain tick labels."""
  values = np.concatenate([np.ravel(v) for v in values])
  values = values[np.isfinite(values) & (values > 0)]
  if values.size and values.max() > 20 * values.min():
    ax.set_yscale('log')
    ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ticker.FormatStrFormatter('%g'))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())


def plot_curves_1d(results: Mapping[str, Mapping[str, Mapping[str, Any]]],
                   path: str, xlabel: str, title: str = '') -> None:
  """Loss and accuracy along one coordinate, side by side.

  Args:
    results: label -> split -> a 1-D result of `surface` or `line`.
    path: the PNG to write.
    xlabel: the name of the coordinate.
    title: the figure's title.
  """
  fig = figure.Figure(figsize=(9, 3.4), dpi=90)
  loss_ax, acc_ax = fig.subplots(1, 2)
  palette = ['tab:red', 'tab:blue', 'tab:green', 'tab:purple', 'tab:orange']
  losses = []
  for (label, splits), color in zip(results.items(), palette * 10):
    for split, result in splits.items():
      x = result['coordinates'][0]
      style = _LINESTYLES.get(split, '-')
      name = f'{label} ({split})'
      loss_ax.plot(x, result['loss'], style, color=color, label=name)
      losses.append(np.asarray(result['loss']))
      acc_ax.plot(x, 100 * np.asarray(result['accuracy']), style,
                  color=color, label=name)
  loss_axis(loss_ax, losses)
  loss_ax.set_ylabel('loss')
  acc_ax.set_ylabel('accuracy (%)')
  for ax in (loss_ax, acc_ax):
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
  acc_ax.legend(fontsize=8)
  if title:
    fig.suptitle(title)
  _save(fig, path)


def _levels(grids: Sequence[np.ndarray], num: int = 15) -> np.ndarray:
  """Log-spaced contour levels over the low-loss part shared by all grids."""
  low = max(min(float(np.min(g)) for g in grids), 1e-4)
  # The loss explodes far from the minimum; the shape near it is the point.
  high = min(max(float(np.max(g)) for g in grids), 50 * low + 5.0)
  return np.geomspace(low, high, num)


def plot_contours(results: Mapping[str, Mapping[str, Any]], path: str,
                  title: str = '') -> None:
  """Loss contours of 2-D surfaces, side by side with shared levels.

  Args:
    results: label -> a 2-D result of `surface`.
    path: the PNG to write.
    title: the figure's title.
  """
  grids = [np.asarray(r['loss']) for r in results.values()]
  levels = _levels(grids)
  norm = colors.LogNorm(levels[0], levels[-1])
  n = len(results)
  fig = figure.Figure(figsize=(4 * n + 0.8, 3.6), dpi=80)
  axes = np.atleast_1d(fig.subplots(1, n, sharey=True))
  mappable = None
  for ax, (label, result) in zip(axes, results.items()):
    a, b = result['coordinates']
    loss = np.clip(np.asarray(result['loss']), levels[0], levels[-1])
    # The grid is indexed [i along d1, j along d2]: x is d1.
    mappable = ax.contourf(a, b, loss.T, levels=levels, norm=norm,
                           cmap='viridis', extend='max')
    ax.contour(a, b, loss.T, levels=levels, colors='white', linewidths=0.4)
    ax.plot([0], [0], 'r+', markersize=10)
    ax.set_title(label)
    ax.set_xlabel('direction 1')
    ax.set_aspect('equal')
  axes[0].set_ylabel('direction 2')
  bar = fig.colorbar(mappable, ax=list(axes), shrink=0.9)
  bar.set_ticks(levels[::2])
  bar.ax.yaxis.set_major_formatter(ticker.FormatStrFormatter('%.3g'))
  bar.ax.yaxis.set_minor_locator(ticker.NullLocator())
  bar.set_label('loss')
  if title:
    fig.suptitle(title)
  _save(fig, path)


def plot_surfaces(results: Mapping[str, Mapping[str, Any]], path: str,
                  title: str = '') -> None:
  """3-D loss surfaces, side by side on the same log z scale.

  The height is log10 of the loss (labelled with the loss itself): on a
  linear scale the basin, where the runs differ, is a flat floor under the
  walls far from the minimum.

  Args:
    results: label -> a 2-D result of `surface`.
    path: the PNG to write.
    title: the figure's title.
  """
  grids = [np.asarray(r['loss']) for r in results.values()]
  levels = _levels(grids)
  n = len(results)
  low, high = np.log10(levels[0]), np.log10(levels[-1])
  ticks = [t for t in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50,
                       100) if low <= np.log10(t) <= high]
  fig = figure.Figure(figsize=(4.2 * n, 4.0), dpi=80)
  for k, (label, result) in enumerate(results.items()):
    ax = fig.add_subplot(1, n, k + 1, projection='3d')
    a, b = np.meshgrid(*result['coordinates'], indexing='ij')
    height = np.log10(np.clip(np.asarray(result['loss']), levels[0],
                              levels[-1]))
    ax.plot_surface(a, b, height, cmap=cm.viridis, rstride=1, cstride=1,
                    linewidth=0.1, edgecolor='k', antialiased=False,
                    norm=colors.Normalize(low, high))
    ax.set_zlim(low, high)
    ax.set_zticks(np.log10(ticks))
    ax.set_zticklabels([f'{t:g}' for t in ticks])
    ax.set_title(label, y=1.0)
    ax.set_xlabel('direction 1')
    ax.set_ylabel('direction 2')
    ax.set_zlabel('loss (log)')
  if title:
    fig.suptitle(title)
  _save(fig, path)
