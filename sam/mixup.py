"""Mixup in the replica step (config.dataset.mixup_alpha).

Zhang et al., "mixup: Beyond Empirical Risk Minimization", ICLR 2018: train
on convex combinations of pairs of examples and of their one-hot labels.
As big_vision's `utils.mixup` by default (the ViT recipes' option): each
replica mixes its batch with the same batch rolled by one example, with one
weight lambda ~ Beta(alpha, alpha) per step for all replicas, the larger of
lambda and 1 - lambda (big_vision sorts its Dirichlet draw) so that each
example's own label dominates (train/accuracy counts it). Both SAM passes
see the same mixed batch. The weight is a function of (seed, step), so a
resumed run mixes as an uninterrupted one; which examples pair up depends
on how the batch is split over replicas.
"""

import tensorflow as tf

# Candidates of the gamma sampler's rejection step: each is accepted with
# probability over 0.95, so all 16 fail with probability under 1e-20.
_CANDIDATES = 16
# Added to the step in the seed: apart from the other draws seeded by
# (seed, step), ESAM's.
_SEED_OFFSET = 2**40


def _log_gamma(alpha: float, uniforms: tf.Tensor) -> tf.Tensor:
  """log of Gamma(alpha, 1) draws, one per row of `uniforms`.

  Marsaglia and Tsang's method ("A Simple Method for Generating Gamma
  Variables", ACM TOMS 2000) for shape alpha + 1 with a fixed number of
  candidates, then the boost G(alpha) = G(alpha + 1) U^(1/alpha), in logs
  (a small alpha's draws underflow float32). No loop and no
  tf.random.stateless_gamma, which XLA cannot compile.

  Args:
    alpha: the shape, > 0.
    uniforms: [n, 2 * _CANDIDATES + 1] uniform draws in [0, 1).
  """
  tiny = 1e-30
  normals = 2**0.5 * tf.math.erfinv(
      2 * uniforms[:, :_CANDIDATES] - 1)
  u = uniforms[:, _CANDIDATES:2 * _CANDIDATES]
  d = alpha + 1 - 1 / 3
  v = (1 + normals / (9 * d)**0.5)**3
  safe_v = tf.where(v > 0, v, tf.ones_like(v))
  accepted = (v > 0) & (tf.math.log(tf.maximum(u, tiny)) < 0.5 * normals**2 +
                        d - d * safe_v + d * tf.math.log(safe_v))
  first = tf.argmax(tf.cast(accepted, tf.int32), axis=1)
  log_v = tf.math.log(tf.gather(safe_v, first, axis=1, batch_dims=1))
  boost = tf.maximum(uniforms[:, -1], tiny)
  return tf.math.log(d) + log_v + tf.math.log(boost) / alpha


def draw_weight(alpha: float, seed: int, step: tf.Tensor) -> tf.Tensor:
  """lambda at `step`: Beta(alpha, alpha) folded to >= 1/2, a float32 scalar.

  Philox uniforms from (seed, step): XLA draws the same, and every replica
  the same.
  """
  uniforms = tf.random.stateless_uniform(
      [2, 2 * _CANDIDATES + 1],
      tf.stack([tf.constant(seed, tf.int64),
                tf.cast(step, tf.int64) + _SEED_OFFSET]), alg='philox')
  log_g = _log_gamma(alpha, uniforms)
  # Beta(a, a) = G1 / (G1 + G2) = sigmoid(log G1 - log G2).
  weight = tf.sigmoid(log_g[0] - log_g[1])
  return tf.maximum(weight, 1 - weight)


def mix(images: tf.Tensor, labels: tf.Tensor, num_classes: int,
        weight: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """(lambda x + (1 - lambda) roll(x), lambda y + (1 - lambda) roll(y)).

  Args:
    images: [b, ...] float images.
    labels: [b] integer labels; y are their one-hot vectors.
    num_classes: the number of classes.
    weight: lambda, a float32 scalar.

  Returns:
    The mixed images and float32 [b, num_classes] soft targets.
  """
  targets = tf.one_hot(labels, num_classes)
  mixed_targets = weight * targets + (1 - weight) * tf.roll(targets, 1, 0)
  image_weight = tf.cast(weight, images.dtype)
  mixed = image_weight * images + (1 - image_weight) * tf.roll(images, 1, 0)
  return mixed, mixed_targets
