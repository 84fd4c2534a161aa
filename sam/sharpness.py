"""Sharpness of a trained model: m-sharpness and the top Hessian eigenvalue.

Two numbers that say how sharp the minimum a checkpoint sits in is, both
computed on a fixed set of batches, under any `tf.distribute` strategy, and
without ever touching the model's variables (every loss is a
`model.stateless_call` on tensors, as in `sam.sam`):

* m-sharpness (Foret et al. 2021, Sec. 4.1 and App. C.3): the average over
  batches of size m of  max_{||eps|| <= rho} L_B(w + eps) - L_B(w),  the
  maximum estimated by SAM's own ascent step (`sam.sam.perturbation`) and,
  optionally, further projected normalized-gradient ascent steps. The
  estimate is the largest loss seen along the ascent path, so it is a lower
  bound of the true maximum that only grows with more steps. With several
  replicas the ascent gradient is summed across them first (m is the global
  batch), as in training with `config.sam.sync_perturbation=True`.
* The largest eigenvalue of the Hessian of the loss over all the batches,
  in `sam.hessian` (power iteration on Hessian-vector products).

The loss is the data loss (cross-entropy on the model's logits, no label
smoothing, no weight decay): runs trained with different regularizers are
measured on the same function. Evaluation is in inference mode, so batch-norm
layers use their moving statistics.

Datasets are distributed datasets of (images, labels, mask) per-replica
batches, as `analysis_dataset` builds them; padding examples have mask 0.
"""

from collections.abc import Callable, Sequence
from typing import Any

import keras
import ml_collections
import numpy as np
import tensorflow as tf

from sam import input_pipeline
from sam import sam as sam_lib

# Per-example loss from (labels, logits).
PerExampleLoss = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]
SPLITS = ('train', 'validation', 'test')


def cross_entropy(labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
  """The default per-example loss: softmax cross-entropy."""
  return tf.nn.sparse_softmax_cross_entropy_with_logits(
      labels, tf.cast(logits, tf.float32))


def analysis_dataset(data: input_pipeline.Data,
                     config: ml_collections.ConfigDict, split: str,
                     batch_size: int, num_batches: int,
                     input_context: tf.distribute.InputContext
                     ) -> tf.data.Dataset:
  """A fixed, finite set of batches of one split, for `dataset_fn`s.

  Args:
    data: the data set, loaded with the run's config (same normalization).
    config: the run's config (`seed` orders the training examples).
    split: 'train' (the first `num_batches` batches of the run's epoch-0
      order, without augmentation, with the run's labels, noisy if it
      trained on noisy labels), 'validation' or 'test' (in order, the last
      batch padded and masked).
    batch_size: the global batch size; for m-sharpness, m.
    num_batches: how many global batches; -1 for one pass over the split.
    input_context: from `strategy.distribute_datasets_from_function`.

  Returns:
    Per-replica batches of (images, labels, mask).

  Raises:
    ValueError: for an unknown split, or 'validation' if the run held none
      out.
  """
  if split not in SPLITS:
    raise ValueError(f'split={split!r} is not one of {SPLITS}.')
  if split == 'validation' and data.validation is None:
    raise ValueError('There is no validation split: the run has '
                     'config.dataset.validation_size=0.')
  config = ml_collections.ConfigDict(config.to_dict())
  config.dataset.augment = 'none'  # Measure the data, not an augmentation.
  config.batch_size = config.eval_batch_size = batch_size
  if split == 'train':
    available = input_pipeline.steps_per_epoch(data, batch_size)
    ds = input_pipeline.train_dataset(data, config, input_context)
    ds = ds.map(lambda x, y, *_: (x, y, tf.ones_like(y, tf.float32)))
  else:
    available = input_pipeline.num_eval_steps(data, batch_size, split)
    ds = input_pipeline.eval_dataset(data, config, input_context, split)
  if num_batches == -1 or num_batches > available:
    num_batches = available
  # Each pipeline feeds its replicas consecutive per-replica batches.
  replicas_per_pipeline = (input_context.num_replicas_in_sync //
                           input_context.num_input_pipelines)
  return ds.take(num_batches * replicas_per_pipeline)


def replica_sum(value: Any) -> Any:
  """Sums a (nest of) tensor(s) over the replicas of the current context."""
  ctx = tf.distribute.get_replica_context()
  if ctx is None or ctx.num_replicas_in_sync == 1:
    return value
  return ctx.all_reduce(tf.distribute.ReduceOp.SUM, value)


def batch_loss_fn(model: keras.Model, batch: tuple[tf.Tensor, ...],
                  per_example_loss: PerExampleLoss = cross_entropy
                  ) -> Callable[[Sequence[tf.Tensor]], tf.Tensor]:
  """This replica's share of the mean loss over a global batch.

  Call in replica context. The share is the sum of the replica's masked
  per-example losses over the global (unmasked) example count, so that the
  shares of all replicas sum to the mean loss of the global batch.

  Args:
    model: the model; its trainable values are replaced by `params`, its
      non-trainable ones (batch-norm statistics) are read as they are.
    batch: (images, labels, mask).
    per_example_loss: loss from (labels, logits).
    preconditioner: P, or None for H itself.

  Returns:
    `loss_fn(params) -> loss`, a pure function of the trainable values.
  """
  images, labels, mask = batch
  state = [v.value for v in model.non_trainable_variables]
  count = replica_sum(tf.reduce_sum(mask))

  def loss_fn(params):
    logits, _ = model.stateless_call(list(params), state, images,
                                     training=False)
    losses = per_example_loss(labels, logits)
    return tf.reduce_sum(losses * mask) / tf.maximum(count, 1.0)

  return loss_fn


def value_and_grad(loss_fn, params):
  with tf.GradientTape(watch_accessed_variables=False) as tape:
    tape.watch(params)
    loss = loss_fn(params)
  grads = tape.gradient(loss, params,
                        unconnected_gradients=tf.UnconnectedGradients.ZERO)
  return loss, grads


def _project(eps: list[tf.Tensor], params: Sequence[tf.Tensor], rho: float,
             adaptive: bool, eta: float) -> list[tf.Tensor]:
  """Projects eps onto the ball ||eps|| <= rho (||eps / T|| for ASAM)."""
  scales = [tf.abs(p) + eta for p in params] if adaptive else None
  norm = tf.linalg.global_norm(
      [e / s for e, s in zip(eps, scales)] if adaptive else eps)
  factor = tf.minimum(1.0, rho / (norm + 1e-12))
  return [e * factor for e in eps]


def ascent_sharpness(loss_fn: Callable[[Sequence[tf.Tensor]], tf.Tensor],
                     params: Sequence[tf.Tensor], rho: float,
                     num_steps: int = 1, step_size: float | None = None,
                     adaptive: bool = False, eta: float = 0.0
                     ) -> tuple[tf.Tensor, tf.Tensor]:
  """max_{||eps|| <= rho} L(w + eps), estimated by gradient ascent.

  The first step is SAM's, eps = `sam.sam.perturbation(g, w, rho)`; each
  further step moves by `step_size` along the normalized gradient at w + eps
  (the same `perturbation`, with radius `step_size`) and projects back onto
  the ball. In replica context with several replicas, the gradients and
  losses are summed across replicas (the shares of one global batch).

  Args:
    loss_fn: `loss_fn(params) -> loss`, this replica's share of the loss.
    params: w.
    rho: the radius.
    num_steps: ascent steps; 1 is SAM's estimate.
    step_size: radius of each further step; default 2.5 rho / num_steps
      (the usual choice for projected ascent, Madry et al. 2018).
    adaptive: ASAM's ball, ||eps / (|w| + eta)|| <= rho.
    eta: ASAM's offset.

  Returns:
    (L(w), max over the ascent path of L(w + eps)), summed over replicas.
  """
  if num_steps < 1:
    raise ValueError(f'num_steps={num_steps} must be >= 1.')
  if step_size is None:
    step_size = 2.5 * rho / num_steps
  params = [tf.convert_to_tensor(p) for p in params]
  loss, grads = value_and_grad(loss_fn, params)
  loss, grads = replica_sum((loss, grads))
  eps, _ = sam_lib.perturbation(grads, params, rho, adaptive=adaptive,
                                eta=eta)
  best = tf.constant(-np.inf, loss.dtype)
  # A Python loop: num_steps is small, and unrolling keeps XLA-friendly
  # static shapes.
  for _ in range(num_steps - 1):
    perturbed = [p + e for p, e in zip(params, eps)]
    value, grads = value_and_grad(loss_fn, perturbed)
    value, grads = replica_sum((value, grads))
    best = tf.maximum(best, value)
    step, _ = sam_lib.perturbation(grads, params, step_size,
                                   adaptive=adaptive, eta=eta)
    eps = _project([e + s for e, s in zip(eps, step)], params, rho, adaptive,
                   eta)
  value = replica_sum(loss_fn([p + e for p, e in zip(params, eps)]))
  return loss, tf.maximum(best, value)


def trainable_values(model: keras.Model) -> list[tf.Tensor]:
  return [v.value for v in model.trainable_variables]


def m_sharpness(model: keras.Model,
                dataset: tf.distribute.DistributedDataset,
                strategy: tf.distribute.Strategy | None = None,
                rho: float = 0.05, num_steps: int = 1,
                step_size: float | None = None, adaptive: bool = False,
                eta: float = 0.0,
                per_example_loss: PerExampleLoss = cross_entropy
                ) -> dict[str, Any]:
  """The m-sharpness of the model's weights, m the global batch size.

  Args:
    model: the model, built under `strategy.scope()`.
    dataset: distributed (images, labels, mask) batches (`analysis_dataset`
      through `strategy.distribute_datasets_from_function`); each global
      batch gets its own worst-case eps.
    strategy: the strategy; the current one if None.
    rho: the radius.
    num_steps: ascent steps per batch; 1 is SAM's estimate.
    step_size: see `ascent_sharpness`.
    adaptive: measure in ASAM's scaled ball instead.
    eta: ASAM's offset.
    per_example_loss: loss from (labels, logits).

  Returns:
    A dict: `loss` (mean over examples), `perturbed_loss` (mean of the
    per-batch maxima), `sharpness` (their difference), `batch_sharpness`
    (per batch), `examples`, and the settings.
  """
  strategy = strategy or tf.distribute.get_strategy()

  def replica_fn(batch):
    loss, worst = ascent_sharpness(
        batch_loss_fn(model, batch, per_example_loss),
        trainable_values(model), rho, num_steps=num_steps,
        step_size=step_size, adaptive=adaptive, eta=eta)
    return tf.stack([loss, worst, replica_sum(tf.reduce_sum(batch[2]))])

  @tf.function
  def run():
    rows = tf.TensorArray(tf.float32, size=0, dynamic_size=True,
                          element_shape=[3])
    for batch in dataset:
      # Every replica holds the same (all-reduced) values: take the first.
      rows = rows.write(rows.size(), strategy.experimental_local_results(
          strategy.run(replica_fn, args=(batch,)))[0])
    return rows.stack()

  rows = run().numpy()
  if not len(rows):
    raise ValueError('The dataset has no batches.')
  rows = np.array(rows, np.float64)
  weights = rows[:, 2] / rows[:, 2].sum()
  loss, worst = float(rows[:, 0] @ weights), float(rows[:, 1] @ weights)
  return {'loss': loss, 'perturbed_loss': worst, 'sharpness': worst - loss,
          'batch_sharpness': (rows[:, 1] - rows[:, 0]).tolist(),
          'examples': int(rows[:, 2].sum()), 'rho': rho,
          'num_steps': num_steps, 'adaptive': adaptive,
          'num_batches': len(rows)}


def evaluate_params(model: keras.Model,
                    dataset: tf.distribute.DistributedDataset,
                    strategy: tf.distribute.Strategy | None = None,
                    per_example_loss: PerExampleLoss = cross_entropy
                    ) -> Callable[[Sequence[tf.Tensor]], tuple[float, float]]:
  """A compiled `evaluate(params) -> (loss, accuracy)` over `dataset`.

  For loss landscapes: `params` are trainable values to put in the model's
  place (the variables are not touched); non-trainable state is the
  model's, unless `evaluate(params, state)` passes other values.

  Args:
    model: the model, built under `strategy.scope()`.
    dataset: distributed (images, labels, mask) batches.
    strategy: the strategy; the current one if None.
    per_example_loss: loss from (labels, logits).

  Returns:
    `evaluate(params, state=None)`: mean loss and accuracy over all
    (unmasked) examples of the dataset.
  """
  strategy = strategy or tf.distribute.get_strategy()

  def replica_fn(batch, params, state):
    images, labels, mask = batch
    logits, _ = model.stateless_call(params, state, images, training=False)
    losses = per_example_loss(labels, logits)
    correct = tf.cast(tf.equal(
        tf.argmax(logits, -1, output_type=labels.dtype), labels), tf.float32)
    return tf.stack([tf.reduce_sum(losses * mask),
                     tf.reduce_sum(correct * mask), tf.reduce_sum(mask)])

  @tf.function
  def run(params, state):
    sums = tf.zeros([3])
    for batch in dataset:
      sums += strategy.reduce(
          tf.distribute.ReduceOp.SUM,
          strategy.run(replica_fn, args=(batch, params, state)), axis=None)
    return sums

  def evaluate(params, state=None):
    if state is None:
      state = [v.value for v in model.non_trainable_variables]
    # Tensors, not NumPy arrays: one trace for every point of a grid.
    loss, correct, count = run(
        [tf.convert_to_tensor(p) for p in params],
        [tf.convert_to_tensor(s) for s in state]).numpy()
    return float(loss / max(count, 1.0)), float(correct / max(count, 1.0))

  return evaluate
