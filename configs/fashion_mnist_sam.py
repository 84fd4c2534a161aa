r"""The offline default: a small CNN with SAM on Fashion-MNIST, on a CPU.

Reads the IDX files of Debian's `dataset-fashion-mnist` package:

  python main.py --config=configs/fashion_mnist_sam.py \
    --workdir=/tmp/sam/fashion_mnist

The baseline: add `--config.sam.rho=0`.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.dataset.name = 'fashion_mnist'
  config.dataset.augment = 'none'
  config.model.name = 'cnn'
  config.sam.rho = 0.05
  config.optimizer.name = 'sgd'
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 5e-4
  config.schedule.name = 'cosine'
  config.schedule.learning_rate = 0.05
  config.schedule.warmup_epochs = 0.5
  config.batch_size = 128
  config.num_epochs = 5.0
  config.steps_per_loop = 50
  config.log_every_steps = 100
  return config
