"""Every config builds its model and trains two steps on synthetic data."""

import glob
import importlib
import os

import pytest

from sam import config_checks
from sam import train

pytestmark = pytest.mark.slow  # Not in the fast subset (pytest.ini).

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(
    os.path.basename(p)[:-3]
    for p in glob.glob(os.path.join(ROOT, 'configs', '*.py'))
    if not p.endswith('__init__.py'))
# Configs with variants (`--config=configs/paper.py:cifar100`).
VARIANTS = {'paper': ('cifar10', 'cifar100', 'fashion_mnist')}


@pytest.mark.parametrize('name,arg', [
    (name, arg) for name in CONFIGS for arg in VARIANTS.get(name, (None,))])
def test_config_runs_two_steps(name, arg, tmp_path):
  module = importlib.import_module(f'configs.{name}')
  config = module.get_config(arg) if arg else module.get_config()
  if 'base' in config:  # A grid of experiments/compare.py: its run config.
    config = config.base
  config_checks.validate_config(config, 1)
  # The recipe's model, optimizer, schedule and augmentation, on tiny data.
  config.dataset.name = 'synthetic'
  config.dataset.synthetic_image_shape = (16, 16, 3)
  if config.model.name == 'wrn28_10':
    config.model.name = 'wrn16_4'  # The same family, small enough for a CPU.
  config.dataset.synthetic_train_size = 64
  config.dataset.synthetic_test_size = 16
  config.dataset.train_subset = -1
  config.dataset.validation_size = min(config.dataset.validation_size, 16)
  config.batch_size = 16
  config.eval_batch_size = 16
  config.num_train_steps = 2
  config.steps_per_loop = 1
  results = train.train_and_evaluate(config, str(tmp_path))
  assert results['step'] == 2
