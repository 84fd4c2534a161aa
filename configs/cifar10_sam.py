r"""ResNet-20 with SAM on CIFAR-10, SGD + cosine as in the SAM paper.

On a Cloud TPU VM (data prepared with `tfds build cifar10 --data_dir=gs://...`):

  python main.py --config=configs/cifar10_sam.py \
    --workdir=gs://BUCKET/sam/cifar10 \
    --config.dataset.data_dir=gs://BUCKET/tensorflow_datasets

The baseline: add `--config.sam.rho=0`.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.dataset.name = 'cifar10'
  config.dataset.download = True
  config.model.name = 'resnet20'
  config.sam.rho = 0.05
  config.optimizer.name = 'sgd'
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 5e-4
  config.schedule.name = 'cosine'
  config.schedule.learning_rate = 0.1
  config.batch_size = 128
  config.num_epochs = 200.0
  return config
