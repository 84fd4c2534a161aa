"""The measures and pictures of `python -m sam.analyze`, on restored runs."""

from collections.abc import Sequence
import os
from typing import Any

from absl import logging
import numpy as np
import tensorflow as tf

from sam import curves as curves_lib
from sam import hessian
from sam import landscape
from sam import sharpness
from sam.analyze import runs as runs_lib


def measure_sharpness(runs: Sequence[runs_lib.Run],
                      strategy: tf.distribute.Strategy,
                      splits: Sequence[str] = ('train',),
                      batch_size: int = 0, num_batches: int = 8,
                      rho: float = 0.05, num_steps: int = 1,
                      adaptive: bool = False, eta: float = 0.01
                      ) -> dict[str, dict[str, Any]]:
  """m-sharpness of each run on each split (m = batch_size).

  Args:
    runs: the runs.
    strategy: the strategy their models were built under.
    splits: of 'train', 'validation', 'test'.
    batch_size: m; 0 takes each run's config.batch_size.
    num_batches: how many batches (-1: the whole split).
    rho: the radius; the same for all runs, so they compare.
    num_steps: ascent steps (1: SAM's estimate).
    adaptive: ASAM's scaled ball.
    eta: ASAM's offset.

  Returns:
    label -> split -> `sharpness.m_sharpness` result.
  """
  results = {}
  for run in runs:
    size = batch_size or run.config.batch_size
    results[run.label] = {
        split: sharpness.m_sharpness(
            run.model,
            runs_lib.dataset(run, strategy, split, size, num_batches),
            strategy, rho=rho, num_steps=num_steps, adaptive=adaptive,
            eta=eta)
        for split in splits}
  return results


def measure_hessian(runs: Sequence[runs_lib.Run],
                    strategy: tf.distribute.Strategy,
                    splits: Sequence[str] = ('train',), batch_size: int = 0,
                    num_batches: int = 8, num_iterations: int = 20,
                    tolerance: float = 1e-3,
                    method: str = 'double_backward', seed: int = 0
                    ) -> dict[str, dict[str, Any]]:
  """Top Hessian eigenvalue of each run on each split.

  Args:
    runs: the runs.
    strategy: the strategy their models were built under.
    splits: of 'train', 'validation', 'test'.
    batch_size: 0 takes each run's config.eval_batch_size.
    num_batches: how many batches (-1: the whole split).
    num_iterations: the most power iterations.
    tolerance: relative change that ends the power iteration.
    method: see `hessian.hessian_vector_product`.
    seed: of the start vector.

  Returns:
    label -> split -> `hessian.top_hessian_eigenvalue` result.
  """
  results = {}
  for run in runs:
    size = batch_size or run.config.eval_batch_size
    results[run.label] = {
        split: hessian.top_hessian_eigenvalue(
            run.model,
            runs_lib.dataset(run, strategy, split, size, num_batches),
            strategy, num_iterations=num_iterations, tolerance=tolerance,
            method=method, seed=seed)
        for split in splits}
  return results


def _coordinates(grid_points: int, span: float) -> np.ndarray:
  # An odd count puts the checkpoint itself on the grid.
  return np.linspace(-span, span, grid_points | 1)


def landscapes(runs: Sequence[runs_lib.Run], strategy: tf.distribute.Strategy,
               out: str, splits: Sequence[str] = ('train',),
               batch_size: int = 0, num_batches: int = 4, dims: int = 2,
               grid_points: int = 21, span: float = 1.0,
               seed: int = 0) -> dict[str, Any]:
  """Filter-normalized 1-D or 2-D slices around each run, side by side.

  Every run gets the same Gaussian draw (`seed`), normalized to its own
  filters. A 2-D surface also yields the 1-D slice along its first
  direction (its middle column), for free.

  Args:
    runs: the runs.
    strategy: the strategy their models were built under.
    out: the output directory.
    splits: of 'train', 'validation', 'test'.
    batch_size: 0 takes each run's config.eval_batch_size.
    num_batches: batches per point (-1: the whole split).
    dims: 1 or 2.
    grid_points: points per direction (made odd).
    span: coordinates run over [-span, span].
    seed: of the directions.

  Returns:
    The paths written, by kind, and `loss_rise`: split -> label -> the
    mean loss increase at distances span/4, span/2 and span from the
    checkpoint (`landscape.loss_rise`), to compare basins by.
  """
  if dims not in (1, 2):
    raise ValueError(f'dims={dims} must be 1 or 2.')
  coordinates = _coordinates(grid_points, span)
  one_d, two_d, rise = {}, {}, {}
  for run in runs:
    size = batch_size or run.config.eval_batch_size
    params = run.params
    directions = [landscape.random_direction(params, seed + k)
                  for k in range(dims)]
    for split in splits:
      evaluate = sharpness.evaluate_params(
          run.model, runs_lib.dataset(run, strategy, split, size, num_batches),
          strategy)
      result = landscape.surface(evaluate, params, directions,
                                 [coordinates] * dims)
      middle = len(coordinates) // 2
      logging.info('%s %s: loss %.4f at the centre.', run.label, split,
                   result['loss'][(middle,) * dims])
      rise.setdefault(split, {})[run.label] = {
          f'{r:g}': v for r, v in landscape.loss_rise(
              result, (span / 4, span / 2, span)).items()}
      if dims == 2:
        two_d.setdefault(split, {})[run.label] = result
        result = {'coordinates': [coordinates],
                  'loss': result['loss'][:, middle],
                  'accuracy': result['accuracy'][:, middle]}
      one_d.setdefault(run.label, {})[split] = result
  tf.io.gfile.makedirs(out)
  metadata = _metadata(
      runs, splits=list(splits), num_batches=num_batches, seed=seed,
      span=span, batch_size={r.label: batch_size or r.config.eval_batch_size
                             for r in runs})
  written = {'1d': _write_1d(one_d, os.path.join(out, 'landscape_1d'),
                             'direction 1 (filter-normalized)', metadata)}
  for split, results in two_d.items():
    prefix = os.path.join(out, f'landscape_2d_{split}')
    landscape.save_grid(results, prefix, **metadata)
    title = f'loss on {split} data'
    landscape.plot_contours(results, prefix + '_contour.png', title)
    landscape.plot_surfaces(results, prefix + '_surface.png', title)
    written[f'2d_{split}'] = [prefix + ext for ext in (
        '.npz', '.json', '_contour.png', '_surface.png')]
  return {'paths': written, 'loss_rise': rise}


def _write_1d(results, prefix, xlabel, metadata):
  landscape.save_grid(results, prefix, **metadata)
  landscape.plot_curves_1d(results, prefix + '.png', xlabel)
  return [prefix + ext for ext in ('.npz', '.json', '.png')]


def _metadata(runs: Sequence[runs_lib.Run], **settings: Any) -> dict[str, Any]:
  return {'runs': {r.label: {'workdir': r.workdir,
                             'checkpoint': r.checkpoint} for r in runs},
          **settings}


def interpolate(runs: Sequence[runs_lib.Run], strategy: tf.distribute.Strategy,
                out: str, splits: Sequence[str] = ('train', 'test'),
                batch_size: int = 0, num_batches: int = 4,
                grid_points: int = 21, span: float = 0.5
                ) -> dict[str, Any]:
  """Loss and accuracy on the line from the first run to the second.

  Both runs must have the same model; the data and its normalization are
  the first run's.

  Args:
    runs: two runs, A (t = 0) and B (t = 1).
    strategy: the strategy their models were built under.
    out: the output directory.
    splits: of 'train', 'validation', 'test'.
    batch_size: 0 takes A's config.eval_batch_size.
    num_batches: batches per point (-1: the whole split).
    grid_points: points on [-span, 1 + span].
    span: how far beyond the endpoints to go.

  Returns:
    The paths written and the losses at t = 0 and t = 1.

  Raises:
    ValueError: unless there are two runs of the same architecture.
  """
  if len(runs) != 2:
    raise ValueError('The line needs two runs: --workdir and '
                     '--other_workdir.')
  a, b = runs
  shapes = [[tuple(v.shape) for v in r.model.weights] for r in runs]
  if shapes[0] != shapes[1]:
    raise ValueError(f'{a.workdir} and {b.workdir} have different models '
                     f'({a.config.model.name}, {b.config.model.name}).')
  ts = np.linspace(-span, 1 + span, grid_points)
  ts = np.unique(np.concatenate([ts, [0.0, 1.0]]))  # Both ends exactly.
  size = batch_size or a.config.eval_batch_size
  results = {}
  for split in splits:
    evaluate = sharpness.evaluate_params(
        a.model, runs_lib.dataset(a, strategy, split, size, num_batches),
        strategy)
    results[split] = landscape.line(evaluate, a.params, b.params, ts,
                                    a.state, b.state)
  tf.io.gfile.makedirs(out)
  label = f'{a.label} to {b.label}'
  metadata = _metadata(runs, splits=list(splits), num_batches=num_batches,
                       batch_size=size)
  paths = _write_1d({label: results}, os.path.join(out, 'line'),
                    f't: (1 - t) {a.label} + t {b.label}', metadata)
  ends = {split: {a.label: float(r['loss'][np.argmin(np.abs(ts))]),
                  b.label: float(r['loss'][np.argmin(np.abs(ts - 1))]),
                  'max_between': float(np.max(
                      r['loss'][(ts >= 0) & (ts <= 1)]))}
          for split, r in results.items()}
  return {'paths': paths, 'loss': ends}


def curves(workdirs: Sequence[str], out: str,
           labels: Sequence[str] | None = None) -> str:
  """Draws the runs' train/test loss and accuracy; returns the PNG's path."""
  labels = labels or [runs_lib.default_label(w) for w in workdirs]
  runs = {label: curves_lib.read_scalars(w)
          for label, w in zip(labels, workdirs)}
  tf.io.gfile.makedirs(out)
  path = os.path.join(out, 'curves.png')
  curves_lib.plot_curves(runs, path)
  return path
