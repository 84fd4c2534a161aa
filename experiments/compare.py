r"""A compute-matched comparison of SAM variants with their baselines.

  python -m experiments.compare --grid=configs/compare_fashion_mnist.py \
    --out_dir=/tmp/sam/compare

The grid file's `get_config()` names a run config (`base`) and the axes:
`variants` (names in sam.perturbations.REGISTRY) x `rho` x `label_noise` x
`seeds`. Every (label noise, seed) also gets two baselines with rho = 0:
`equal_epochs` (as many epochs as SAM) and `equal_compute` (as many
gradient evaluations as the SAM run: its epochs times the passes per SAM
step, `passes_per_step`, one baseline per distinct cost).

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
bootstrap 95% interval of its difference to each baseline (pairs by seed);
`out_dir/curves.png` plots the mean test accuracy over gradient evaluations.
"""

import json
import os
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


def cells(grid: ml_collections.ConfigDict) -> dict[str, dict]:
  """name -> {arm, seed, label_noise, overrides} of every run of the grid.

  A name is also the cell's directory in out_dir, e.g. sam_rho0.1_noise0.4_seed0
  or baseline_compute2x_noise0_seed1.
  """
  out = {}
  # Seeds outermost: a grid stopped half-way has every arm of its first seeds.
  for seed in grid.seeds:
    for noise in grid.label_noise:
      common = {'seed': seed, 'dataset.label_noise': noise}
      costs = set()
      for variant in grid.variants:
        for rho in grid.rho:
          overrides = {**common, 'sam.variant': variant, 'sam.rho': rho}
          costs.add(passes_per_step(_configured(grid.base, overrides).sam))
          out[f'{variant}_rho{rho:g}_noise{noise:g}_seed{seed}'] = dict(
              arm=f'{variant} rho={rho:g}', seed=seed, label_noise=noise,
              overrides=overrides)
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
    if tf.io.gfile.exists(path):
      with tf.io.gfile.GFile(path) as f:
        done[name] = json.load(f)
  return done


def report(grid: ml_collections.ConfigDict, out_dir: str) -> str:
  """Writes results.md (and curves.png) from the finished cells; returns it."""
  grid_cells = cells(grid)
  done = _finished(out_dir, grid_cells)
  lines = ['| label noise | arm | test accuracy % (mean ± std) | '
           'validation accuracy % | runs | training time per run (s) | '
           'difference to each baseline, paired bootstrap 95% interval |',
           '|---|---|---|---|---|---|---|']
  for noise in grid.label_noise:
    arms = {}
    for name, cell in grid_cells.items():
      if cell['label_noise'] == noise and name in done:
        arms.setdefault(cell['arm'], {})[cell['seed']] = done[name]
    for arm, runs in arms.items():
      lines.append(_row(noise, arm, runs, arms))
  text = '\n'.join(lines) + '\n'
  with tf.io.gfile.GFile(os.path.join(out_dir, 'results.md'), 'w') as f:
    f.write(text)
  _plot(grid, grid_cells, done, out_dir)
  return text


def _row(noise, arm, runs, arms):
  accuracy = 100 * np.array([r['eval/accuracy'] for r in runs.values()])
  val = [r['val/accuracy'] for r in runs.values() if 'val/accuracy' in r]
  val = (f'{100 * np.mean(val):.2f} ± {100 * np.std(val):.2f}' if val
         else '')
  seconds = np.mean([r['train_seconds'] for r in runs.values()])
  differences = []
  if not arm.startswith('baseline'):
    for baseline, base_runs in arms.items():
      seeds = sorted(set(runs) & set(base_runs))
      if baseline.startswith('baseline') and seeds:
        d = [100 * (runs[s]['eval/accuracy'] -
                    base_runs[s]['eval/accuracy']) for s in seeds]
        low, high = paired_bootstrap(d)
        differences.append(f'{baseline.removeprefix("baseline, ")}: '
                           f'{np.mean(d):+.2f} [{low:+.2f}, {high:+.2f}]')
  return (f'| {noise:g} | {arm} | {accuracy.mean():.2f} ± '
          f'{accuracy.std():.2f} | {val} | {len(runs)} | {seconds:.0f} | '
          f'{"; ".join(differences)} |')


def _plot(grid, grid_cells, done, out_dir):
  """Mean test accuracy over gradient evaluations (in epochs of one pass)."""
  from matplotlib import figure  # pylint: disable=g-import-not-at-top
  from matplotlib.backends import backend_agg  # pylint: disable=g-import-not-at-top
  fig = figure.Figure(figsize=(6 * len(grid.label_noise), 4.5))
  backend_agg.FigureCanvasAgg(fig)
  axes = fig.subplots(1, len(grid.label_noise), squeeze=False)[0]
  for ax, noise in zip(axes, grid.label_noise):
    arms = {}
    for name, cell in grid_cells.items():
      if cell['label_noise'] == noise and name in done:
        arms.setdefault(cell['arm'], []).append(name)
    for arm, names in arms.items():
      config = _configured(grid.base, grid_cells[names[0]]['overrides'])
      scalars = [curves.read_scalars(_workdir(out_dir, n))['eval/accuracy']
                 for n in names]
      length = min(len(s[0]) for s in scalars)
      steps = np.array(scalars[0][0][:length])
      # x: gradient evaluations, in epochs of one pass per step.
      epoch_steps = done[names[0]]['step'] / config.num_epochs
      x = steps * passes_per_step(config.sam) / epoch_steps
      ax.plot(x, 100 * np.mean([s[1][:length] for s in scalars], axis=0),
              marker='o', label=f'{arm} ({len(names)} runs)')
    ax.set_title(f'label noise {noise:g}')
    ax.set_xlabel('gradient evaluations (epochs of one pass)')
    ax.set_ylabel('test accuracy (%)')
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


def main(argv):
  del argv
  grid, out_dir = _GRID.value, _OUT_DIR.value
  grid_cells = cells(grid)
  if _IN_PROCESS.value:
    cell = grid_cells[_IN_PROCESS.value]
    train.train_and_evaluate(_configured(grid.base, cell['overrides']),
                             _workdir(out_dir, _IN_PROCESS.value))
    return
  if _LIST.value:
    print('\n'.join(grid_cells))
    return
  _check(grid, grid_cells)
  tf.io.gfile.makedirs(out_dir)
  unknown = set(_CELLS.value or []) - set(grid_cells)
  if unknown:
    sys.exit(f'Error: --cells names no cell of the grid: {sorted(unknown)} '
             '(--list prints them).')
  if not _REPORT_ONLY.value:
    for name in _CELLS.value or grid_cells:
      if name in _finished(out_dir, {name: None}):
        continue
      start = time.time()
      # One process per cell, as it would run on a machine of its own.
      command = [
          sys.executable, '-m', 'experiments.compare',
          f'--grid={config_flags.get_config_filename(flags.FLAGS["grid"])}',
          *_grid_overrides(), f'--out_dir={out_dir}', f'--in_process={name}']
      stopped, returncode = _run_cell(command)
      if stopped:
        sys.exit(f'Stopped in cell {name!r}; run the same command to resume '
                 'the grid.')
      if returncode:
        sys.exit(f'Error: cell {name!r} failed (exit {returncode}, its '
                 'output above); run the same command to resume the grid.')
      logging.info('%s: %.0f s.', name, time.time() - start)
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
