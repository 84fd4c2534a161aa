r"""A compute-matched comparison of SAM variants with their baselines.

  python -m experiments.compare --grid=configs/compare_fashion_mnist.py \
    --out_dir=/tmp/sam/compare

The grid file's `get_config()` names a run config (`base`) and the axes:
`variants` (names in sam.perturbations.REGISTRY) x `rho` x `label_noise` x
`seeds`, and optionally `micro_batch_size` (m-sharpness: each SAM arm once per
m, its eps from m examples; with several, each arm's difference to the arm of
the largest m is reported too). With `sweep_seeds` (a subset of the seeds),
rho is swept on those seeds only: the other seeds run, per (variant, label
noise), the rho with the best mean validation accuracy there (`choose_rho`;
the base config must hold a validation split out), so the test set never
picks it. Every (label noise, seed) also gets two baselines with rho = 0:
`equal_epochs` (as many epochs as SAM) and `equal_compute` (as many gradient
evaluations as the SAM run: its epochs times the passes per SAM step,
`passes_per_step`, one baseline per distinct cost).

Each cell is one run of `sam.train` in a process of its own, in
`out_dir/CELL`; a cell whose results.json exists is done and never rerun,
and one that was cut short resumes from its checkpoint, so an interrupted
grid resumes by running the same command. To spread a grid over machines,
give each a share of the cells (`--cells=NAME,NAME`, `--list` prints them)
on a shared out_dir (gs:// works), then run `--report_only` anywhere.

After every cell, `out_dir/results.md` is rewritten from all finished cells:
per arm, the mean +- std over seeds of the final test accuracy (and of the
validation accuracy, if the base config holds a split out), the runs, the
training time per run (of its last start), and per SAM arm the paired
bootstrap 95% interval of its difference to each baseline and to the
largest m (pairs by seed);
`out_dir/curves.png` plots the mean test accuracy over gradient evaluations.
"""

import os
import re
import signal
import subprocess
import sys
import time

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags
import numpy as np
import tensorflow as tf

from sam import config_checks
from sam import curves
from sam import train
from sam import workdir as workdir_lib

_GRID = config_flags.DEFINE_config_file('grid', None, 'The grid file.')
_OUT_DIR = flags.DEFINE_string('out_dir', None, 'Where cells and reports go.')
_CELLS = flags.DEFINE_list('cells', None,
                           'Run only these cells (default: all, in order).')
_LIST = flags.DEFINE_bool('list', False, 'Print the cell names and exit.')
_REPORT_ONLY = flags.DEFINE_bool('report_only', False,
                                 'Write the report of the finished cells.')
_IN_PROCESS = flags.DEFINE_string(
    'in_process', None, 'Internal: train this one cell in this process.')

BOOTSTRAP_SAMPLES = 10_000


def passes_per_step(sam_config: ml_collections.ConfigDict) -> float:
  """Forward-backward passes per step, averaged over the steps."""
  if not sam_config.rho:
    return 1.0
  passes = 1 if sam_config.variant == 'msam' else 1 + sam_config.ascent_steps
  k = sam_config.every_k_steps
  return (passes + k - 1) / k


def cells(grid: ml_collections.ConfigDict,
          chosen: dict | None = None) -> dict[str, dict]:
  """name -> {arm, seed, label_noise, overrides} of every run of the grid.

  A name is also the cell's directory in out_dir, e.g. sam_rho0.1_noise0.4_seed0
  or baseline_compute2x_noise0_seed1. With grid.sweep_seeds, the seeds outside
  it run the rho in `chosen[(variant, label noise)]` (see choose_rho), none
  while that is not chosen yet; chosen=None lists every rho there (the cells
  any choice could make).
  """
  out = {}
  # Seeds outermost: a grid stopped half-way has every arm of its first seeds.
  for seed in grid.seeds:
    for noise in grid.label_noise:
      common = {'seed': seed, 'dataset.label_noise': noise}
      costs = set()
      for variant in grid.variants:
        rhos = grid.rho
        if (chosen is not None and grid.get('sweep_seeds') and
            seed not in grid.sweep_seeds):
          rhos = [chosen[variant, noise]] if (variant, noise) in chosen else []
        for rho in rhos:
          for m in _micro_batch_sizes(grid):
            overrides = {**common, 'sam.variant': variant, 'sam.rho': rho}
            if m:
              overrides['sam.micro_batch_size'] = m
            costs.add(passes_per_step(_configured(grid.base, overrides).sam))
            out[f'{_arm_name(variant, rho, m, "_")}_noise{noise:g}_seed{seed}'
                ] = dict(arm=_arm_name(variant, rho, m, ' '), seed=seed,
                         label_noise=noise, overrides=overrides)
      baselines = []
      if 'equal_epochs' in grid.baselines:
        baselines.append(('epochs', 'baseline, equal epochs', 1.0))
      if 'equal_compute' in grid.baselines:
        baselines += [(f'compute{c:g}x',
                       f'baseline, equal compute ({c:g}x epochs)', c)
                      for c in sorted(costs) if c != 1.0]
      for name, arm, factor in baselines:
        overrides = {**common, 'sam.rho': 0.0,
                     'num_epochs': grid.base.num_epochs * factor}
        out[f'baseline_{name}_noise{noise:g}_seed{seed}'] = dict(
            arm=arm, seed=seed, label_noise=noise, overrides=overrides)
  return out


def _micro_batch_sizes(grid: ml_collections.ConfigDict) -> tuple[int, ...]:
  return tuple(grid.get('micro_batch_size') or (0,))


def _arm_name(variant: str, rho: float, m: int, sep: str) -> str:
  eq = '=' if sep == ' ' else ''
  return f'{variant}{sep}rho{eq}{rho:g}' + (f'{sep}m{eq}{m}' if m else '')


def choose_rho(grid: ml_collections.ConfigDict, out_dir: str) -> dict:
  """(variant, label noise) -> the rho of the best mean val/accuracy on the
  sweep seeds, for those whose sweep cells have all finished; {} without
  grid.sweep_seeds (every seed runs every rho)."""
  if not grid.get('sweep_seeds'):
    return {}
  sweep = {name: cell for name, cell in cells(grid, {}).items()
           if cell['seed'] in grid.sweep_seeds}
  done = _finished(out_dir, sweep)
  chosen = {}
  for variant in grid.variants:
    for noise in grid.label_noise:
      scores = {}
      for name, cell in sweep.items():
        if (cell['label_noise'], cell['overrides'].get('sam.variant')) == (
            noise, variant):
          scores.setdefault(cell['overrides']['sam.rho'], []).append(
              done[name]['val/accuracy'] if name in done else None)
      if scores and None not in sum(scores.values(), []):
        chosen[variant, noise] = max(scores, key=lambda r: np.mean(scores[r]))
  return chosen


def _configured(base: ml_collections.ConfigDict,
                overrides: dict) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(base.to_dict())
  config.update_from_flattened_dict(overrides)
  return config


def _workdir(out_dir: str, name: str) -> str:
  return os.path.join(out_dir, name)


def paired_bootstrap(differences, samples: int = BOOTSTRAP_SAMPLES,
                     seed: int = 0) -> tuple[float, float]:
  """The 95% percentile interval of the mean of paired differences."""
  differences = np.asarray(differences, np.float64)
  rng = np.random.default_rng(seed)
  draws = rng.integers(0, len(differences), (samples, len(differences)))
  means = differences[draws].mean(axis=1)
  return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def _finished(out_dir: str, grid_cells: dict[str, dict]) -> dict[str, dict]:
  done = {}
  for name in grid_cells:
    path = os.path.join(_workdir(out_dir, name), 'results.json')
    results, problem = workdir_lib.read_object(path, ('step',))
    if problem:
      raise ValueError(f'{path} is {problem}, not a finished run\'s '
                       'results: delete it, and run the grid again to finish '
                       'that cell.')
    if results is not None:
      done[name] = results
  return done


def report(grid: ml_collections.ConfigDict, out_dir: str) -> str:
  """Writes results.md (and curves.png) from the finished cells; returns it."""
  chosen = choose_rho(grid, out_dir)
  grid_cells = cells(grid, chosen)
  done = _finished(out_dir, grid_cells)
  lines = ['| label noise | arm | test accuracy % (mean ± std) | '
           'validation accuracy % | runs | training time per run (s) | '
           'difference to each baseline (and to the largest m), paired '
           'bootstrap 95% interval |',
           '|---|---|---|---|---|---|---|']
  for noise in grid.label_noise:
    arms = {}
    for name, cell in grid_cells.items():
      if cell['label_noise'] == noise and name in done:
        arms.setdefault(cell['arm'], {})[cell['seed']] = done[name]
    picked = {f'{v} rho={r:g}' for (v, n), r in chosen.items() if n == noise}
    for arm, runs in arms.items():
      lines.append(_row(noise, arm + (' (chosen)' if arm in picked else ''),
                        runs, _references(grid, arm, arms)))
  seconds = sum(r['train_seconds'] for r in done.values())
  lines += ['', f'{len(done)} cells, {seconds / 60:.1f} min of training in '
            'all (each cell\'s last start).']
  if chosen:
    lines.append(f'rho chosen on val/accuracy of seeds '
                 f'{list(grid.sweep_seeds)}: ' + ', '.join(
                     f'{v} at label noise {n:g}: {r:g}'
                     for (v, n), r in chosen.items()) + '.')
  text = '\n'.join(lines) + '\n'
  with tf.io.gfile.GFile(os.path.join(out_dir, 'results.md'), 'w') as f:
    f.write(text)
  _plot(grid, grid_cells, done, out_dir)
  return text


def _references(grid: ml_collections.ConfigDict, arm: str,
                arms: dict[str, dict]) -> dict[str, dict]:
  """The arms a SAM arm is compared with: each baseline, and with several
  micro-batch sizes the same variant and rho at the largest m."""
  if arm.startswith('baseline'):
    return {}
  out = {name.removeprefix('baseline, '): runs
         for name, runs in arms.items() if name.startswith('baseline')}
  sizes = _micro_batch_sizes(grid)
  if len(sizes) > 1:
    largest = re.sub(r' m=\d+$', f' m={max(sizes)}', arm)
    if largest != arm and largest in arms:
      out[largest] = arms[largest]
  return out


def _row(noise, arm, runs, references):
  accuracy = 100 * np.array([r['eval/accuracy'] for r in runs.values()])
  val = [r['val/accuracy'] for r in runs.values() if 'val/accuracy' in r]
  val = (f'{100 * np.mean(val):.2f} ± {100 * np.std(val):.2f}' if val
         else '')
  seconds = np.mean([r['train_seconds'] for r in runs.values()])
  differences = []
  for reference, reference_runs in references.items():
    seeds = sorted(set(runs) & set(reference_runs))
    if seeds:
      d = [100 * (runs[s]['eval/accuracy'] -
                  reference_runs[s]['eval/accuracy']) for s in seeds]
      interval = ' (1 seed)'
      if len(d) > 1:
        low, high = paired_bootstrap(d)
        interval = f' [{low:+.2f}, {high:+.2f}]'
      differences.append(f'{reference}: {np.mean(d):+.2f}{interval}')
  return (f'| {noise:g} | {arm} | {accuracy.mean():.2f} ± '
          f'{accuracy.std():.2f} | {val} | {len(runs)} | {seconds:.0f} | '
          f'{"; ".join(differences)} |')


def _plot(grid, grid_cells, done, out_dir):
  """Mean curves over gradient evaluations (in epochs of one pass): test
  accuracy, and under label noise the memorization of the flipped examples."""
  from matplotlib import figure  # pylint: disable=g-import-not-at-top
  from matplotlib.backends import backend_agg  # pylint: disable=g-import-not-at-top
  panels = [(noise, 'eval/accuracy', 'test accuracy (%)')
            for noise in grid.label_noise]
  panels += [(noise, 'train/flipped_accuracy',
              'flipped training examples at their given label (%)')
             for noise in grid.label_noise if noise]
  fig = figure.Figure(figsize=(6 * len(panels), 4.5))
  backend_agg.FigureCanvasAgg(fig)
  axes = fig.subplots(1, len(panels), squeeze=False)[0]
  for ax, (noise, tag, label) in zip(axes, panels):
    arms = {}
    for name, cell in grid_cells.items():
      if cell['label_noise'] == noise and name in done:
        arms.setdefault(cell['arm'], []).append(name)
    for arm, names in arms.items():
      config = _configured(grid.base, grid_cells[names[0]]['overrides'])
      scalars = [curves.read_scalars(_workdir(out_dir, n))[tag] for n in names]
      length = min(len(s[0]) for s in scalars)
      steps = np.array(scalars[0][0][:length])
      # x: gradient evaluations, in epochs of one pass per step.
      epoch_steps = done[names[0]]['step'] / config.num_epochs
      x = steps * passes_per_step(config.sam) / epoch_steps
      ax.plot(x, 100 * np.mean([s[1][:length] for s in scalars], axis=0),
              marker='o', markersize=3, label=f'{arm} ({len(names)} runs)')
    ax.set_title(f'label noise {noise:g}')
    ax.set_xlabel('gradient evaluations (epochs of one pass)')
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize='small')
  fig.tight_layout()
  with tf.io.gfile.GFile(os.path.join(out_dir, 'curves.png'), 'wb') as f:
    fig.savefig(f, format='png', dpi=100)


def _check(grid: ml_collections.ConfigDict,
           grid_cells: dict[str, dict]) -> None:
  """Every cell's config, checked before any cell runs: one line if bad."""
  if grid.base.num_train_steps != -1:
    sys.exit('Error: grid.base.num_train_steps must be -1: the cells are '
             'set in epochs (base.num_epochs), which equal compute scales.')
  for name, cell in grid_cells.items():
    try:
      config_checks.validate_config(
          _configured(grid.base, cell['overrides']), 1)
    except ValueError as e:
      sys.exit(f'Error: cell {name!r}: {e}')
  sweep = set(grid.get('sweep_seeds') or ())
  if sweep and len(_micro_batch_sizes(grid)) > 1:
    sys.exit('Error: grid.sweep_seeds chooses one rho per variant and label '
             'noise, not per grid.micro_batch_size: set grid.rho to one '
             'value, or grid.sweep_seeds=() (every seed runs every rho).')
  if sweep - set(grid.seeds):
    sys.exit(f'Error: grid.sweep_seeds {sorted(sweep)} must be among '
             f'grid.seeds {list(grid.seeds)}.')
  if sweep and not grid.base.dataset.validation_size:
    sys.exit('Error: grid.sweep_seeds chooses rho on a validation split: set '
             'grid.base.dataset.validation_size (e.g. 5000).')


def main(argv):
  del argv
  grid, out_dir = _GRID.value, _OUT_DIR.value
  grid_cells = cells(grid)
  if _IN_PROCESS.value:
    cell = grid_cells[_IN_PROCESS.value]
    train.train_and_evaluate(_configured(grid.base, cell['overrides']),
                             _workdir(out_dir, _IN_PROCESS.value))
    return
  if _LIST.value:  # As far as the choices of rho are known.
    print('\n'.join(cells(grid, choose_rho(grid, out_dir))))
    return
  _check(grid, grid_cells)
  tf.io.gfile.makedirs(out_dir)
  unknown = set(_CELLS.value or []) - set(grid_cells)
  if unknown:
    sys.exit(f'Error: --cells names no cell of the grid: {sorted(unknown)} '
             '(--list prints them).')
  while not _REPORT_ONLY.value:
    # Again after every cell: a finished sweep adds the chosen rho's cells.
    known = cells(grid, choose_rho(grid, out_dir))
    todo = [name for name in known
            if name in (_CELLS.value or grid_cells) and
            name not in _finished(out_dir, {name: None})]
    waiting = set(_CELLS.value or []) - set(known)
    if not todo and waiting:
      sys.exit(f'Error: --cells {sorted(waiting)} wait for the rho sweep on '
               f'seeds {list(grid.sweep_seeds)}, which chooses their rho (or '
               'names another rho): run the sweep cells first.')
    if not todo:
      break
    start = time.time()
    # One process per cell, as it would run on a machine of its own.
    command = [
        sys.executable, '-m', 'experiments.compare',
        f'--grid={config_flags.get_config_filename(flags.FLAGS["grid"])}',
        *_grid_overrides(), f'--out_dir={out_dir}', f'--in_process={todo[0]}']
    stopped, returncode = _run_cell(command)
    if stopped:
      sys.exit(f'Stopped in cell {todo[0]!r}; run the same command to resume '
               'the grid.')
    if returncode:
      sys.exit(f'Error: cell {todo[0]!r} failed (exit {returncode}, its '
               'output above); run the same command to resume the grid.')
    logging.info('%s: %.0f s.', todo[0], time.time() - start)
    report(grid, out_dir)
  print(report(grid, out_dir))


def _run_cell(command: list[str]) -> tuple[bool, int]:
  """Runs a cell's process: whether SIGTERM or Ctrl-C stopped it, its status.

  SIGTERM is handed on to the cell, and Ctrl-C reaches it with this process,
  so that it stops at its next loop boundary with a checkpoint (as
  main.py's runs do).
  """
  stopped = []
  with subprocess.Popen(command) as cell:
    def forward(signum, frame):
      del frame
      stopped.append(signum)
      cell.send_signal(signum)
    previous = signal.signal(signal.SIGTERM, forward)
    try:
      cell.wait()
    except KeyboardInterrupt:
      stopped.append(signal.SIGINT)
      cell.wait()
    finally:
      signal.signal(signal.SIGTERM, previous)
  return bool(stopped), cell.returncode


def _grid_overrides() -> list[str]:
  """The --grid.* flags this process was given, for the cells' processes."""
  return [a for a in sys.argv[1:] if a.startswith('--grid.')]


if __name__ == '__main__':
  # Here, not at import: tests import this module beside other absl tools.
  flags.mark_flags_as_required(['grid', 'out_dir'])
  app.run(main)
