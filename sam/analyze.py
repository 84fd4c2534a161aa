r"""See the sharpness: measures, loss landscapes and curves of trained runs.

Each command rebuilds the model and the data from a workdir's config.json,
restores the model weights of its latest checkpoint, and writes its results
(JSON, .npz, PNG) to --out (default WORKDIR/analysis; may be gs://):

  python -m sam.analyze --what=sharpness --workdir=/tmp/sam/sam \
    --other_workdir=/tmp/sam/sgd        # m-sharpness, rho=0.05, both runs
  python -m sam.analyze --what=hessian --workdir=/tmp/sam/sam \
    --other_workdir=/tmp/sam/sgd        # top Hessian eigenvalue
  python -m sam.analyze --what=landscape --workdir=/tmp/sam/sam \
    --other_workdir=/tmp/sam/sgd        # 2-D and 1-D slices, side by side
  python -m sam.analyze --what=line --workdir=/tmp/sam/sgd \
    --other_workdir=/tmp/sam/sam        # the line from one to the other
  python -m sam.analyze --what=curves --workdir=/tmp/sam/sam \
    --other_workdir=/tmp/sam/sgd        # train/test loss and accuracy

Measures use the data loss (cross-entropy, no weight decay) in inference
mode, on --num_batches batches of --batch_size examples of each of --splits
('train' in the run's epoch-0 order without augmentation, 'validation' or
'test'), under the run's strategy (config.strategy, or --strategy).
"""

from collections.abc import Sequence
import dataclasses
import json
import os
from typing import Any

from absl import app
from absl import flags
from absl import logging
import keras
import ml_collections
import numpy as np
import tensorflow as tf

from configs import default
from sam import curves as curves_lib
from sam import distribute
from sam import input_pipeline
from sam import landscape
from sam import models
from sam import sharpness

WHATS = ('sharpness', 'hessian', 'landscape', 'line', 'curves')


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The run's config: configs/default.py updated with its config.json.

  Starting from the defaults keeps the field types (tuples stay tuples) and
  fills fields that a run older than the current code did not save.

  Args:
    workdir: the run's workdir, local or gs://.

  Returns:
    The config.

  Raises:
    FileNotFoundError: if the workdir has no config.json.
  """
  path = os.path.join(workdir, 'config.json')
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(f'{path} not found: is {workdir} the workdir of '
                            'a training run?')
  with tf.io.gfile.GFile(path) as f:
    saved = json.load(f)
  config = default.get_config()
  config.update(saved)
  return config


@dataclasses.dataclass
class Run:
  """A trained run: its config, data and restored model."""
  label: str
  workdir: str
  config: ml_collections.ConfigDict
  data: input_pipeline.Data
  model: keras.Model
  checkpoint: str

  @property
  def params(self) -> list[np.ndarray]:
    return [v.numpy() for v in self.model.trainable_variables]

  @property
  def state(self) -> list[np.ndarray]:
    return [v.numpy() for v in self.model.non_trainable_variables]


def default_label(workdir: str) -> str:
  return os.path.basename(os.path.normpath(workdir)) or workdir


def restore_run(workdir: str, strategy: tf.distribute.Strategy,
                label: str | None = None,
                checkpoint: str | None = None) -> Run:
  """Rebuilds a run's model and data and restores its model weights.

  Args:
    workdir: the run's workdir.
    strategy: the model's variables are created in its scope.
    label: a name for plots; the workdir's basename if None.
    checkpoint: a checkpoint path; the latest in workdir/checkpoints if None.

  Returns:
    The run.

  Raises:
    FileNotFoundError: if there is no config.json or no checkpoint.
  """
  config = load_config(workdir)
  checkpoint = checkpoint or tf.train.latest_checkpoint(
      os.path.join(workdir, 'checkpoints'))
  if not checkpoint:
    raise FileNotFoundError(f'No checkpoint in {workdir}/checkpoints.')
  data = input_pipeline.load(config)
  with strategy.scope():
    model = models.get_model(config.model.name, data.num_classes,
                             data.image_shape)
  status = tf.train.Checkpoint(model=model).restore(checkpoint)
  # The optimizer and metric state are not needed, but every model weight is.
  status.expect_partial()
  status.assert_existing_objects_matched()
  logging.info('Restored %s from %s.', config.model.name, checkpoint)
  return Run(label or default_label(workdir), workdir, config, data, model,
             checkpoint)


def _dataset(run: Run, strategy: tf.distribute.Strategy, split: str,
             batch_size: int, num_batches: int
             ) -> tf.distribute.DistributedDataset:
  if batch_size % strategy.num_replicas_in_sync:
    raise ValueError(f'batch_size={batch_size} is not a multiple of the '
                     f'{strategy.num_replicas_in_sync} replicas.')
  return strategy.distribute_datasets_from_function(
      lambda ctx: sharpness.analysis_dataset(
          run.data, run.config, split, batch_size, num_batches, ctx))


def measure_sharpness(runs: Sequence[Run], strategy: tf.distribute.Strategy,
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
            run.model, _dataset(run, strategy, split, size, num_batches),
            strategy, rho=rho, num_steps=num_steps, adaptive=adaptive,
            eta=eta)
        for split in splits}
  return results


def measure_hessian(runs: Sequence[Run], strategy: tf.distribute.Strategy,
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
    method: see `sharpness.hessian_vector_product`.
    seed: of the start vector.

  Returns:
    label -> split -> `sharpness.top_hessian_eigenvalue` result.
  """
  results = {}
  for run in runs:
    size = batch_size or run.config.eval_batch_size
    results[run.label] = {
        split: sharpness.top_hessian_eigenvalue(
            run.model, _dataset(run, strategy, split, size, num_batches),
            strategy, num_iterations=num_iterations, tolerance=tolerance,
            method=method, seed=seed)
        for split in splits}
  return results


def _coordinates(grid_points: int, span: float) -> np.ndarray:
  # An odd count puts the checkpoint itself on the grid.
  return np.linspace(-span, span, grid_points | 1)


def landscapes(runs: Sequence[Run], strategy: tf.distribute.Strategy,
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
          run.model, _dataset(run, strategy, split, size, num_batches),
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


def _metadata(runs: Sequence[Run], **settings: Any) -> dict[str, Any]:
  return {'runs': {r.label: {'workdir': r.workdir,
                             'checkpoint': r.checkpoint} for r in runs},
          **settings}


def interpolate(runs: Sequence[Run], strategy: tf.distribute.Strategy,
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
        a.model, _dataset(a, strategy, split, size, num_batches), strategy)
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
  labels = labels or [default_label(w) for w in workdirs]
  runs = {label: curves_lib.read_scalars(w)
          for label, w in zip(labels, workdirs)}
  tf.io.gfile.makedirs(out)
  path = os.path.join(out, 'curves.png')
  curves_lib.plot_curves(runs, path)
  return path


_WORKDIR = flags.DEFINE_string('workdir', None, 'The run to analyze.')
_OTHER = flags.DEFINE_multi_string(
    'other_workdir', [], 'Further runs (repeat the flag): compared side by '
    'side; for --what=line, the end of the line.')
_WHAT = flags.DEFINE_enum('what', None, WHATS, 'What to compute.')
_OUT = flags.DEFINE_string('out', None,
                           'Output directory; default WORKDIR/analysis.')
_LABELS = flags.DEFINE_list('labels', None, 'Names of the runs in plots, '
                            'in order; default the workdirs\' basenames.')
_CHECKPOINT = flags.DEFINE_string(
    'checkpoint', None, 'A checkpoint of --workdir to use instead of the '
    'latest.')
_STRATEGY = flags.DEFINE_enum(
    'strategy', None, distribute.STRATEGIES,
    'Distribution strategy; default the run\'s config.strategy.')
_SPLITS = flags.DEFINE_list('splits', None, 'Data splits (train, '
                            'validation, test); '
                            'default train, and train,test for line.')
_BATCH_SIZE = flags.DEFINE_integer(
    'batch_size', 0, 'Global batch size (m of m-sharpness); 0: the run\'s '
    'batch_size for sharpness, eval_batch_size otherwise.')
_NUM_BATCHES = flags.DEFINE_integer(
    'num_batches', 8, 'Batches per measure or landscape point (-1: all).')
_RHO = flags.DEFINE_float('rho', 0.05, 'Radius of m-sharpness.')
_ASCENT_STEPS = flags.DEFINE_integer(
    'ascent_steps', 1, 'Ascent steps of m-sharpness (1: SAM\'s estimate).')
_ADAPTIVE = flags.DEFINE_bool('adaptive', False,
                              'm-sharpness in ASAM\'s scaled ball.')
_ITERATIONS = flags.DEFINE_integer('power_iterations', 20,
                                   'Most power iterations.')
_HVP = flags.DEFINE_enum('hvp', 'double_backward', sharpness.HVP_METHODS,
                         'How to take Hessian-vector products.')
_DIMS = flags.DEFINE_integer('dims', 2, 'Landscape dimensions: 1 or 2.')
_GRID = flags.DEFINE_integer('grid_points', 21, 'Points per direction.')
_SPAN = flags.DEFINE_float(
    'span', None, 'Landscape: coordinates in [-span, span] (default 1); '
    'line: t in [-span, 1 + span] (default 0.5).')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of directions and vectors.')
flags.mark_flags_as_required(['workdir', 'what'])


def _write_json(out: str, name: str, results: Any) -> str:
  tf.io.gfile.makedirs(out)
  path = os.path.join(out, name)
  with tf.io.gfile.GFile(path, 'w') as f:
    json.dump(results, f, indent=2)
  return path


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  workdirs = [_WORKDIR.value] + list(_OTHER.value)
  labels = _LABELS.value or [default_label(w) for w in workdirs]
  if len(labels) != len(workdirs) or len(set(labels)) != len(labels):
    raise app.UsageError(f'--labels={",".join(labels)}: give {len(workdirs)} '
                         'distinct names, one per run (workdirs with the '
                         'same basename need --labels).')
  out = _OUT.value or os.path.join(_WORKDIR.value, 'analysis')
  what = _WHAT.value
  if what == 'curves':
    print(curves(workdirs, out, labels))
    return
  if what == 'line' and len(workdirs) != 2:
    raise app.UsageError('--what=line needs one --other_workdir.')
  config = load_config(_WORKDIR.value)
  strategy = distribute.create_strategy(_STRATEGY.value or config.strategy,
                                        config.tpu)
  runs = [restore_run(w, strategy, label,
                      _CHECKPOINT.value if i == 0 else None)
          for i, (w, label) in enumerate(zip(workdirs, labels))]
  splits = _SPLITS.value or (['train', 'test'] if what == 'line'
                             else ['train'])
  common = dict(splits=splits, batch_size=_BATCH_SIZE.value,
                num_batches=_NUM_BATCHES.value)
  if what == 'sharpness':
    results = measure_sharpness(runs, strategy, rho=_RHO.value,
                                num_steps=_ASCENT_STEPS.value,
                                adaptive=_ADAPTIVE.value, **common)
    results['path'] = _write_json(out, 'sharpness.json', results)
  elif what == 'hessian':
    results = measure_hessian(runs, strategy,
                              num_iterations=_ITERATIONS.value,
                              method=_HVP.value, seed=_SEED.value, **common)
    results['path'] = _write_json(out, 'hessian.json', results)
  elif what == 'landscape':
    results = landscapes(runs, strategy, out, dims=_DIMS.value,
                         grid_points=_GRID.value,
                         span=1.0 if _SPAN.value is None else _SPAN.value,
                         seed=_SEED.value, **common)
  else:
    results = interpolate(runs, strategy, out, grid_points=_GRID.value,
                          span=0.5 if _SPAN.value is None else _SPAN.value,
                          **common)
  print(json.dumps(results, indent=2))


if __name__ == '__main__':
  app.run(main)
