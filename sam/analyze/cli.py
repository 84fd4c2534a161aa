"""The flags and main of `python -m sam.analyze` (see the package docstring).

Importing this module defines the flags; importing `sam.analyze` does not.
"""

from collections.abc import Sequence
import json
import os
from typing import Any

from absl import app
from absl import flags
import tensorflow as tf

from sam import distribute
from sam import hessian
from sam import workdir as workdir_lib
from sam.analyze import measures
from sam.analyze import runs as runs_lib

WHATS = ('sharpness', 'hessian', 'landscape', 'line', 'curves')

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
_HVP = flags.DEFINE_enum('hvp', 'double_backward', hessian.HVP_METHODS,
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
  try:
    _analyze()
  except (FileNotFoundError, ValueError, workdir_lib.CheckpointError) as e:
    # Not a run's workdir, no checkpoint or summaries yet, a bad flag value:
    # the line says what to fix.
    raise SystemExit(f'Error: {e}') from None


def _analyze() -> None:
  workdirs = [_WORKDIR.value] + list(_OTHER.value)
  labels = _LABELS.value or [runs_lib.default_label(w) for w in workdirs]
  if len(labels) != len(workdirs) or len(set(labels)) != len(labels):
    raise app.UsageError(f'--labels={",".join(labels)}: give {len(workdirs)} '
                         'distinct names, one per run (workdirs with the '
                         'same basename need --labels).')
  out = _OUT.value or os.path.join(_WORKDIR.value, 'analysis')
  what = _WHAT.value
  if what == 'curves':
    print(measures.curves(workdirs, out, labels))
    return
  if what == 'line' and len(workdirs) != 2:
    raise app.UsageError('--what=line needs one --other_workdir.')
  config = runs_lib.load_config(_WORKDIR.value)
  strategy = distribute.create_strategy(_STRATEGY.value or config.strategy,
                                        config.tpu)
  runs = [runs_lib.restore_run(w, strategy, label,
                      _CHECKPOINT.value if i == 0 else None)
          for i, (w, label) in enumerate(zip(workdirs, labels))]
  splits = _SPLITS.value or (['train', 'test'] if what == 'line'
                             else ['train'])
  common = dict(splits=splits, batch_size=_BATCH_SIZE.value,
                num_batches=_NUM_BATCHES.value)
  if what == 'sharpness':
    results = measures.measure_sharpness(
        runs, strategy, rho=_RHO.value, num_steps=_ASCENT_STEPS.value,
        adaptive=_ADAPTIVE.value, **common)
    results['path'] = _write_json(out, 'sharpness.json', results)
  elif what == 'hessian':
    results = measures.measure_hessian(
        runs, strategy, num_iterations=_ITERATIONS.value, method=_HVP.value,
        seed=_SEED.value, **common)
    results['path'] = _write_json(out, 'hessian.json', results)
  elif what == 'landscape':
    results = measures.landscapes(
        runs, strategy, out, dims=_DIMS.value, grid_points=_GRID.value,
        span=1.0 if _SPAN.value is None else _SPAN.value, seed=_SEED.value,
        **common)
  else:
    results = measures.interpolate(
        runs, strategy, out, grid_points=_GRID.value,
        span=0.5 if _SPAN.value is None else _SPAN.value, **common)
  print(json.dumps(results, indent=2))
