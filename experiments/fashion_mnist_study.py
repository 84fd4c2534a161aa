r"""SAM against its baseline on real Fashion-MNIST, clean and noisy labels.

  python -m experiments.fashion_mnist_study --out_dir=/tmp/sam/study

Trains configs/fashion_mnist_study.py with rho = 0 (the baseline, Adam alone)
and with SAM, with clean labels and with symmetric label noise, for several
seeds, one run after the other in this process. After every run it rewrites
`out_dir/results.md` (mean +- std of the final clean-test accuracy per cell,
runs per cell, wall time) and `out_dir/curves.png` (test accuracy over
training, mean over seeds), so an interrupted study still reports what it
finished; runs already finished (their results.json exists) are not redone.
"""

import json
import os
import time

from absl import app
from absl import flags
from absl import logging
from matplotlib import figure
from matplotlib.backends import backend_agg
import numpy as np

from configs import fashion_mnist_study
from sam import curves
from sam import train

_OUT_DIR = flags.DEFINE_string('out_dir', None, 'Where runs and reports go.')
_SEEDS = flags.DEFINE_integer('seeds', 3, 'Seeds per cell.')
_RHO = flags.DEFINE_float('rho', 0.1, 'SAM radius (with Adam).')
_NOISE = flags.DEFINE_float('noise', 0.4, 'Label noise of the noisy cells.')
_EPOCHS = flags.DEFINE_float('epochs', 40, 'Epochs per run.')
flags.mark_flag_as_required('out_dir')


def _cells(rho, noise):
  """(name, label noise, rho) of the four cells."""
  return [('clean, baseline', 0.0, 0.0), (f'clean, SAM rho={rho}', 0.0, rho),
          (f'{noise:.0%} noise, baseline', noise, 0.0),
          (f'{noise:.0%} noise, SAM rho={rho}', noise, rho)]


def _report(out_dir, cells, runs, config):
  """Writes results.md and curves.png from the finished runs."""
  steps_per_epoch = config.steps_per_loop
  lines = [
      f'Fashion-MNIST, {config.dataset.train_subset} training images '
      f'(fixed subset), full 10,000-image test set with clean labels; '
      f'model `{config.model.name}`, Adam lr {config.schedule.learning_rate} '
      f'({config.schedule.name}), '
      f'batch {config.batch_size}, {config.num_epochs:g} epochs, no '
      'augmentation; final test accuracy in %.', '',
      '| cell | test accuracy (mean ± std) | runs | wall time per run (s) |',
      '|---|---|---|---|']
  fig = figure.Figure(figsize=(7, 4.5))
  backend_agg.FigureCanvasAgg(fig)
  ax = fig.subplots()
  for name, _, _ in cells:
    done = [r for r in runs if r['cell'] == name]
    if not done:
      continue
    accuracy = 100 * np.array([r['eval/accuracy'] for r in done])
    seconds = np.array([r['wall_seconds'] for r in done])
    lines.append(f'| {name} | {accuracy.mean():.2f} ± {accuracy.std():.2f} '
                 f'| {len(done)} | {seconds.mean():.0f} |')
    # (steps, values) of the test accuracy of each run.
    runs_curves = [curves.read_scalars(r['workdir'])['eval/accuracy']
                   for r in done]
    length = min(len(c[0]) for c in runs_curves)
    epochs = np.array(runs_curves[0][0][:length]) / steps_per_epoch
    mean = np.mean([c[1][:length] for c in runs_curves], axis=0) * 100
    ax.plot(epochs, mean, marker='o', label=f'{name} ({len(done)} runs)')
  ax.set_xlabel('epoch')
  ax.set_ylabel('clean test accuracy (%)')
  ax.set_title('SAM vs. baseline on Fashion-MNIST')
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, 'curves.png'), dpi=100)
  with open(os.path.join(out_dir, 'results.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')


def main(argv):
  del argv
  out_dir = _OUT_DIR.value
  os.makedirs(out_dir, exist_ok=True)
  cells = _cells(_RHO.value, _NOISE.value)
  runs = []
  config = fashion_mnist_study.get_config()
  config.num_epochs = _EPOCHS.value
  for seed in range(_SEEDS.value):
    for name, noise, rho in cells:
      config = fashion_mnist_study.get_config()
      config.num_epochs = _EPOCHS.value
      config.seed = seed
      config.dataset.label_noise = noise
      config.sam.rho = rho
      workdir = os.path.join(
          out_dir, f'noise{noise:g}_rho{rho:g}_seed{seed}')
      results_path = os.path.join(workdir, 'results.json')
      if os.path.exists(results_path):
        with open(results_path) as f:
          results = json.load(f)
        results['wall_seconds'] = results.get('wall_seconds',
                                              results['train_seconds'])
      else:
        start = time.time()
        results = train.train_and_evaluate(config, workdir)
        results['wall_seconds'] = time.time() - start
      logging.info('%s seed %d: %.2f%%', name, seed,
                   100 * results['eval/accuracy'])
      runs.append(dict(results, cell=name, seed=seed, workdir=workdir))
      _report(out_dir, cells, runs, config)


if __name__ == '__main__':
  app.run(main)
