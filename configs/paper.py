r"""The SAM paper's WRN-28-10 settings (Foret et al. 2021, Table 1 and 2).

WideResNet-28-10, basic augmentation, 200 epochs, batch 256, SGD momentum 0.9
with lr 0.1 and cosine decay, weight decay 5e-4; rho 0.05 (CIFAR-10,
Fashion-MNIST) or 0.1 (CIFAR-100). On a Cloud TPU VM:

  python main.py --config=configs/paper.py:cifar10 \
    --workdir=gs://BUCKET/sam/paper_cifar10 \
    --config.dataset.data_dir=gs://BUCKET/tensorflow_datasets

Variants: cifar10, cifar100, fashion_mnist. The paper's error rates with SAM
(without): 2.7% (3.5%), 16.5% (18.8%), 3.98% (4.57%). Not reproduced here: a
CPU cannot train WRN-28-10 for 200 epochs.
"""

from configs import default

_RHO = {'cifar10': 0.05, 'cifar100': 0.1, 'fashion_mnist': 0.05}


def get_config(arg: str = 'cifar10'):
  if arg not in _RHO:
    raise ValueError(f'configs/paper.py:{arg}: use one of {tuple(_RHO)}.')
  config = default.get_config()
  config.dataset.name = arg
  config.dataset.download = True
  config.dataset.augment = 'basic'
  config.model.name = 'wrn28_10'
  config.sam.rho = _RHO[arg]
  config.optimizer.name = 'sgd'
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 5e-4
  config.schedule.name = 'cosine'
  config.schedule.learning_rate = 0.1
  config.batch_size = 256
  config.num_epochs = 200.0
  return config
