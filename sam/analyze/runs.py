"""A trained run, restored from its workdir for analysis."""

import dataclasses
import json
import os

from absl import logging
import keras
import ml_collections
import numpy as np
import tensorflow as tf

from configs import default
from sam import input_pipeline
from sam import models
from sam import sharpness
from sam import workdir as workdir_lib


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The run's config: configs/default.py updated with its config.json.

  Starting from the defaults keeps the field types (tuples stay tuples) and
  fills fields that a run older than the current code did not save.

  Args:
    workdir: the run's workdir, local or gs://.

  Returns:
    The config.

  Raises:
    FileNotFoundError: if the workdir has no config.json.
  """
  path = os.path.join(workdir, 'config.json')
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(f'{path} not found: is {workdir} the workdir of '
                            'a training run?')
  with tf.io.gfile.GFile(path) as f:
    saved = json.load(f)
  config = default.get_config()
  config.update(saved)
  return config


@dataclasses.dataclass
class Run:
  """A trained run: its config, data and restored model."""
  label: str
  workdir: str
  config: ml_collections.ConfigDict
  data: input_pipeline.Data
  model: keras.Model
  checkpoint: str

  @property
  def params(self) -> list[np.ndarray]:
    return [v.numpy() for v in self.model.trainable_variables]

  @property
  def state(self) -> list[np.ndarray]:
    return [v.numpy() for v in self.model.non_trainable_variables]


def default_label(workdir: str) -> str:
  return os.path.basename(os.path.normpath(workdir)) or workdir


def restore_run(workdir: str, strategy: tf.distribute.Strategy,
                label: str | None = None,
                checkpoint: str | None = None) -> Run:
  """Rebuilds a run's model and data and restores its model weights.

  Args:
    workdir: the run's workdir.
    strategy: the model's variables are created in its scope.
    label: a name for plots; the workdir's basename if None.
    checkpoint: a checkpoint path; the latest in workdir/checkpoints if None.

  Returns:
    The run.

  Raises:
    FileNotFoundError: if there is no config.json or no checkpoint.
  """
  config = load_config(workdir)
  directory = workdir_lib.checkpoint_dir(workdir)
  if not checkpoint and not workdir_lib.checkpoints(directory):
    raise FileNotFoundError(f'No checkpoint in {workdir}/checkpoints.')
  data = input_pipeline.load(config)
  with strategy.scope():
    model = models.get_model(config.model.name, data.num_classes,
                             data.image_shape)
  # The optimizer and metric state are not needed, but every model weight is.
  if checkpoint:
    status = tf.train.Checkpoint(model=model).restore(checkpoint)
    status.expect_partial()
    status.assert_existing_objects_matched()
  else:  # The newest, even while a live run deletes older ones.
    checkpoint = workdir_lib.restore(tf.train.Checkpoint(model=model),
                                     directory, partial=True)
  logging.info('Restored %s from %s.', config.model.name, checkpoint)
  return Run(label or default_label(workdir), workdir, config, data, model,
             checkpoint)


def dataset(run: Run, strategy: tf.distribute.Strategy, split: str,
             batch_size: int, num_batches: int
             ) -> tf.distribute.DistributedDataset:
  if batch_size % strategy.num_replicas_in_sync:
    raise ValueError(f'batch_size={batch_size} is not a multiple of the '
                     f'{strategy.num_replicas_in_sync} replicas.')
  return strategy.distribute_datasets_from_function(
      lambda ctx: sharpness.analysis_dataset(
          run.data, run.config, split, batch_size, num_batches, ctx))
