"""The top eigenvalue of the Hessian of a model's loss, by power iteration.

Power iteration on Hessian-vector products (double backward, or
forward-over-backward with `tf.autodiff.ForwardAccumulator`) finds the
eigenvalue of largest magnitude; at a minimum that is the top one, the usual
measure of sharpness (Keskar et al. 2017). With a diagonal preconditioner P,
the top eigenvalue of P^-1 H (Adam's preconditioned sharpness, `sam.probe`).
The loss and the datasets are those of `sam.sharpness`.
"""

from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from sam import sharpness

HVP_METHODS = ('double_backward', 'forward_over_backward')


def hessian_vector_product(loss_fn: Callable[[Sequence[tf.Tensor]],
                                             tf.Tensor],
                           params: Sequence[tf.Tensor],
                           vector: Sequence[tf.Tensor],
                           method: str = 'double_backward'
                           ) -> list[tf.Tensor]:
  """H v, with H the Hessian of `loss_fn` at `params`.

  Args:
    loss_fn: `loss_fn(params) -> loss`, twice differentiable.
    params: where the Hessian is taken.
    vector: v, one tensor per param.
    method: 'double_backward' (the gradient of <grad L, v>; every op with a
      gradient has a second one in TF) or 'forward_over_backward' (the JVP
      of the gradient along v; cheaper, but needs forward-mode rules for the
      gradient ops).

  Returns:
    H v, one tensor per param.
  """
  params = [tf.convert_to_tensor(p) for p in params]
  vector = [tf.convert_to_tensor(v) for v in vector]
  zero = tf.UnconnectedGradients.ZERO
  if method == 'forward_over_backward':
    with tf.autodiff.ForwardAccumulator(params, vector) as acc:
      _, grads = sharpness.value_and_grad(loss_fn, params)
    return list(acc.jvp(grads, unconnected_gradients=zero))
  if method != 'double_backward':
    raise ValueError(f'method={method!r} is not one of {HVP_METHODS}.')
  with tf.GradientTape(watch_accessed_variables=False) as outer:
    outer.watch(params)
    _, grads = sharpness.value_and_grad(loss_fn, params)
    dot = tf.add_n([tf.reduce_sum(g * tf.stop_gradient(v))
                    for g, v in zip(grads, vector)])
  return outer.gradient(dot, params, unconnected_gradients=zero)


def top_hessian_eigenvalue(model: keras.Model,
                           dataset: tf.distribute.DistributedDataset,
                           strategy: tf.distribute.Strategy | None = None,
                           num_iterations: int = 20, tolerance: float = 1e-3,
                           method: str = 'double_backward', seed: int = 0,
                           per_example_loss: sharpness.PerExampleLoss = (
                               sharpness.cross_entropy),
                           preconditioner: Sequence[tf.Tensor] | None = None
                           ) -> dict[str, Any]:
  """The largest Hessian eigenvalue of the mean loss over `dataset`.

  Power iteration: v <- H v / ||H v||, with H v summed batch by batch (each
  batch weighted by its share of the examples), until the Rayleigh quotient
  v.Hv changes by less than `tolerance` relative to itself. With a
  `preconditioner` P (a positive diagonal, one tensor per variable), of
  P^-1 H instead, iterated as the symmetric P^-1/2 H P^-1/2 (the same
  eigenvalues).

  Args:
    model: the model, built under `strategy.scope()`.
    dataset: distributed (images, labels, mask) batches, read once per
      iteration: it must yield the same batches each time.
    strategy: the strategy; the current one if None.
    num_iterations: the most power iterations.
    tolerance: relative change of the estimate that stops the iteration.
    method: how to take H v, see `hessian_vector_product`.
    seed: of the random start vector.
    per_example_loss: loss from (labels, logits).

  Returns:
    A dict: `eigenvalue`, `history` (the estimate per iteration),
    `iterations`, `converged`, `examples`.
  """
  strategy = strategy or tf.distribute.get_strategy()
  if method not in HVP_METHODS:
    raise ValueError(f'method={method!r} is not one of {HVP_METHODS}.')
  variables = model.trainable_variables

  def replica_fn(batch, vector):
    loss_fn = sharpness.batch_loss_fn(model, batch, per_example_loss)
    hv = hessian_vector_product(loss_fn, sharpness.trainable_values(model),
                                vector, method=method)
    count = sharpness.replica_sum(tf.reduce_sum(batch[2]))
    # Weighted by the batch's examples, so the sum over batches divided by
    # all examples is H v of the mean loss over all of them.
    return [h * count for h in hv], count

  @tf.function
  def run(vector):
    # A tuple, not a list: tf.data would pack a list loop state into one
    # tensor.
    total = tuple(tf.zeros_like(v) for v in vector)
    examples = tf.constant(0.0)
    for batch in dataset:
      hv, count = strategy.run(replica_fn, args=(batch, vector))
      total = tuple(t + h for t, h in zip(
          total, strategy.reduce(tf.distribute.ReduceOp.SUM, hv, axis=None)))
      examples += strategy.experimental_local_results(count)[0]
    return [t / tf.maximum(examples, 1.0) for t in total], examples

  scale = [1.0] * len(variables) if preconditioner is None else [
      tf.math.rsqrt(tf.cast(p, v.dtype))
      for p, v in zip(preconditioner, variables)]
  examples = []

  def operator(vector):  # H, or P^-1/2 H P^-1/2.
    hv, count = run([s * v for s, v in zip(scale, vector)])
    examples.append(int(count))
    return [s * h for s, h in zip(scale, hv)]

  history, converged = _power_iteration(operator, variables, seed,
                                        num_iterations, tolerance)
  return {'eigenvalue': history[-1], 'history': history,
          'iterations': len(history), 'converged': converged,
          'examples': examples[-1], 'method': method}


def _power_iteration(operator, variables, seed: int, num_iterations: int,
                     tolerance: float) -> tuple[list[float], bool]:
  """The Rayleigh quotients of power iteration on a symmetric `operator`
  (per-variable tensors in and out) from a seeded random start, until one
  changes by less than `tolerance` relative to itself; and whether it did."""
  rng = np.random.default_rng(seed)
  vector = [tf.constant(rng.standard_normal(v.shape), v.dtype)
            for v in variables]
  norm = tf.linalg.global_norm(vector)
  vector = [v / norm for v in vector]
  history = []
  for _ in range(num_iterations):
    hv = operator(vector)
    eigenvalue = float(tf.add_n([tf.reduce_sum(v * h)
                                 for v, h in zip(vector, hv)]))
    norm = tf.linalg.global_norm(hv)
    vector = [h / (norm + 1e-30) for h in hv]
    converged = bool(history) and abs(eigenvalue - history[-1]) <= (
        tolerance * abs(eigenvalue))
    history.append(eigenvalue)
    if converged:
      return history, True
  return history, False
