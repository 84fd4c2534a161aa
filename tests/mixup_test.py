"""Mixup's batch: pairs of rolled examples, lambda from a folded Beta."""

import numpy as np
import pytest
import tensorflow as tf

from sam import mixup
from tests.conftest import requires_xla_cpu


def test_mix_is_a_convex_combination_with_the_rolled_batch():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(6, 4, 4, 3)).astype(np.float32)
  labels = np.array([0, 3, 5, 1, 2, 4])
  mixed, targets = mixup.mix(tf.constant(images), tf.constant(labels), 7,
                             tf.constant(0.7))
  want = np.zeros((6, 7))
  want[np.arange(6), labels] += 0.7
  want[np.arange(6), np.roll(labels, 1)] += 0.3
  np.testing.assert_allclose(targets, want, rtol=1e-6)
  np.testing.assert_allclose(
      mixed, 0.7 * images + 0.3 * np.roll(images, 1, 0), rtol=1e-5,
      atol=1e-6)


def _weights(alpha, steps, seed=7):
  """lambda at steps 0, 1, ...: one graph for all (a call a step took 43 s
  for 3,000 steps)."""
  draw = tf.function(lambda: tf.map_fn(
      lambda step: mixup.draw_weight(alpha, seed, step),
      tf.range(steps, dtype=tf.int64), fn_output_signature=tf.float32))
  return draw().numpy()


@pytest.mark.parametrize('alpha', [
    0.2, *(pytest.param(a, marks=pytest.mark.slow) for a in (0.05, 1.0, 4.0))])
def test_lambda_is_a_folded_beta_draw(alpha):
  """3,000 steps' lambdas against NumPy's Beta sampler: the mean and the
  fractions below its quartiles, within 4 standard errors."""
  got = _weights(alpha, 3000)
  beta = np.random.default_rng(0).beta(alpha, alpha, 10**6)
  folded = np.maximum(beta, 1 - beta)
  assert got.min() >= 0.5 and got.max() <= 1 and np.isfinite(got).all()
  assert abs(got.mean() - folded.mean()) < 4 * folded.std() / np.sqrt(3000)
  # (For a small alpha most draws are within float32's 6e-8 of 1.)
  for q in np.quantile(folded, [0.25, 0.5, 0.75]):
    if q > 0.999:
      continue
    p = np.mean(folded < q)
    assert abs(np.mean(got < q) - p) < 4 * np.sqrt(p * (1 - p) / 3000)


def test_lambda_is_a_function_of_seed_and_step():
  first, again = _weights(0.4, 5), _weights(0.4, 5)
  np.testing.assert_array_equal(first, again)
  assert len(set(first)) == 5
  assert not np.allclose(first, _weights(0.4, 5, seed=8))


@requires_xla_cpu
def test_xla_draws_the_same_lambda():
  def draw():
    return mixup.draw_weight(0.4, 3, tf.constant(5, tf.int64))
  np.testing.assert_allclose(tf.function(draw, jit_compile=True)(), draw(),
                             rtol=1e-5)
