r"""The original TF 2 SAM notebook's recipe on CIFAR-10, as a config.

ResNet-20, Adam with its default rate, ReduceLROnPlateau (factor 0.5,
patience 3) and early stopping (patience 10) on a 5,000-image validation
split (the notebook watched the test set; here the test set is only
reported), random crop plus random brightness, up to 100 epochs, rho 0.05:

  python main.py --config=configs/cifar10_seed.py \
    --workdir=gs://BUCKET/sam/cifar10_seed

The baseline: add `--config.sam.rho=0`. The notebook's ResNet-20 (from
keras-idiomatic-programmer) has 0.58M parameters; ours is He et al.'s 0.27M.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.dataset.name = 'cifar10'
  config.dataset.download = True
  config.dataset.augment = 'crop_brightness'
  config.dataset.validation_size = 5000
  config.model.name = 'resnet20'
  config.sam.rho = 0.05
  config.optimizer.name = 'adam'
  config.optimizer.weight_decay = 0.0
  config.schedule.name = 'plateau'
  config.schedule.learning_rate = 1e-3
  config.plateau.monitor = 'val/loss'
  config.plateau.factor = 0.5
  config.plateau.patience = 3
  config.plateau.early_stopping_patience = 10
  config.batch_size = 128
  config.num_epochs = 100.0
  return config
