r"""A grid for experiments/compare.py: SAM against equal-epoch and
equal-compute baselines on real Fashion-MNIST, clean and 40% noisy labels.

  python -m experiments.compare --grid=configs/compare_fashion_mnist.py \
    --out_dir=/tmp/sam/compare

The base run is configs/fashion_mnist_study.py (a small CNN, Adam with
cosine decay, 10,000 training images) with 5,000 of them held out for
validation: rho is swept on seed 0 and chosen there on val/accuracy, never on
the test set, per label noise; seeds 1 and 2 run the chosen rho and the
baselines (22 cells, under an hour on the 2-core machine).
Every field can be overridden, e.g. `--grid.seeds='(0,)'` or
`--grid.rho='(0.1,)'`; `--grid.base.num_epochs=10` shortens every cell.
"""

import ml_collections

from configs import fashion_mnist_study


def get_config():
  grid = ml_collections.ConfigDict()
  grid.base = fashion_mnist_study.get_config()
  grid.base.dataset.validation_size = 5_000
  # Every 2nd epoch (39 steps each): the curves. The evaluations (15,000
  # test and validation images) took more time than a baseline epoch's
  # training, so each epoch's made the grid about a third slower.
  grid.base.eval_every_steps = 78
  grid.variants = ('sam',)
  grid.rho = (0.05, 0.1, 0.2)
  grid.label_noise = (0.0, 0.4)
  grid.seeds = (0, 1, 2)
  grid.sweep_seeds = (0,)
  grid.baselines = ('equal_epochs', 'equal_compute')
  return grid
