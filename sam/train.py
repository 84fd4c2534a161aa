"""train_and_evaluate: the host loop around the compiled multi-step SAM step.

  main.py -> train_and_evaluate (here: a loop of named actions)
          -> Trainer.train_loop (one tf.function: tf.range + strategy.run)
          -> step.train_step (the replica step) -> sam.sam_step (the SAM rule)

Each turn of the loop runs the steps up to the next interval in one call of
the compiled `train_loop` (at most `config.steps_per_loop`), then the actions
whose interval has come, on the host: the finite check (a non-finite loss
stops the run before anything is saved), progress, train summaries,
evaluation with the plateau logic, the checkpoint, and the stop after SIGTERM.
Intervals need not be multiples of `steps_per_loop`; `n` is a tensor, so a
shorter loop does not retrace.

Resuming: the latest checkpoint in `workdir/checkpoints` holds the state of
`sam.state.create_train_state`; the data stream restarts at its step (see
`input_pipeline`). A resumed run thus continues exactly where an
uninterrupted one would be.
"""

import json
import math
import os
import time

from absl import logging
from clu import metric_writers
from clu import periodic_actions
import ml_collections
import numpy as np
import tensorflow as tf

from sam import config_checks
from sam import distribute
from sam import input_pipeline
from sam import probe
from sam import stopping
from sam import workdir as workdir_lib
from sam.trainer import Trainer


def itstime(step: int, every: int, total: int) -> bool:
  """Whether an action with interval `every` runs after `step`."""
  return step % every == 0 or step == total


def _next_stop(step: int, total: int, intervals: list[int]) -> int:
  """The first step after `step` where the host loop must act."""
  return min([total] + [(step // i + 1) * i for i in intervals])


class _Run:
  """One run's host side: its data, writer, checkpoints and actions."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str,
               strategy: tf.distribute.Strategy):
    self.config = config
    self.chief = distribute.is_chief(strategy)
    self.multi_worker = isinstance(
        strategy, tf.distribute.MultiWorkerMirroredStrategy)
    self.workdir = workdir
    workdir_lib.check_resumable(config, workdir)
    directory = workdir_lib.checkpoint_dir(workdir)
    if self.chief:
      workdir_lib.check_writable(directory)
    data = input_pipeline.load(config)
    probe.check_fits(config, data)
    self.steps_per_epoch = input_pipeline.steps_per_epoch(data,
                                                          config.batch_size)
    self.total_steps = (
        config.num_train_steps if config.num_train_steps > 0 else
        math.ceil(config.num_epochs * self.steps_per_epoch))
    self.trainer = Trainer(config, strategy, data.num_classes,
                           data.image_shape, self.steps_per_epoch,
                           self.total_steps)
    logging.info('Model %s: %d trainable parameters.', config.model.name,
                 sum(int(np.prod(v.shape))
                     for v in self.trainer.state.model.trainable_variables))
    state = self.trainer.state
    restored = workdir_lib.restore(state.checkpoint, directory,
                                   state.older_checkpoints)
    if self.chief:
      workdir_lib.tidy_checkpoints(directory)
      # Only now: a resume that fails must leave the old config in place.
      workdir_lib.write_config(config, workdir)
    self.manager = tf.train.CheckpointManager(
        state.checkpoint, directory, max_to_keep=config.keep_checkpoints)
    self.step = state.step
    if restored:
      logging.info('Resumed from %s at step %d.', restored, self.step)
    self.saved_step = self.step if restored else None
    self.writer = metric_writers.create_default_writer(
        workdir, just_logging=not self.chief, asynchronous=False)
    self.report_progress = periodic_actions.ReportProgress(
        num_train_steps=self.total_steps, writer=self.writer,
        every_steps=None, every_secs=config.progress_every_secs)
    start = self.step
    self.train_iter = iter(strategy.distribute_datasets_from_function(
        lambda ctx: input_pipeline.train_dataset(data, config, ctx, start)))
    # (summary prefix, split): the test set, and the validation split if any.
    eval_batch = input_pipeline.eval_batch_size(
        config, strategy.num_replicas_in_sync)
    splits = [('eval', 'test')] + (
        [('val', 'validation')] if data.validation else [])
    self.eval_sets = [
        (prefix, strategy.distribute_datasets_from_function(
            lambda ctx, split=split: input_pipeline.eval_dataset(
                data, config, ctx, split)),
         input_pipeline.num_eval_steps(data, eval_batch, split))
        for prefix, split in splits]
    # Several hosts must run loops of one length: theirs stay steps_per_loop.
    self.loop_length = stopping.LoopLength(
        0 if self.multi_worker else config.stop_within_secs)
    self.probe = None
    if config.probe.every_steps:
      self.probe = probe.SharpnessProbe(config, data, strategy, self.trainer)

  def every(self, interval: int) -> int:
    return self.steps_per_epoch if interval == -1 else interval

  # The actions, run between loops.

  def check_finite(self, first: int) -> None:
    """A non-finite loss or gradient norm in any step of the loop leaves its
    sum non-finite: stop before anything is written."""
    if np.isfinite(self.trainer.state.train_sums.numpy()).all():
      return
    raise FloatingPointError(
        f'Non-finite training loss or gradient norm in steps {first} to '
        f'{self.step}; ' + (
            f'nothing after step {self.saved_step} was saved '
            f'({self.manager.latest_checkpoint}).'
            if self.saved_step is not None else 'nothing was saved.'))

  def write_train_metrics(self) -> dict[str, float]:
    metrics = self.trainer.read_train_metrics()
    self.writer.write_scalars(self.step, metrics)
    return metrics

  def evaluate(self) -> dict[str, float]:
    """Every eval set, and the moving average of the weights on it."""
    metrics = {}
    for prefix, dataset, steps in self.eval_sets:
      metrics.update(self.trainer.evaluate(dataset, steps, prefix))
      if self.config.ema_decay:
        metrics.update(self.trainer.evaluate(dataset, steps, f'ema_{prefix}',
                                             ema=True))
    return metrics

  def evaluate_and_adapt(self) -> dict[str, float]:
    """Evaluates, writes the metrics, and lets the plateau logic act."""
    metrics = self.evaluate()
    self.writer.write_scalars(self.step, metrics)
    note = self.trainer.plateau.update(metrics)
    if note:
      logging.info('Step %d: %s.', self.step, note)
    return metrics

  def train_until(self, stop: int) -> None:
    """Runs the steps up to `stop` in one loop, and checks them."""
    first, start = self.step + 1, time.monotonic()
    self.trainer.train_loop(self.train_iter, tf.constant(stop - self.step))
    self.step = stop
    self.check_finite(first)  # Waits for the loop's end.
    self.loop_length.timed(stop - first + 1, start)

  def save(self) -> None:
    if self.saved_step == self.step:
      return
    start = time.monotonic()
    if self.chief:
      try:
        self.manager.save(checkpoint_number=self.step)
      except tf.errors.OpError as e:  # A full disk, a lost bucket.
        raise workdir_lib.CheckpointError(
            f'Could not save the checkpoint of step {self.step} in '
            f'{self.manager.directory} ({type(e).__name__}: {e.message}). '
            'The checkpoints before it are intact: fix that, then run the '
            'same command to resume.') from e
    elif self.multi_worker:
      workdir_lib.take_part_in_save(self.trainer.state.checkpoint)
    self.saved_step = self.step
    self.loop_length.timed_save(start)

  def stop_requested(self, stop: stopping.StopFlag) -> bool:
    if not self.multi_worker:
      return stop.requested
    # SIGTERM reaches the hosts at different moments; all must stop after the
    # same loop, or those going on wait for the others in the next
    # collective forever.
    return self.trainer.any_replica(stop.requested)

  def finish(self, train_metrics: dict[str, float],
             eval_metrics: dict[str, float],
             train_seconds: float) -> dict[str, float]:
    """Writes results.json (the chief) and returns the final metrics."""
    if not eval_metrics:
      # Resumed a finished run: evaluate the final weights again.
      eval_metrics = self.evaluate()
    self.writer.flush()
    results = {'step': self.step, **train_metrics, **eval_metrics,
               'early_stopped': self.trainer.plateau.stopped,
               'train_seconds': train_seconds}
    if self.chief:
      # Written aside and renamed into place: a grid's report (or any
      # reader) never sees half a file.
      path = os.path.join(self.workdir, 'results.json')
      with tf.io.gfile.GFile(path + '.tmp', 'w') as f:
        json.dump(results, f, indent=2, sort_keys=True)
      tf.io.gfile.rename(path + '.tmp', path, overwrite=True)
    logging.info('Final test accuracy %.2f%% at step %d.',
                 100 * eval_metrics['eval/accuracy'], self.step)
    return results

  def finished_results(self) -> dict[str, float] | None:
    """results.json of a run that had already finished, if there is one."""
    path = os.path.join(self.workdir, 'results.json')
    if self.saved_step is None or (self.step < self.total_steps and
                                   not self.trainer.plateau.stopped):
      return None
    results, problem = workdir_lib.read_object(path, ('step',))
    if problem:  # Evaluated and written again below.
      logging.warning('The finished run left %s; evaluating it again.',
                      problem)
    return results  # None if it stopped between its last save and them.


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       strategy: tf.distribute.Strategy | None = None,
                       signals: stopping.StopFlag | None = None
                       ) -> dict[str, float]:
  """Trains and evaluates, resuming from `workdir` if it has a checkpoint.

  Args:
    config: the run's config (see configs/default.py).
    workdir: where checkpoints, summaries, config.json and results.json go;
      local or gs://.
    strategy: the distribution strategy; the current one if None.
    signals: the StopFlag that SIGTERM and Ctrl-C set; a new one if None.

  Returns:
    The final metrics, as also written to `workdir/results.json`.
  """
  strategy = strategy or tf.distribute.get_strategy()
  if signals is None:
    with stopping.StopFlag() as signals:
      return train_and_evaluate(config, workdir, strategy, signals)
  config_checks.validate_config(
      config, strategy.num_replicas_in_sync,
      tpu=isinstance(strategy, tf.distribute.TPUStrategy))
  run = _Run(config, workdir, strategy)
  trainer, total = run.trainer, run.total_steps
  log_every, eval_every, ckpt_every = (run.every(config.log_every_steps),
                                       run.every(config.eval_every_steps),
                                       run.every(config.checkpoint_every_steps))
  # total + 1: a probe that never comes before the end.
  probe_every = (run.every(config.probe.every_steps)
                 if config.probe.every_steps else total + 1)
  finished = run.finished_results()
  if finished is not None:
    logging.info('Nothing to train: the checkpoint is at step %d and '
                 'num_train_steps gives %d; %s is kept as it is. Final test '
                 'accuracy %.2f%%.', run.step, total,
                 os.path.join(workdir, 'results.json'),
                 100 * finished.get('eval/accuracy', math.nan))
    return finished
  if not run.multi_worker:
    # A signal during the start-up; under several hosts the first loop
    # boundary stops them all together.
    signals.stop_if_requested()
  start_time = time.time()
  train_metrics, eval_metrics = {}, {}
  if run.step < total:
    logging.info('Training from step %d to %d (%d steps per epoch).',
                 run.step, total, run.steps_per_epoch)
  else:
    logging.info('Nothing to train: the checkpoint is at step %d and '
                 'num_train_steps gives %d; evaluating it.', run.step, total)
  run.report_progress(run.step)
  while run.step < total and not trainer.plateau.stopped:
    run.train_until(_next_stop(run.step, total, [
        run.loop_length.cap(config.steps_per_loop), log_every, eval_every,
        ckpt_every, probe_every]))
    run.report_progress(run.step)
    stop_requested = run.stop_requested(signals)
    if itstime(run.step, log_every, total):
      train_metrics = run.write_train_metrics()
    if itstime(run.step, eval_every, total):
      eval_metrics = run.evaluate_and_adapt()
    if run.probe and itstime(run.step, probe_every, total):
      run.writer.write_scalars(run.step, run.probe())
    if (itstime(run.step, ckpt_every, total) or stop_requested or
        trainer.plateau.stopped):
      run.save()
    if stop_requested and run.step < total:
      run.writer.flush()
      logging.warning('Stopped by %s at step %d, saved in %s; run the '
                      'same command to resume.',
                      signals.requested_by or 'a signal to another host',
                      run.step,
                      os.path.join(run.manager.directory,
                                   f'ckpt-{run.step}'))
      return {'step': run.step, 'preempted': True}
  return run.finish(train_metrics, eval_metrics, time.time() - start_time)
