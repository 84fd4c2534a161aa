"""Landscapes, curves and the `sam.analyze` CLI, on tiny synthetic runs."""

import json
import os

from absl import flags
from absl.testing import flagsaver
from clu import metric_writers
from matplotlib import image
import numpy as np
import pytest
import tensorflow as tf

from sam import analyze
from sam import curves
from sam import landscape
from sam import sharpness
from sam import train
from sam.analyze import cli
from tests.conftest import tiny_config


def _png_shape(path):
  return image.imread(path).shape


def test_random_direction_is_filter_normalized():
  rng = np.random.default_rng(0)
  params = [rng.standard_normal((3, 3, 2, 4)), rng.standard_normal(4),
            rng.standard_normal((5, 7)) * 3, rng.standard_normal(7)]
  direction = landscape.random_direction(params, seed=3)
  for p, d in zip(params, direction):
    assert d.shape == p.shape
    if p.ndim == 1:
      np.testing.assert_array_equal(d, 0)  # Biases, batch norm: no move.
    else:
      axes = tuple(range(p.ndim - 1))  # Filters are along the last axis.
      np.testing.assert_allclose(np.linalg.norm(d, axis=axes) if p.ndim == 2
                                 else np.sqrt((d**2).sum(axes)),
                                 np.sqrt((p**2).sum(axes)), rtol=1e-6)
  again = landscape.random_direction(params, seed=3)
  for d, e in zip(direction, again):
    np.testing.assert_array_equal(d, e)


def _quadratic_evaluate(params, state=None):
  del state
  return float(sum(np.sum(np.square(p)) for p in params)), 0.5


def test_surface_line_grids_and_plots(tmp_path):
  params = [np.array([1.0, 2.0], np.float32), np.array([[3.0]], np.float32)]
  d1 = [np.array([1.0, 0.0]), np.array([[0.0]])]
  d2 = [np.array([0.0, 0.0]), np.array([[1.0]])]
  coords = np.linspace(-1, 1, 5)
  grid = landscape.surface(_quadratic_evaluate, params, [d1, d2],
                           [coords, coords])
  expected = ((1 + coords[:, None])**2 + 4 + (3 + coords[None, :])**2)
  np.testing.assert_allclose(grid['loss'], expected, rtol=1e-6)
  one = landscape.surface(_quadratic_evaluate, params, [d1], [coords])
  np.testing.assert_allclose(one['loss'], expected[:, 2], rtol=1e-6)

  origin = [np.zeros(2, np.float32), np.zeros((1, 1), np.float32)]
  bowl = landscape.surface(_quadratic_evaluate, origin, [d1], [coords])
  assert landscape.loss_rise(bowl, [0.5, 1.0]) == {0.5: 0.25, 1.0: 1.0}
  fine = np.linspace(-1, 1, 41)
  bowl = landscape.surface(_quadratic_evaluate, origin, [d1, d2],
                           [fine, fine])
  rise = landscape.loss_rise(bowl, [0.5, 3.0])
  assert rise[0.5] == pytest.approx(0.25, abs=0.02)  # The ring's r^2.
  assert np.isnan(rise[3.0])  # Off the grid.

  other = [np.array([-1.0, 0.0], np.float32), np.array([[1.0]], np.float32)]
  ts = np.array([-0.5, 0.0, 0.5, 1.0])
  path = landscape.line(_quadratic_evaluate, params, other, ts)
  np.testing.assert_allclose(
      path['loss'], [_quadratic_evaluate(
          [(1 - t) * a + t * b for a, b in zip(params, other)])[0]
                     for t in ts], rtol=1e-6)

  prefix = str(tmp_path / 'grid')
  landscape.save_grid({'a': grid, 'b': grid}, prefix, seed=0)
  with np.load(prefix + '.npz') as saved:
    np.testing.assert_allclose(saved['a/loss'], grid['loss'])
    np.testing.assert_allclose(saved['b/coordinates_1'], coords)
  with open(prefix + '.json') as f:
    assert json.load(f)['metadata'] == {'seed': 0}
  for plot in (landscape.plot_contours, landscape.plot_surfaces):
    plot({'a': grid, 'b': grid}, prefix + '.png', 'title')
    assert _png_shape(prefix + '.png')[2] in (3, 4)
  landscape.plot_curves_1d({'a': {'train': one}, 'b': {'test': path}},
                           prefix + '_1d.png', 'x')
  assert _png_shape(prefix + '_1d.png')[0] > 100


def test_read_scalars_of_clu_summaries(tmp_path):
  """Tensor summaries as clu writes them; a resumed run's rewrite wins."""
  workdir = str(tmp_path)
  for values in ({1: 2.0, 2: 1.5}, {2: 1.0, 3: 0.5}):  # Run, then resume.
    writer = metric_writers.create_default_writer(workdir,
                                                  asynchronous=False)
    for step, loss in values.items():
      writer.write_scalars(step, {'train/loss': loss,
                                  'eval/accuracy': 1 / loss})
    writer.close()
  scalars = curves.read_scalars(workdir)
  steps, losses = scalars['train/loss']
  np.testing.assert_array_equal(steps, [1, 2, 3])
  np.testing.assert_allclose(losses, [2.0, 1.0, 0.5])
  # A run killed mid-write: its last record is cut short.
  last = sorted(tf.io.gfile.glob(os.path.join(workdir, 'events*')))[-1]
  with open(last, 'rb') as f:
    content = f.read()
  with open(last, 'wb') as f:
    f.write(content[:-5])
  scalars = curves.read_scalars(workdir)
  np.testing.assert_array_equal(scalars['train/loss'][0], [1, 2, 3])
  np.testing.assert_array_equal(scalars['eval/accuracy'][0], [1, 2])
  curves.plot_curves({'run': scalars}, str(tmp_path / 'c.png'))
  assert _png_shape(str(tmp_path / 'c.png'))[1] > 100
  with pytest.raises(FileNotFoundError, match='No events'):
    curves.read_scalars(str(tmp_path / 'nothing'))


@pytest.fixture(name='workdirs', scope='module')
def workdirs_fixture(tmp_path_factory):
  """A SAM and an SGD run of 4 steps on synthetic data."""
  root = tmp_path_factory.mktemp('runs')
  workdirs = {}
  for name, rho in (('sam', 0.1), ('sgd', 0.0)):
    workdirs[name] = str(root / name)
    train.train_and_evaluate(tiny_config(**{'sam.rho': rho}),
                             workdirs[name])
  return workdirs


def test_restore_run_rebuilds_the_trained_model(workdirs):
  run = analyze.restore_run(workdirs['sam'], tf.distribute.get_strategy())
  assert run.label == 'sam'
  assert run.checkpoint.endswith('ckpt-4')
  assert run.config.sam.rho == 0.1
  assert run.config.dataset.synthetic_image_shape == (8, 8, 3)
  with open(os.path.join(workdirs['sam'], 'results.json')) as f:
    results = json.load(f)
  dataset = tf.distribute.get_strategy().distribute_datasets_from_function(
      lambda ctx: sharpness.analysis_dataset(run.data, run.config, 'test',
                                             16, -1, ctx))
  loss, accuracy = sharpness.evaluate_params(run.model, dataset)(run.params)
  # The restored weights give the run's own final evaluation.
  assert loss == pytest.approx(results['eval/loss'], rel=1e-5)
  assert accuracy == pytest.approx(results['eval/accuracy'])
  with pytest.raises(FileNotFoundError, match='config.json'):
    analyze.restore_run(os.path.dirname(workdirs['sam']),
                        tf.distribute.get_strategy())


def _main(*args):
  """Runs the CLI's main with these flags; restores the flags after."""
  with flagsaver.flagsaver():
    argv = flags.FLAGS(['analyze', *args])
    cli.main(argv)


def test_cli_sharpness_and_hessian(workdirs, tmp_path, capsys):
  out = str(tmp_path)
  _main(f'--workdir={workdirs["sam"]}', f'--other_workdir={workdirs["sgd"]}',
        '--what=sharpness', f'--out={out}', '--num_batches=2',
        '--ascent_steps=2', '--splits=train,test')
  with open(os.path.join(out, 'sharpness.json')) as f:
    results = json.load(f)
  assert set(results) == {'sam', 'sgd'}
  assert results['sam']['train']['num_batches'] == 2
  assert results['sgd']['test']['examples'] == 32
  assert results['sam']['test']['rho'] == 0.05
  assert '"sharpness"' in capsys.readouterr().out

  _main(f'--workdir={workdirs["sgd"]}', '--what=hessian', f'--out={out}',
        '--num_batches=1', '--power_iterations=3', '--strategy=mirrored')
  with open(os.path.join(out, 'hessian.json')) as f:
    results = json.load(f)
  assert results['sgd']['train']['iterations'] <= 3
  assert results['sgd']['train']['eigenvalue'] > 0


@pytest.mark.slow  # The surface itself: test_surface_line_grids_and_plots.
def test_cli_landscape_line_and_curves(workdirs, tmp_path):
  out = str(tmp_path)
  common = [f'--workdir={workdirs["sgd"]}',
            f'--other_workdir={workdirs["sam"]}', f'--out={out}',
            '--num_batches=1', '--grid_points=3']
  _main(*common, '--what=landscape')
  _main(*common, '--what=line', '--span=0.25')
  _main(*common, '--what=curves', '--labels=SGD,SAM')
  for name in ('landscape_1d.png', 'landscape_2d_train_contour.png',
               'landscape_2d_train_surface.png', 'line.png', 'curves.png'):
    assert _png_shape(os.path.join(out, name))[0] > 100, name
  with np.load(os.path.join(out, 'landscape_2d_train.npz')) as grid:
    assert grid['sgd/loss'].shape == (3, 3)
    centre = grid['sgd/loss'][1, 1]
  with np.load(os.path.join(out, 'line.npz')) as line:
    ts = line['sgd to sam/train/coordinates_0']
    loss = line['sgd to sam/train/loss']
  np.testing.assert_allclose(ts, [-0.25, 0.0, 0.5, 1.0, 1.25])
  # Both sample the same training batch at the SGD weights.
  assert loss[1] == pytest.approx(centre, rel=1e-5)
  with pytest.raises(Exception, match='other_workdir'):
    _main(f'--workdir={workdirs["sgd"]}', '--what=line')
  with pytest.raises(Exception, match='distinct'):
    _main(*common, '--what=curves', '--labels=a,a')


@pytest.mark.parametrize('what,message', [
    ('sharpness', 'config.json not found: is {} the workdir of a training'),
    ('curves', 'No events.out.tfevents* files in {}'),
])
def test_cli_on_a_directory_that_is_no_run_is_one_line(tmp_path, what,
                                                       message):
  with pytest.raises(SystemExit) as stop:
    _main(f'--workdir={tmp_path}', f'--what={what}')
  assert str(stop.value).startswith('Error: ')
  assert message.format(tmp_path) in str(stop.value)
