"""experiments/compare.py: the grid, the bootstrap, and a grid that resumes."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest

from experiments import compare
from tests.conftest import ROOT
from tests.conftest import tiny_config

GRID = '''
import ml_collections
from tests.conftest import tiny_config


def get_config():
  grid = ml_collections.ConfigDict()
  grid.base = tiny_config(**{'num_train_steps': -1, 'num_epochs': 1.0,
                             'steps_per_loop': 4, 'eval_every_steps': 2})
  grid.variants = ('sam',)
  grid.rho = (0.1,)
  grid.label_noise = (0.4,)
  grid.seeds = (0,)
  grid.baselines = ('equal_epochs', 'equal_compute')
  return grid
'''


def test_paired_bootstrap_of_known_cases():
  assert compare.paired_bootstrap([1.0, 1.0, 1.0]) == (1.0, 1.0)
  # Two pairs: the resampled mean is 0, 1 or 2 with chances 1/4, 1/2, 1/4.
  assert compare.paired_bootstrap([0.0, 2.0]) == (0.0, 2.0)
  low, high = compare.paired_bootstrap(np.arange(20.0))
  # The mean's standard error is 5.77 / sqrt(20) = 1.29: about +- 2.5.
  assert 9.5 - 3.2 < low < 9.5 - 1.9 and 9.5 + 1.9 < high < 9.5 + 3.2


def _grid(**axes):
  grid = ml_collections.ConfigDict()
  grid.base = tiny_config(**{'num_train_steps': -1, 'num_epochs': 10.0})
  grid.variants, grid.rho, grid.label_noise, grid.seeds = (
      ('sam', 'msam'), (0.1,), (0.0, 0.4), (0, 1))
  grid.baselines = ('equal_epochs', 'equal_compute')
  grid.update(axes)
  return grid


def test_grid_has_equal_epoch_and_equal_compute_baselines():
  cells = compare.cells(_grid())
  # Per (noise, seed): 2 SAM arms, equal epochs, and equal compute for
  # SAM's 2 passes (MSAM's 1 pass is the equal-epochs baseline's).
  assert len(cells) == 2 * 2 * 4
  cell = cells['baseline_compute2x_noise0.4_seed1']
  assert cell['overrides'] == {'seed': 1, 'dataset.label_noise': 0.4,
                               'sam.rho': 0.0, 'num_epochs': 20.0}
  assert cells['msam_rho0.1_noise0_seed0']['overrides'][
      'sam.variant'] == 'msam'
  three = compare.cells(_grid(variants=('sam',), baselines=('equal_compute',)))
  assert sorted({c['arm'] for c in three.values()}) == [
      'baseline, equal compute (2x epochs)', 'sam rho=0.1']


def _finish(out_dir, name, val):
  (out_dir / name).mkdir(parents=True)
  # The test accuracy disagrees with the validation accuracy: never used.
  (out_dir / name / 'results.json').write_text(json.dumps(
      {'step': 400, 'val/accuracy': val, 'eval/accuracy': 1 - val}))


def test_sweep_seeds_choose_rho_on_validation_for_the_other_seeds(tmp_path):
  grid = _grid(variants=('sam',), rho=(0.05, 0.1, 0.2), seeds=(0, 1, 2))
  assert compare.choose_rho(grid, str(tmp_path)) == {}
  assert compare.cells(grid, {}) == compare.cells(grid)
  grid.sweep_seeds = (0,)
  assert len(compare.cells(grid)) == 3 * 2 * (3 + 2)  # Any choice's cells.

  def sam_cells(chosen):
    return sorted(n for n in compare.cells(grid, chosen) if n.startswith('sam'))

  assert sam_cells({}) == sorted(
      f'sam_rho{r}_noise{n}_seed0' for r in ('0.05', '0.1', '0.2')
      for n in ('0', '0.4'))
  for rho, val in zip(grid.rho, (0.9, 0.8, 0.7)):
    _finish(tmp_path, f'sam_rho{rho:g}_noise0_seed0', val)
  for rho, val in zip(grid.rho[:2], (0.5, 0.6)):
    _finish(tmp_path, f'sam_rho{rho:g}_noise0.4_seed0', val)
  # Noise 0.4's sweep has not finished: no choice there yet.
  assert compare.choose_rho(grid, str(tmp_path)) == {('sam', 0.0): 0.05}
  _finish(tmp_path, 'sam_rho0.2_noise0.4_seed0', 0.7)
  chosen = compare.choose_rho(grid, str(tmp_path))
  assert chosen == {('sam', 0.0): 0.05, ('sam', 0.4): 0.2}
  assert sam_cells(chosen) == sorted(
      [f'sam_rho{r}_noise{n}_seed0' for r in ('0.05', '0.1', '0.2')
       for n in ('0', '0.4')] +
      [f'sam_rho{r}_seed{s}' for r in ('0.05_noise0', '0.2_noise0.4')
       for s in (1, 2)])
  # Every seed keeps both baselines.
  assert sum(n.startswith('baseline') for n in compare.cells(grid, chosen)) == (
      3 * 2 * 2)


@pytest.mark.parametrize('fields,error', [
    ({'sweep_seeds': (3,)}, 'grid.sweep_seeds [3] must be among grid.seeds'),
    ({'sweep_seeds': (0,), 'base.dataset.validation_size': 0},
     'grid.sweep_seeds chooses rho on a validation split: set '
     'grid.base.dataset.validation_size')])
def test_bad_sweep_seeds_are_refused_in_one_line(fields, error):
  grid = _grid()
  grid.base.dataset.validation_size = 100
  grid.update_from_flattened_dict(fields)
  with pytest.raises(SystemExit, match=re.escape(error)):
    compare._check(grid, compare.cells(grid))


def test_a_difference_of_one_seed_has_no_interval():
  runs = {0: {'eval/accuracy': 0.8, 'train_seconds': 1.0}}
  base = {0: {'eval/accuracy': 0.7, 'train_seconds': 1.0}}
  references = compare._references(
      _grid(), 'sam rho=0.1',
      {'sam rho=0.1': runs, 'baseline, equal epochs': base})
  row = compare._row(0.4, 'sam rho=0.1', runs, references)
  assert row.endswith('| equal epochs: +10.00 (1 seed) |')


def test_micro_batch_sizes_are_an_axis_compared_with_the_largest_m():
  grid = _grid(variants=('sam',), label_noise=(0.4,), seeds=(0, 1),
               baselines=('equal_epochs',))
  grid.micro_batch_size = (4, 8)
  cells = compare.cells(grid)
  assert sorted(cells) == sorted(
      [f'sam_rho0.1_m{m}_noise0.4_seed{s}' for m in (4, 8) for s in (0, 1)] +
      [f'baseline_epochs_noise0.4_seed{s}' for s in (0, 1)])
  cell = cells['sam_rho0.1_m4_noise0.4_seed1']
  assert cell['arm'] == 'sam rho=0.1 m=4'
  assert cell['overrides'] == {'seed': 1, 'dataset.label_noise': 0.4,
                               'sam.variant': 'sam', 'sam.rho': 0.1,
                               'sam.micro_batch_size': 4}

  def runs(*accuracies):
    return {s: {'eval/accuracy': a, 'train_seconds': 1.0}
            for s, a in enumerate(accuracies)}

  arms = {'sam rho=0.1 m=4': runs(0.8, 0.9), 'sam rho=0.1 m=8': runs(
      0.7, 0.7), 'baseline, equal epochs': runs(0.6, 0.6)}
  row = compare._row(0.4, 'sam rho=0.1 m=4', arms['sam rho=0.1 m=4'],
                     compare._references(grid, 'sam rho=0.1 m=4', arms))
  assert row.endswith('| equal epochs: +25.00 [+20.00, +30.00]; '
                      'sam rho=0.1 m=8: +15.00 [+10.00, +20.00] |')
  assert list(compare._references(grid, 'sam rho=0.1 m=8', arms)) == [
      'equal epochs']
  grid.sweep_seeds = (0,)
  grid.base.dataset.validation_size = 100
  with pytest.raises(SystemExit, match='not per grid.micro_batch_size'):
    compare._check(grid, compare.cells(grid))


@pytest.mark.parametrize('sam_fields,passes', [
    ({'rho': 0.0}, 1), ({}, 2), ({'variant': 'msam'}, 1),
    ({'ascent_steps': 2}, 3), ({'every_k_steps': 4}, 1.25)])
def test_passes_per_step(sam_fields, passes):
  config = tiny_config(**{'sam.rho': 0.1, **{f'sam.{k}': v
                                             for k, v in sam_fields.items()}})
  assert compare.passes_per_step(config.sam) == passes


def _run(tmp_path, *args):
  return subprocess.run(
      [sys.executable, '-m', 'experiments.compare',
       f'--grid={tmp_path / "grid.py"}', f'--out_dir={tmp_path / "out"}',
       *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
      env={**os.environ, 'PYTHONPATH': str(ROOT)})


@pytest.mark.slow
def test_an_interrupted_grid_resumes_and_reports(tmp_path):
  (tmp_path / 'grid.py').write_text(GRID)
  first = 'sam_rho0.1_noise0.4_seed0'
  done = _run(tmp_path, f'--cells={first}')
  assert done.returncode == 0, done.stderr[-3000:]
  results = tmp_path / 'out' / first / 'results.json'
  written = results.stat().st_mtime_ns
  done = _run(tmp_path)  # The whole grid: the finished cell is kept.
  assert done.returncode == 0, done.stderr[-3000:]
  assert results.stat().st_mtime_ns == written
  report = (tmp_path / 'out' / 'results.md').read_text()
  rows = [line for line in report.splitlines() if line.startswith('| 0.4 |')]
  assert [row.split(' | ')[1] for row in rows] == [
      'sam rho=0.1', 'baseline, equal epochs',
      'baseline, equal compute (2x epochs)']
  assert 'equal epochs: ' in rows[0] and 'equal compute (2x epochs): ' in (
      rows[0])
  assert (tmp_path / 'out' / 'curves.png').stat().st_size > 0
  bad = _run(tmp_path, '--cells=sam_rho9_noise0.4_seed0')
  assert bad.returncode == 1
  assert ("--cells names no cell of the grid: ['sam_rho9_noise0.4_seed0']"
          in bad.stderr)


@pytest.mark.slow
def test_sigterm_stops_the_grid_in_one_line_and_it_resumes(tmp_path):
  """SIGTERM to the runner reaches the cell, which saves and stops."""
  # Long enough that the signal lands mid-cell; one evaluation at the end.
  (tmp_path / 'grid.py').write_text(GRID.replace(
      "'num_epochs': 1.0", "'num_epochs': 100.0").replace(
          "'eval_every_steps': 2", "'eval_every_steps': 400"))
  runner = subprocess.Popen(
      [sys.executable, '-m', 'experiments.compare',
       f'--grid={tmp_path / "grid.py"}', f'--out_dir={tmp_path / "out"}'],
      cwd=ROOT, stderr=subprocess.PIPE, text=True,
      env={**os.environ, 'PYTHONPATH': str(ROOT)})
  cell = tmp_path / 'out' / 'sam_rho0.1_noise0.4_seed0'
  deadline = time.time() + 300
  # Training is under way once the first checkpoint is written.
  while not list((cell / 'checkpoints').glob('ckpt-*.index')):
    assert time.time() < deadline and runner.poll() is None
    time.sleep(0.2)
  runner.send_signal(signal.SIGTERM)
  _, stderr = runner.communicate(timeout=300)
  assert runner.returncode == 1
  assert stderr.strip().splitlines()[-1] == (
      "Stopped in cell 'sam_rho0.1_noise0.4_seed0'; run the same command to "
      'resume the grid.')
  assert not (cell / 'results.json').exists()
  done = _run(tmp_path, f'--cells={cell.name}')
  assert done.returncode == 0, done.stderr[-3000:]
  assert json.loads((cell / 'results.json').read_text())['step'] == 400


@pytest.mark.slow
def test_cells_that_wait_for_the_sweep_are_one_line(tmp_path):
  (tmp_path / 'grid.py').write_text(GRID.replace(
      "grid.seeds = (0,)", "grid.seeds = (0, 1)\n  grid.sweep_seeds = (0,)"
  ).replace("'eval_every_steps': 2}", "'eval_every_steps': 2,\n"
            "                             'dataset.validation_size': 16}"))
  done = _run(tmp_path, '--cells=sam_rho0.1_noise0.4_seed1')
  assert done.returncode == 1
  assert done.stderr.strip().splitlines()[-1] == (
      "Error: --cells ['sam_rho0.1_noise0.4_seed1'] wait for the rho sweep on "
      'seeds [0], which chooses their rho (or names another rho): run the '
      'sweep cells first.')
