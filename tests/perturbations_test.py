"""The conformance harness of the perturbation registry (sam.perturbations).

Every registered variant runs the whole SAM step (`sam_step(variant=...)`)
against a NumPy reference written here, independently of the code under
test: on 1, 2 and 4 replicas (the ascent gradient summed across replicas
before the perturbation: every replica shares one eps, as the SAM paper's
global-batch rule), under tf.function, compiled with XLA, and through
`sam.keras.SAMModel`'s `fit`. A variant registered without a reference here
fails the harness.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from sam import models
from sam import perturbations
from sam import sam
from sam.keras import SAMModel
from tests.conftest import requires_xla_cpu

CLASSES, DIM, BATCH = 3, 5, 8
RHO = 0.5
NAMES = ['dense/kernel', 'dense/bias']  # The params' variable paths.

# The options every variant runs with: (sam_step's arguments, SAMModel's).
CASES = {
    'all params': ({'eta': 0.01}, {'eta': 0.01}),
    # Only the bias perturbed: a stand-in for SAM-ON's normalization params.
    'mask': ({'eta': 0.01, 'mask': [False, True]},
             {'eta': 0.01, 'perturb_only': 'bias$'}),
    # ASAM as its reference code: T = 1 on biases.
    'no adaptive biases': ({'eta': 0.01, 'adaptive_biases': False},
                           {'eta': 0.01, 'adaptive_biases': False}),
    # Two ascent steps, each from where the last ended (optax.contrib.sam).
    'two ascent steps': ({'eta': 0.01, 'ascent_steps': 2},
                         {'eta': 0.01, 'ascent_steps': 2}),
    # Gradient accumulation: each replica's shard as 2 micro-batches, one
    # eps for all; the same as SAM on the whole batch (SAMModel: no such
    # option).
    'accumulation': ({'eta': 0.01, 'micro_batches': 2}, None),
}


def _masked(g, options):
  mask = options.get('mask') or [True] * len(g)
  return [gi.astype(np.float64) * m for gi, m in zip(g, mask)]


def _np_sam(g, w, rho, options):
  del w
  g = _masked(g, options)
  norm = np.sqrt(sum((gi**2).sum() for gi in g))
  return [rho * gi / norm for gi in g]


def _np_asam(g, w, rho, options):
  # Kwon et al.: eps = rho T^2 g / ||T g||, T = |w| + eta elementwise; the
  # bias keeps T = 1 with adaptive_biases=False (ASAM's reference code).
  g = _masked(g, options)
  t = [np.abs(wi) + options['eta'] for wi in w]
  if not options.get('adaptive_biases', True):
    t[1] = np.ones_like(t[1])
  norm = np.sqrt(sum(((ti * gi)**2).sum() for ti, gi in zip(t, g)))
  return [rho * ti**2 * gi / norm for ti, gi in zip(t, g)]


# name -> eps(g, w, rho, options) in NumPy, g the whole batch's gradient.
NUMPY_REFERENCES = {'sam': _np_sam, 'asam': _np_asam}


def _problem():
  rng = np.random.default_rng(7)
  x = rng.normal(size=(BATCH, DIM)).astype(np.float32)
  y = rng.integers(0, CLASSES, BATCH)
  w = [rng.normal(size=(DIM, CLASSES)).astype(np.float32),
       rng.normal(size=(CLASSES,)).astype(np.float32)]
  return x, y, w


def _np_grad(x, y, w):
  """Gradient of the mean softmax cross-entropy of logits x W + b."""
  logits = x @ w[0] + w[1]
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  d = (p - np.eye(CLASSES)[y]) / len(y)
  return [x.T @ d, d.sum(0)]


def _np_sam_gradient(name, x, y, w, options):
  eps = [np.zeros_like(wi) for wi in w]
  for _ in range(options.get('ascent_steps', 1)):
    at = [wi + ei for wi, ei in zip(w, eps)]
    step = NUMPY_REFERENCES[name](_np_grad(x, y, at), w, RHO, options)
    eps = [ei + si for ei, si in zip(eps, step)]
  return _np_grad(x, y, [wi + ei for wi, ei in zip(w, eps)])


def _loss_fn(x, y):
  def loss_fn(params):
    logits = tf.matmul(x, params[0]) + params[1]
    per_example = tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits)
    return tf.reduce_sum(per_example) / BATCH, logits
  return loss_fn


def test_every_registered_variant_has_a_numpy_reference():
  assert set(perturbations.REGISTRY) == set(NUMPY_REFERENCES)


@pytest.mark.parametrize('name', sorted(perturbations.REGISTRY))
def test_every_variant_cites_its_paper_and_reference_code(name):
  entry = perturbations.get(name)
  assert entry.paper and entry.deviations
  assert entry.reference.startswith('github.com/')


def test_an_unknown_variant_is_one_line_naming_the_known_ones():
  with pytest.raises(ValueError, match=r"'samm' is not one of \['asam'"):
    perturbations.get('samm')


@pytest.mark.parametrize('case', sorted(CASES))
@pytest.mark.parametrize('compile_with', [
    'tf.function', pytest.param('xla', marks=requires_xla_cpu)])
@pytest.mark.parametrize('num_replicas', [1, 2, 4])
@pytest.mark.parametrize('name', sorted(perturbations.REGISTRY))
def test_variant_matches_numpy(mirrored, name, num_replicas, compile_with,
                               case):
  options, _ = CASES[case]
  x, y, w = _problem()
  strategy = mirrored(num_replicas)
  size = BATCH // num_replicas
  shards = strategy.experimental_distribute_values_from_function(
      lambda ctx: (x[ctx.replica_id_in_sync_group * size:][:size],
                   y[ctx.replica_id_in_sync_group * size:][:size]))

  options = dict(options)
  parts = options.pop('micro_batches', 0)

  @tf.function(jit_compile=compile_with == 'xla')
  def replica_step(xs, ys):
    loss_fn = [_loss_fn(a, b) for a, b in zip(
        tf.split(xs, parts), tf.split(ys, parts))] if parts else _loss_fn(
            xs, ys)
    out = sam.sam_step(loss_fn, [tf.constant(v) for v in w], rho=RHO,
                       variant=name, names=NAMES, **options)
    return out.grads

  @tf.function
  def step(shards):
    grads = strategy.run(replica_step, args=shards)
    return [strategy.reduce('SUM', g, axis=None) for g in grads]

  want = _np_sam_gradient(name, x, y, w, options)
  for got, ref in zip(step(shards), want):
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
  # The reference is no plain gradient: the perturbation mattered.
  assert np.abs(want[0] - _np_grad(x, y, w)[0]).max() > 1e-4


@pytest.mark.parametrize('case', sorted(c for c in CASES if CASES[c][1]))
@pytest.mark.parametrize('num_replicas', [1, 2])
@pytest.mark.parametrize('name', sorted(perturbations.REGISTRY))
def test_variant_through_sam_model_matches_numpy(mirrored, name,
                                                 num_replicas, case):
  """One `fit` step of SAMModel(variant=name) with SGD at learning rate 1."""
  options, model_options = CASES[case]
  x, y, w = _problem()
  with mirrored(num_replicas).scope():
    inner = keras.Sequential([keras.Input((DIM,)),
                              keras.layers.Dense(CLASSES, name='dense')])
    inner.set_weights(w)
    model = SAMModel(inner, rho=RHO, variant=name, **model_options)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=1.0),
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True))
  model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
  want = [wi - gi
          for wi, gi in zip(w, _np_sam_gradient(name, x, y, w, options))]
  for got, ref in zip(inner.get_weights(), want):
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_parameter_mask_by_layer_type_or_path():
  model = models.get_model('resnet20', 10, (32, 32, 3))
  paths = [v.path for v in model.trainable_variables]
  assert perturbations.parameter_mask(model, '') is None
  norm = perturbations.parameter_mask(model, 'normalization')
  # SAM-ON: exactly the batch-norm gammas and betas (19 layers).
  assert [p for p, m in zip(paths, norm) if m] == [
      p for p in paths if p.endswith(('/gamma', '/beta'))]
  assert sum(norm) == 2 * 19
  kernels = perturbations.parameter_mask(model, 'kernel$')
  assert [p for p, m in zip(paths, kernels) if m] == [
      p for p in paths if p.endswith('/kernel')]
  with pytest.raises(ValueError, match=r"perturb_only='dense' selects none "
                     r"of the 59 trainable variables .*'stem_conv/kernel'"):
    perturbations.parameter_mask(model, 'dense')
  with pytest.raises(ValueError, match="perturb_only='bn\\(' is no regular"):
    perturbations.parameter_mask(model, 'bn(')


def test_asam_without_adaptive_biases_needs_the_names():
  g = [tf.ones([2, 2]), tf.ones([2])]
  with pytest.raises(ValueError, match=r'needs the names'):
    sam.perturbation(g, g, 0.1, variant='asam', eta=0.01,
                     adaptive_biases=False)


def test_sam_model_shares_eps_within_inner_groups(mirrored):
  """SAMModel(inner_group_size=2) on 4 replicas: one eps per replica pair."""
  x, y, w = _problem()
  with mirrored(4).scope():
    inner = keras.Sequential([keras.Input((DIM,)),
                              keras.layers.Dense(CLASSES, name='dense')])
    inner.set_weights(w)
    model = SAMModel(inner, rho=RHO, inner_group_size=2)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=1.0),
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True))
  model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
  want = [wi.astype(np.float64) for wi in w]
  for half in (slice(0, BATCH // 2), slice(BATCH // 2, BATCH)):
    g = [gi / 2 for gi in _np_grad(x[half], y[half], w)]  # Its loss share.
    eps = _np_sam(g, w, RHO, {})
    perturbed = _np_grad(x[half], y[half], [wi + e for wi, e in zip(w, eps)])
    want = [wi - gi / 2 for wi, gi in zip(want, perturbed)]
  for got, ref in zip(inner.get_weights(), want):
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
