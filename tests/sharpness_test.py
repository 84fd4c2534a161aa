"""Sharpness measures against closed forms (quadratics, linear losses)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from sam import hessian
from sam import input_pipeline
from sam import models
from sam import sharpness
from tests.conftest import grid
from tests.conftest import tiny_config

_DIM = 6
_EIGENVALUES = np.array([5.0, 2.0, 1.0, 0.5, 0.25, 0.1])


def _strategy(name, mirrored):
  return tf.distribute.get_strategy() if name == 'default' else mirrored(2)


def _linear_model(strategy, use_bias):
  with strategy.scope():
    keras.utils.set_random_seed(1)
    return keras.Sequential([keras.Input((_DIM,)),
                             keras.layers.Dense(1, use_bias=use_bias)])


def _dataset(strategy, x, batch_size, mask=None):
  """(x, labels, mask) in global batches, split over the replicas."""
  mask = np.ones(len(x), np.float32) if mask is None else mask
  ds = tf.data.Dataset.from_tensor_slices(
      (x.astype(np.float32), np.zeros(len(x), np.int32), mask))
  return strategy.experimental_distribute_dataset(ds.batch(batch_size))


def _features_with_spectrum(n, rng):
  """x with x^T x / n = R^T diag(_EIGENVALUES) R, R a random rotation."""
  q, _ = np.linalg.qr(rng.standard_normal((n, _DIM)))
  r, _ = np.linalg.qr(rng.standard_normal((_DIM, _DIM)))
  return q * np.sqrt(n * _EIGENVALUES) @ r


@pytest.mark.parametrize('method', hessian.HVP_METHODS)
def test_hessian_vector_product_of_a_quadratic(method):
  """L(w) = 0.5 w^T A w over two tensors: H v = A v."""
  rng = np.random.default_rng(0)
  b = rng.standard_normal((5, 5))
  a = (b @ b.T).astype(np.float32)
  w = rng.standard_normal(5).astype(np.float32)
  v = rng.standard_normal(5).astype(np.float32)

  def loss_fn(params):
    flat = tf.concat(params, 0)
    return 0.5 * tf.tensordot(flat, tf.linalg.matvec(a, flat), 1)

  hv = hessian.hessian_vector_product(loss_fn, [w[:2], w[2:]],
                                        [v[:2], v[2:]], method)
  np.testing.assert_allclose(np.concatenate(hv), a @ v, rtol=1e-5)


@pytest.mark.parametrize(*grid(
    {(m, s) for m, s in zip(hessian.HVP_METHODS, ['mirrored', 'default'])},
    method=hessian.HVP_METHODS, strategy_name=['default', 'mirrored']))
def test_top_eigenvalue_of_a_quadratic_loss(mirrored, strategy_name, method):
  """0.5 (x.w)^2 averaged over the data: H = x^T x / n, known spectrum.

  The last batch is padded with masked-out rows that would dominate the
  Hessian if they counted.
  """
  strategy = _strategy(strategy_name, mirrored)
  rng = np.random.default_rng(0)
  x = _features_with_spectrum(24, rng)
  x = np.concatenate([x, 100 * rng.standard_normal((8, _DIM))])
  mask = np.concatenate([np.ones(24), np.zeros(8)]).astype(np.float32)
  model = _linear_model(strategy, use_bias=False)
  result = hessian.top_hessian_eigenvalue(
      model, _dataset(strategy, x, 8, mask), strategy, num_iterations=60,
      tolerance=1e-7, method=method,
      per_example_loss=lambda y, logits: 0.5 * tf.square(logits[:, 0]))
  assert result['converged']
  assert result['examples'] == 24
  np.testing.assert_allclose(result['eigenvalue'], _EIGENVALUES[0],
                             rtol=1e-4)


@pytest.mark.parametrize('strategy_name', ['default', 'mirrored'])
def test_preconditioned_top_eigenvalue_of_a_quadratic_loss(mirrored,
                                                           strategy_name):
  """The top eigenvalue of P^-1 H against NumPy's, P a positive diagonal."""
  strategy = _strategy(strategy_name, mirrored)
  rng = np.random.default_rng(0)
  x = _features_with_spectrum(24, rng)
  p = rng.uniform(0.2, 3.0, (_DIM, 1)).astype(np.float32)
  model = _linear_model(strategy, use_bias=False)
  result = hessian.top_hessian_eigenvalue(
      model, _dataset(strategy, x, 8), strategy, num_iterations=200,
      tolerance=1e-8, preconditioner=[tf.constant(p)],
      per_example_loss=lambda y, logits: 0.5 * tf.square(logits[:, 0]))
  h = x.T @ x / len(x)
  want = np.linalg.eigvals(np.diag(1 / p[:, 0]) @ h).real.max()
  assert result['converged']
  np.testing.assert_allclose(result['eigenvalue'], want, rtol=1e-4)
  assert abs(want - _EIGENVALUES[0]) > 0.1  # P changed the answer.


@pytest.mark.parametrize(*grid(
    {(False, 1, 'mirrored'), (True, 3, 'default')}, adaptive=[False, True],
    num_steps=[1, 3], strategy_name=['default', 'mirrored']))
def test_sharpness_of_a_linear_loss(mirrored, strategy_name, num_steps,
                                    adaptive):
  """L_B(w) = mean_B(x).kernel + bias: the max increase is rho ||a_B||.

  a_B = (mean_B(x), 1) is the gradient; in ASAM's ball ||eps / T|| <= rho
  it is rho ||T a_B||. SAM's single step attains it; more steps stay there.
  """
  strategy = _strategy(strategy_name, mirrored)
  rho, eta = 0.3, 0.01
  rng = np.random.default_rng(0)
  x = rng.standard_normal((24, _DIM)) + 0.5
  model = _linear_model(strategy, use_bias=True)
  result = sharpness.m_sharpness(
      model, _dataset(strategy, x, 8), strategy, rho=rho,
      num_steps=num_steps, adaptive=adaptive, eta=eta,
      per_example_loss=lambda y, logits: logits[:, 0])
  scale = np.concatenate([np.abs(v.numpy()).ravel() + eta
                          for v in model.trainable_variables])
  expected = []
  for batch in np.split(x, 3):
    a = np.concatenate([batch.mean(0), [1.0]])
    expected.append(rho * np.linalg.norm(scale * a if adaptive else a))
  np.testing.assert_allclose(result['batch_sharpness'], expected, rtol=1e-4)
  np.testing.assert_allclose(result['sharpness'], np.mean(expected),
                             rtol=1e-4)
  kernel, bias = (v.numpy() for v in model.trainable_variables)
  np.testing.assert_allclose(result['loss'], np.mean(x @ kernel + bias),
                             rtol=1e-5, atol=1e-6)


def test_more_ascent_steps_get_closer_to_the_true_maximum():
  """On a curved loss, projected ascent improves on SAM's one step."""
  rho = 0.5
  w = [tf.constant([1.0, 0.2])]

  def loss(v):
    return v[0] ** 2 + 10.0 * v[1] ** 2 + 3.0 * v[0] * v[1]

  def loss_fn(params):
    return loss(params[0])

  base, one = sharpness.ascent_sharpness(loss_fn, w, rho, num_steps=1)
  _, many = sharpness.ascent_sharpness(loss_fn, w, rho, num_steps=10)
  angles = np.linspace(0, 2 * np.pi, 100_000)
  circle = w[0].numpy()[:, None] + rho * np.stack([np.cos(angles),
                                                   np.sin(angles)])
  true_max = float(np.max(loss(circle)))
  assert float(base) == pytest.approx(float(loss(w[0])))
  assert float(one) < true_max - 1e-3
  assert float(one) < float(many) <= true_max + 1e-4
  assert float(many) == pytest.approx(true_max, rel=1e-3)


def test_measures_on_a_model_agree_across_replicas(mirrored):
  """The CNN on synthetic data: 1 and 2 replicas give the same numbers."""
  config = tiny_config()
  data = input_pipeline.load(config)
  results = []
  for strategy in (tf.distribute.get_strategy(), mirrored(2)):
    with strategy.scope():
      keras.utils.set_random_seed(0)
      model = models.get_model('cnn', data.num_classes, data.image_shape)
    dataset = strategy.distribute_datasets_from_function(
        lambda ctx: sharpness.analysis_dataset(data, config, 'test', 16, -1,
                                               ctx))
    sharp = sharpness.m_sharpness(model, dataset, strategy, rho=0.05,
                                  num_steps=2)
    top = hessian.top_hessian_eigenvalue(model, dataset, strategy,
                                         num_iterations=3)
    results.append((sharp, top))
    # The whole test split, the padding of its last batch masked out.
    assert sharp['examples'] == top['examples'] == 40
    assert sharp['num_batches'] == 3
    assert sharp['sharpness'] > 0
  (s1, h1), (s2, h2) = results
  np.testing.assert_allclose(s1['batch_sharpness'], s2['batch_sharpness'],
                             rtol=1e-4)
  np.testing.assert_allclose(h1['history'], h2['history'], rtol=1e-4)
