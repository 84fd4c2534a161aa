r"""The SAM paper's CIFAR and Fashion-MNIST runs (Foret et al., ICLR 2021).

Every field below names its source: the paper (section, or appendix C.1's
Tables 6 and 7 of the hyperparameters each model used), else the official
code, google-research/sam at dae9904 (the flag and its default in
sam_jax/train.py or sam_jax/training_utils/flax_training.py), for what the
paper leaves to it. Where they disagree the paper wins, for its tables:
its batch is 256 (appendix C.1), the code's default 128; its learning rate
and weight decay are per model (Table 6, "determined via a joint grid search
prior to applying SAM"), the code's defaults 0.1 and 1e-3. The paper
gives no epochs for Shake-Shake and PyramidNet, only that "all other model
hyperparameter values are identical to those used in prior work" (C.1); we
read that as the prior work whose baselines §3.1 says it matched (Cubuk et
al. 2018): the AutoAugment code trains both for 1800 epochs
(tensorflow/models research/autoaugment/README.md at 0bb56f1).
tests/configs_test.py::PAPER_TABLE holds the same values and sources and
checks every field this file sets.

m-sharpness: the paper ran on "a single host having 8 NVidia V100 GPUs",
each computing the SAM gradient of its eighth of the batch (§3.1; the
code's `--sync_perturbations` False), so m = 256 / 8 = 32. Here m is fixed
at 32 whatever the slice (`sam.micro_batch_size`), so that the result does
not change with the TPU; pass --config.sam.micro_batch_size=m for another
m (a divisor of the per-replica batch; more than 8 replicas need a larger
--config.batch_size).

On a Cloud TPU VM:

  python main.py --config=configs/paper.py:cifar10 \
    --workdir=gs://BUCKET/sam/paper_cifar10 \
    --config.dataset.data_dir=gs://BUCKET/tensorflow_datasets

Variants: cifar10, cifar100, fashion_mnist, each with WRN-28-10 for 200
epochs or, after a comma, a row of the paper's Table 6 (7 for
Fashion-MNIST): `wrn_1800` (WRN-28-10 for 1800 epochs), `shake_shake` (its
"WRN 26-2x6 ShakeShake", the code's WideResnet28x6_ShakeShake: our
shake_shake_26_2x96d) and, on CIFAR, `pyramidnet` (PyramidNet + ShakeDrop,
the code's Pyramid_ShakeDrop: depth 272, alpha 200). Not reproduced here: a
CPU cannot train these (docs/study.md).
"""

from configs import default

# The paper's appendix C.1: (learning rate, weight decay, rho) of each data
# set and model, Table 6 (CIFAR-10 and CIFAR-100) and Table 7
# (Fashion-MNIST); PyramidNet + ShakeDrop has a row per CIFAR data set. Then
# the epochs: WRN-28-10's two rows are named by them (Table 6); Shake-
# Shake's and PyramidNet's are prior work's (AutoAugment's, see above);
# Fashion-MNIST's are not in the paper: the code's --num_epochs default.
TABLE = {
    ('cifar10', 'wrn'): (0.1, 5e-4, 0.05, 200.0),
    ('cifar100', 'wrn'): (0.1, 5e-4, 0.1, 200.0),
    ('cifar10', 'wrn_1800'): (0.05, 1e-3, 0.05, 1800.0),
    ('cifar100', 'wrn_1800'): (0.05, 1e-3, 0.1, 1800.0),
    ('cifar10', 'shake_shake'): (0.02, 1e-3, 0.02, 1800.0),
    ('cifar100', 'shake_shake'): (0.02, 1e-3, 0.05, 1800.0),
    ('cifar10', 'pyramidnet'): (0.02, 5e-4, 0.05, 1800.0),
    ('cifar100', 'pyramidnet'): (0.05, 5e-4, 0.05, 1800.0),
    ('fashion_mnist', 'wrn'): (0.1, 5e-4, 0.05, 200.0),
    ('fashion_mnist', 'shake_shake'): (0.1, 5e-4, 0.02, 200.0),
}
# train.py --model_name, as load_model.py builds each. Shake-Shake's and
# ShakeDrop's ascent takes the true gradient, as the code's
# get_sam_gradient (our sam.ascent_mode='train').
MODELS = {'wrn': 'wrn28_10', 'wrn_1800': 'wrn28_10',
          'shake_shake': 'shake_shake_26_2x96d',
          'pyramidnet': 'pyramidnet272_a200_shakedrop'}
BATCH_SIZE = 256  # Appendix C.1.
M = BATCH_SIZE // 8  # §3.1: the batch over 8 GPUs, a SAM gradient each.


def get_config(arg: str = 'cifar10'):
  dataset, _, model = arg.partition(',')
  model = model or 'wrn'
  if (dataset, model) not in TABLE:
    raise ValueError(
        f'configs/paper.py:{arg} is not a row of the paper: use one of '
        f'{", ".join(sorted(",".join(key) for key in TABLE))} (e.g. '
        'cifar10,shake_shake; a data set alone means its wrn).')
  learning_rate, weight_decay, rho, epochs = TABLE[dataset, model]
  config = default.get_config()
  config.dataset.name = dataset  # train.py --dataset
  config.dataset.download = True
  # §3.1: "basic data augmentations (horizontal flip, padding by four
  # pixels, and random crop)"; train.py --image_level_augmentations basic.
  config.dataset.augment = 'basic'
  config.model.name = MODELS[model]
  config.batch_size = BATCH_SIZE
  config.num_epochs = epochs
  # flax_training.create_optimizer: optim.Momentum(beta=0.9, nesterov=True).
  config.optimizer.name = 'sgd'
  config.optimizer.momentum = 0.9
  config.optimizer.nesterov = True
  # The table's weight decay, as the code applies --weight_decay: 0.5 * wd *
  # ||w||^2 in the loss, on every parameter (--no_weight_decay_on_bn False).
  config.optimizer.weight_decay = weight_decay
  config.optimizer.weight_decay_type = 'l2'
  config.optimizer.decay_all_params = True
  # --gradient_clipping 5.0, of the averaged gradient (the paper says none).
  config.optimizer.grad_clip_norm = 5.0
  # The table's learning rate; --lr_schedule cosine, no warm-up (the paper
  # names no schedule).
  config.schedule.name = 'cosine'
  config.schedule.learning_rate = learning_rate
  config.schedule.warmup_epochs = 0.0
  config.sam.rho = rho
  # eps from each GPU's own part of the batch (§3.1); here from each
  # micro-batch of M, on any number of replicas.
  config.sam.sync_perturbation = False
  config.sam.micro_batch_size = M
  return config
