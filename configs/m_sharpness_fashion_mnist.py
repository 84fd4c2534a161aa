r"""A grid for experiments/compare.py: m-sharpness (the SAM paper's section
4.1) on real Fashion-MNIST, clean and 40% noisy labels.

  python -m experiments.compare --grid=configs/m_sharpness_fashion_mnist.py \
    --out_dir=/tmp/sam/m_sharpness

Each SAM step computes one eps per micro-batch of m examples
(`sam.micro_batch_size`, fixed whatever the replicas) for m in {8, 32, 128}
at batch 128 (m = 128 is plain SAM), at equal epochs, beside the baseline
(rho = 0), 3 seeds; the report gives each m's paired difference to m = 128.
The base run is configs/fashion_mnist_study.py (a small CNN, Adam with cosine
decay, 10,000 training images, rho = 0.1) cut to 10 epochs to fit the study
into an hour on the 2-core machine (m = 8 takes about 3 times the steps' time
of m = 128 there: 16 small passes instead of one).
"""

import ml_collections

from configs import fashion_mnist_study


def get_config():
  grid = ml_collections.ConfigDict()
  grid.base = fashion_mnist_study.get_config()
  grid.base.num_epochs = 10.0
  grid.base.eval_every_steps = 78 * 2  # The curves: every 2nd epoch.
  grid.base.checkpoint_every_steps = 78 * 5
  grid.variants = ('sam',)
  grid.rho = (0.1,)
  grid.micro_batch_size = (8, 32, 128)
  grid.label_noise = (0.0, 0.4)
  grid.seeds = (0, 1, 2)
  grid.baselines = ('equal_epochs',)
  return grid
