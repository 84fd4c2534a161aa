"""Every config builds its model and trains two steps on tiny data; the
ImageNet configs follow their papers' tables."""

import glob
import importlib
import math
import os

import ml_collections
import numpy as np
import pytest

from configs import default
from configs import imagenet_resnet50_sam
from configs import imagenet_vit_sam
from configs import paper
from sam import config_checks
from sam import input_pipeline
from sam import optim
from sam import streaming
from sam import train
from tests import streaming_test

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(
    os.path.basename(p)[:-3]
    for p in glob.glob(os.path.join(ROOT, 'configs', '*.py'))
    if not p.endswith('__init__.py'))
# Configs with variants (`--config=configs/paper.py:cifar100`).
# (The ImageNet configs' other variants differ in numbers only, which
# the tests below check.)
VARIANTS = {'paper': ('cifar10', 'cifar100', 'fashion_mnist'),
            'imagenet_resnet50_sam': ('gsam',),
            'imagenet_vit_sam': ('s16,adamw', 's32,gsam')}


@pytest.fixture(scope='module')
def tiny_images(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tfds'))
  streaming_test.prepare_tiny_images(path)
  return path


@pytest.mark.slow
@pytest.mark.parametrize('name,arg', [
    (name, arg) for name in CONFIGS for arg in VARIANTS.get(name, (None,))])
def test_config_runs_two_steps(name, arg, tmp_path, request,
                               shallow_imagenet_models, shallow_resnet20):
  module = importlib.import_module(f'configs.{name}')
  config = module.get_config(arg) if arg else module.get_config()
  if 'base' in config:  # A grid of experiments/compare.py: its run config.
    config = config.base
  config_checks.validate_config(config, 1)
  # The recipe's model, optimizer, schedule and augmentation, on tiny data.
  if streaming.is_streamed(config.dataset.name):
    # Its stream and preprocessing too, on JPEGs of 20-26 pixels.
    config.dataset.update(name='tfds:tiny_images', image_size=32,
                          data_dir=request.getfixturevalue('tiny_images'),
                          shuffle_buffer=16)
  else:
    config.dataset.name = 'synthetic'
    config.dataset.synthetic_image_shape = (16, 16, 3)
    config.dataset.synthetic_train_size = 64
    config.dataset.synthetic_test_size = 16
    config.dataset.train_subset = -1
    config.dataset.validation_size = min(config.dataset.validation_size, 16)
  # The same families, small enough for a CPU (ResNet-20, ResNet-50, the
  # ViTs and the Mixers at 1 or 2 blocks a stage: shallow_resnet20,
  # shallow_imagenet_models).
  if config.model.name == 'wrn28_10':
    config.model.name = 'wrn16_4'
  config.batch_size = 16
  config.eval_batch_size = 16
  if config.sam.micro_batch_size:  # The paper's m = 32: 2 micro-batches.
    config.sam.micro_batch_size = 8
  config.num_train_steps = 2
  config.steps_per_loop = 1
  results = train.train_and_evaluate(config, str(tmp_path))
  assert results['step'] == 2


# configs/paper.py's fields and their sources: the SAM paper (Foret et al.,
# ICLR 2021), else the official code (google-research/sam at dae9904) for
# what the paper leaves to it. Each field the config sets must be here,
# with the value it sets.
_PAPER = 'Foret et al. 2021, '
_CODE = 'google-research/sam dae9904, '
PAPER_TABLE = {
    'dataset.augment': ('basic', _PAPER + '§3.1: flip, pad 4, crop'),
    'dataset.download': (True, 'ours: prepare the data set on first use'),
    'batch_size': (256, _PAPER + 'appendix C.1'),
    'optimizer.name': ('sgd', _CODE + 'flax_training.create_optimizer'),
    'optimizer.momentum': (0.9, _CODE + 'create_optimizer: beta=0.9'),
    'optimizer.nesterov': (True, _CODE + 'create_optimizer: nesterov=True'),
    'optimizer.weight_decay_type': ('l2', _CODE + '0.5 * wd * ||w||^2'),
    'optimizer.decay_all_params': (
        True, _CODE + '--no_weight_decay_on_bn False'),
    'optimizer.grad_clip_norm': (5.0, _CODE + '--gradient_clipping'),
    'schedule.name': ('cosine', _CODE + '--lr_schedule'),
    'schedule.warmup_epochs': (0.0, _CODE + 'get_cosine_schedule'),
    'sam.sync_perturbation': (False, _PAPER + '§3.1: a SAM gradient per GPU'),
    'sam.micro_batch_size': (32, _PAPER + '§3.1: 256 over 8 V100s'),
}
# Per data set and model, as the paper's appendix C.1 prints them: (learning
# rate, weight decay, rho) of Table 6 (CIFAR) and Table 7 (Fashion-MNIST),
# then the epochs: Table 6's WRN rows name theirs; Shake-Shake's and
# PyramidNet's are prior work's (the AutoAugment code's 1800, tensorflow/
# models research/autoaugment/README.md); Fashion-MNIST's are not in the
# paper (the code's --num_epochs default).
PAPER_ROWS = {
    'cifar10': (0.1, 5e-4, 0.05, 200.0),
    'cifar100': (0.1, 5e-4, 0.1, 200.0),
    'cifar10,wrn_1800': (0.05, 1e-3, 0.05, 1800.0),
    'cifar100,wrn_1800': (0.05, 1e-3, 0.1, 1800.0),
    'cifar10,shake_shake': (0.02, 1e-3, 0.02, 1800.0),
    'cifar100,shake_shake': (0.02, 1e-3, 0.05, 1800.0),
    'cifar10,pyramidnet': (0.02, 5e-4, 0.05, 1800.0),
    'cifar100,pyramidnet': (0.05, 5e-4, 0.05, 1800.0),
    'fashion_mnist': (0.1, 5e-4, 0.05, 200.0),
    'fashion_mnist,shake_shake': (0.1, 5e-4, 0.02, 200.0),
}
# train.py --model_name's three CIFAR models, as load_model.py builds them.
PAPER_MODELS = {'': 'wrn28_10', 'wrn_1800': 'wrn28_10',
                'shake_shake': 'shake_shake_26_2x96d',  # 4 blocks, x6.
                'pyramidnet': 'pyramidnet272_a200_shakedrop'}  # 272, 200.


def _flat(config, prefix=''):
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from _flat(value, f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}', value


def test_paper_config_is_its_table_of_sources():
  """Every field configs/paper.py sets has a source in PAPER_TABLE or
  PAPER_ROWS, and its value is theirs; the paper's other rows are
  refused."""
  base = dict(_flat(default.get_config()))
  for arg, (lr, wd, rho, epochs) in PAPER_ROWS.items():
    dataset, _, model = arg.partition(',')
    config = dict(_flat(paper.get_config(arg)))
    table = {**{k: v for k, (v, _) in PAPER_TABLE.items()},
             'dataset.name': dataset, 'model.name': PAPER_MODELS[model],
             'schedule.learning_rate': lr, 'optimizer.weight_decay': wd,
             'sam.rho': rho, 'num_epochs': epochs}
    assert {k for k, v in config.items() if base[k] != v} <= set(table)
    assert {k: config[k] for k in table} == table, arg
  assert paper.get_config('cifar10,wrn') == paper.get_config('cifar10')
  for arg in ('cifar10,resnet', 'fashion_mnist,pyramidnet', 'svhn'):
    with pytest.raises(ValueError, match='is not a row of the paper'):
      paper.get_config(arg)


def _schedule(config):
  steps_per_epoch = imagenet_resnet50_sam.TRAIN_EXAMPLES // config.batch_size
  total = math.ceil(config.num_epochs * steps_per_epoch)
  return optim.Schedule.from_run(config, steps_per_epoch, total), total


@pytest.mark.parametrize('arg,rho_max,rho_min', [
    ('sgd', 0, 0), ('sam', 0.04, 0.04), ('gsam', 0.04, 0.02)])
def test_resnet50_config_is_gsams_table_4_row(arg, rho_max, rho_min):
  """5k warm-up steps, then lr 1.6 falling linearly to 1.6e-2 over 90
  epochs, rho from 0.04 to 0.02 with it (GSAM)."""
  config = imagenet_resnet50_sam.get_config(arg)
  schedule, total = _schedule(config)
  assert (schedule.warmup_steps, total) == (5000, 90 * 312)
  rates = [float(schedule(s)) for s in (4999, total)]
  np.testing.assert_allclose(rates, [1.6, 1.6e-2], rtol=1e-3)
  rhos = [float(optim.sam_rho(config, schedule, s)) for s in (4999, total)]
  np.testing.assert_allclose(rhos, [rho_max, rho_min], rtol=1e-5)
  assert config.sam.gsam_alpha == (0.01 if arg == 'gsam' else 0)


@pytest.mark.parametrize('model,alpha', [
    ('s32', 0.4), ('s16', 1.0), ('b32', 0.6), ('b16', 0.4)])
def test_vit_config_is_gsams_table_4_row(model, alpha):
  """AdamW, 10k warm-up steps, then 3e-3 falling linearly to 3e-5 over 300
  epochs; GSAM's rho from 0.6 to its row's rho_min; SAM at rho_max."""
  rho_min = {'s32': 0.0, 's16': 0.0, 'b32': 0.1, 'b16': 0.2}[model]
  for method in imagenet_vit_sam.METHODS:
    config = imagenet_vit_sam.get_config(f'{model},{method}')
    config_checks.validate_config(config, 32)
    assert config.model.name == f'vit_{model}'
    schedule, total = _schedule(config)
    assert (schedule.warmup_steps, total) == (10_000, 300 * 312)
    rates = [float(schedule(s)) for s in (9_999, total)]
    np.testing.assert_allclose(rates, [3e-3, 3e-5], rtol=1e-3)
    rhos = [float(optim.sam_rho(config, schedule, s))
            for s in (9_999, total)]
    want = {'adamw': [0, 0], 'sam': [0.6, 0.6], 'gsam': [0.6, rho_min]}
    np.testing.assert_allclose(rhos, want[method], atol=1e-6)
    assert config.sam.gsam_alpha == (alpha if method == 'gsam' else 0)


def test_an_unknown_imagenet_variant_is_one_line():
  with pytest.raises(ValueError, match='use one of'):
    imagenet_resnet50_sam.get_config('adam')
  with pytest.raises(ValueError, match='e.g. b16,gsam'):
    imagenet_vit_sam.get_config('b8,gsam')


# Every TPU slice's replica count: v2-8 to v5p-4096's 2048 chips.
SLICE_REPLICAS = [2**k for k in range(12)]


@pytest.mark.parametrize('name,arg', [
    (name, arg) for name in CONFIGS for arg in VARIANTS.get(name, (None,))])
def test_config_validates_on_every_slice_its_batch_splits_over(name, arg):
  """A shipped config runs on any slice that can split its batch (into
  whole micro-batches of sam.micro_batch_size, where it fixes m); beyond
  that (e.g. batch 128 on 256 cores), one line names the field and the
  batch size that fixes it. The eval batch never stands in the way: it is
  rounded up."""
  module = importlib.import_module(f'configs.{name}')
  config = module.get_config(arg) if arg else module.get_config()
  config = config.base if 'base' in config else config
  split = max(config.sam.micro_batch_size, 1)
  for replicas in SLICE_REPLICAS:
    if config.batch_size % (replicas * split) == 0:
      config_checks.validate_config(config, replicas)
    else:
      field = 'sam.micro_batch_size' if (
          config.batch_size % replicas == 0) else 'batch_size'
      with pytest.raises(ValueError, match=(
          rf'^config\.{field}=\d+ is invalid: .* set '
          r'--config\.batch_size=\d+ ')):
        config_checks.validate_config(config, replicas)
  # Every single-host TPU (up to 8 cores) and a 32-core pod slice, at least.
  assert config.batch_size % 32 == 0


def test_eval_batch_is_rounded_up_to_the_replicas():
  config = ml_collections.ConfigDict({'eval_batch_size': 500})
  assert [input_pipeline.eval_batch_size(config, r)
          for r in (1, 4, 8, 16, 1024)] == [500, 500, 504, 512, 1024]
