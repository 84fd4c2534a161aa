"""LookSAM: SAM every k-th step, its sharpness direction reused in between.

Liu et al., "Towards Efficient and Scalable Sharpness-Aware Minimization",
CVPR 2022. `sam.step` keeps the direction of the last SAM step in a variable
and adds it back on the plain steps between (config.sam.looksam_alpha with
config.sam.every_k_steps).
"""

from collections.abc import Sequence

import tensorflow as tf

from sam import perturbations

_EPSILON = perturbations.EPSILON


def _dot(a: Sequence[tf.Tensor], b: Sequence[tf.Tensor]) -> tf.Tensor:
  """The inner product of two lists of tensors, over all entries."""
  return tf.add_n([tf.reduce_sum(x * y) for x, y in zip(a, b)])


def looksam_direction(
    clean: Sequence[tf.Tensor], sam_grads: Sequence[tf.Tensor]
) -> list[tf.Tensor]:
  """LookSAM's sharpness direction (Liu et al., CVPR 2022, eq. 5).

  The part of the SAM gradient g_s orthogonal to the clean gradient g, over
  all params jointly:

    g_v = g_s - (g.g_s / ||g||^2) g.

  Args:
    clean: g, per param (summed over replicas).
    sam_grads: g_s at the same step, per param (summed over replicas).

  Returns:
    g_v, per param.
  """
  coef = _dot(clean, sam_grads) / (_dot(clean, clean) + _EPSILON)
  return [s - coef * g for g, s in zip(clean, sam_grads)]


def looksam_reuse(
    grads: Sequence[tf.Tensor],
    direction: Sequence[tf.Tensor],
    alpha: float,
    clean_norm: tf.Tensor,
    share: float = 1.0,
) -> list[tf.Tensor]:
  """LookSAM's gradient on the steps between SAM steps (eq. 6).

    g_s ~ g + alpha * (||g|| / ||g_v||) g_v,

  with g_v from the last SAM step (`looksam_direction`). The added term is
  one vector for the whole batch, so each of R replicas adds `share` = 1/R
  of it to its own part of g (the optimizer sums the parts).

  Args:
    grads: this replica's part of g, per param.
    direction: g_v, per param.
    alpha: LookSAM's alpha (they use 0.7); 0 is the plain gradient.
    clean_norm: ||g|| of the gradient summed over all replicas.
    share: this replica's share of the added term.

  Returns:
    This replica's part of the approximate SAM gradient, per param.
  """
  scale = share * alpha * clean_norm / (
      tf.sqrt(_dot(direction, direction)) + _EPSILON)
  return [g + scale * v for g, v in zip(grads, direction)]
