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
from tests.conftest import grid
from tests.conftest import requires_xla_cpu

CLASSES, DIM, BATCH = 3, 5, 8
RHO = 0.5
NAMES = ['dense/kernel', 'dense/bias']  # The params' variable paths.

# The options every variant runs with: (sam_step's arguments, SAMModel's).
# ASAM's eta is 0.2, away from its default 0.01: an eta that does not reach
# the perturbation fails.
CASES = {
    'all params': ({'eta': 0.2}, {'eta': 0.2}),
    # Only the bias perturbed: a stand-in for SAM-ON's normalization params.
    'mask': ({'eta': 0.2, 'mask': [False, True]},
             {'eta': 0.2, 'perturb_only': 'bias$'}),
    # ASAM as its reference code: T = 1 on biases.
    'no adaptive biases': ({'eta': 0.2, 'adaptive_biases': False},
                           {'eta': 0.2, 'adaptive_biases': False}),
    # Two ascent steps, each from where the last ended (optax.contrib.sam).
    'two ascent steps': ({'eta': 0.2, 'ascent_steps': 2},
                         {'eta': 0.2, 'ascent_steps': 2}),
    # Gradient accumulation: each replica's shard as 2 micro-batches, one
    # eps for all; the same as SAM on the whole batch.
    'accumulation': ({'eta': 0.2, 'micro_batches': 2},
                     {'eta': 0.2, 'micro_batches': 2}),
}


STEPS, LR = 3, 0.5  # Each test takes STEPS steps of SGD, a batch each.


def _masked(g, options):
  mask = options.get('mask') or [True] * len(g)
  return [gi.astype(np.float64) * m for gi, m in zip(g, mask)]


def _norm(g):
  return np.sqrt(sum((gi**2).sum() for gi in g))


def _np_sam(g, w, rho, options, state):
  del w, options
  return [rho * gi / _norm(g) for gi in g], state


def _np_asam(g, w, rho, options, state):
  # Kwon et al.: eps = rho T^2 g / ||T g||, T = |w| + eta elementwise; the
  # bias keeps T = 1 with adaptive_biases=False (ASAM's reference code).
  t = [np.abs(wi) + options['eta'] for wi in w]
  if not options.get('adaptive_biases', True):
    t[1] = np.ones_like(t[1])
  norm = _norm([ti * gi for ti, gi in zip(t, g)])
  return [rho * ti**2 * gi / norm for ti, gi in zip(t, g)], state


def _np_fsam(g, w, rho, options, momentum):
  # Li et al. (nblt/F-SAM FriendlySAM.first_step, sigma 1, lambda 0.6): the
  # first step ascends along g and sets m = g; later ones along g - sigma m,
  # then m = lambda m + (1 - lambda) g.
  del w, options
  if momentum is None:
    d, momentum = g, g
  else:
    d = [gi - 1.0 * mi for gi, mi in zip(g, momentum)]
    momentum = [0.6 * mi + 0.4 * gi for gi, mi in zip(g, momentum)]
  return [rho * di / _norm(d) for di in d], momentum


def _np_esam(g, w, rho, options, state):
  # Du et al. (dydjw9/Efficient_SAM ESAM.first_step, beta 0.5): the kept
  # tensors' part of g over its own norm, times rho / beta; 0 if none kept.
  # The draw is the input: the code under test's, per step.
  del w
  keep = options['esam_keep']
  kept = [k * gi for k, gi in zip(keep, g)]
  norm = _norm(kept)
  return [rho / 0.5 * gi / norm if norm else gi for gi in kept], state


def _ascending(perturb):
  """The reference of a variant whose eps comes from gradients at w."""
  def reference(grad_at, w, rho, options, state):
    eps = [np.zeros_like(wi) for wi in w]
    for _ in range(options.get('ascent_steps', 1)):
      g = _masked(grad_at([wi + ei for wi, ei in zip(w, eps)]), options)
      step, state = perturb(g, w, rho, options, state)
      eps = [ei + si for ei, si in zip(eps, step)]
    return grad_at([wi + ei for wi, ei in zip(w, eps)]), state
  return reference


def _np_msam(grad_at, w, rho, options, velocity):
  # Becker et al. (MarlonBecker/MSAM optimizer/msam.py): the gradient at
  # w - rho v / ||v|| (at w while v = 0), then v = 0.9 v + g.
  if velocity is None:
    velocity = [np.zeros_like(wi, np.float64) for wi in w]
  v = _masked(velocity, options)
  norm = _norm(v)
  eps = [-rho * vi / norm if norm else vi for vi in v]
  g = grad_at([wi + ei for wi, ei in zip(w, eps)])
  return g, [0.9 * vi + gi for vi, gi in zip(velocity, g)]


# name -> (grad_at, w, rho, options, state) -> (SAM gradient, state) in
# NumPy: grad_at(w) is the whole batch's gradient at w; state None at first.
NUMPY_REFERENCES = {'sam': _ascending(_np_sam), 'asam': _ascending(_np_asam),
                    'esam': _ascending(_np_esam),
                    'fsam': _ascending(_np_fsam), 'msam': _np_msam}


def _problem():
  rng = np.random.default_rng(7)
  xs = rng.normal(size=(STEPS, BATCH, DIM)).astype(np.float32)
  ys = rng.integers(0, CLASSES, (STEPS, BATCH))
  w = [rng.normal(size=(DIM, CLASSES)).astype(np.float32),
       rng.normal(size=(CLASSES,)).astype(np.float32)]
  return xs, ys, w


def _np_grad(x, y, w):
  """Gradient of the mean softmax cross-entropy of logits x W + b."""
  logits = x @ w[0] + w[1]
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  d = (p - np.eye(CLASSES)[y]) / len(y)
  return [x.T @ d, d.sum(0)]


def _np_run(name, xs, ys, w, options, xla=False):
  """STEPS steps of SGD at LR with the variant: [(w, gradient)] per step.

  ESAM's draws are those of `swp_keep`, compiled with XLA if `xla` (whose
  Philox gives other numbers than TensorFlow's kernel).
  """
  draw = tf.function(lambda seed: perturbations.swp_keep(seed, len(w), 0.5),
                     jit_compile=xla)
  steps, state = [], None
  for i, (x, y) in enumerate(zip(xs, ys)):
    g, state = NUMPY_REFERENCES[name](
        lambda at, x=x, y=y: _np_grad(x, y, at), w, RHO,
        dict(options, esam_keep=draw(_seed(i)).numpy()), state)
    steps.append((w, g))
    w = [wi - LR * gi for wi, gi in zip(w, g)]
  return steps


def _seed(step):
  """ESAM's seed at a step (SAMModel's: its esam_seed 0, the iteration)."""
  return np.array([0, step], np.int64)


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


def _refused(name, options):
  """Whether the variant refuses these options (one state for all)."""
  return perturbations.conflict(
      name, ascent_steps=options.get('ascent_steps', 1)) is not None


# The fast subset: one case per variant, each on 2 replicas with one of its
# options away from its default (the whole grid is in the slow set).
FAST_CASES = {'asam': 'no adaptive biases', 'esam': 'mask',
              'fsam': 'accumulation', 'msam': 'mask',
              'sam': 'two ascent steps'}


@pytest.mark.parametrize(*grid(
    {(name, 2, 'tf.function', case) for name, case in FAST_CASES.items()},
    name=sorted(perturbations.REGISTRY), num_replicas=[1, 2, 4],
    compile_with=['tf.function', pytest.param('xla', marks=requires_xla_cpu)],
    case=sorted(CASES)))
def test_variant_matches_numpy(mirrored, name, num_replicas, compile_with,
                               case):
  options, _ = CASES[case]
  xs, ys, w = _problem()
  strategy = mirrored(num_replicas)
  size = BATCH // num_replicas
  options = dict(options)
  parts = options.pop('micro_batches', 0)

  @tf.function(jit_compile=compile_with == 'xla')
  def replica_step(x, y, params, state, seed):
    loss_fn = [_loss_fn(a, b) for a, b in zip(
        tf.split(x, parts), tf.split(y, parts))] if parts else _loss_fn(x, y)
    out = sam.sam_step(loss_fn, params, rho=RHO, variant=name, names=NAMES,
                       state=state, esam_seed=seed, **options)
    return out.grads, out.state

  @tf.function
  def step(x, y, params, state, seed):
    shards = strategy.experimental_distribute_values_from_function(
        lambda ctx: (x[ctx.replica_id_in_sync_group * size:][:size],
                     y[ctx.replica_id_in_sync_group * size:][:size]))
    grads, state = strategy.run(replica_step,
                                args=(*shards, params, state, seed))
    return [strategy.reduce('SUM', g, axis=None) for g in grads], state

  if _refused(name, options):
    with pytest.raises(ValueError, match='keeps one state for all'):
      step(xs[0], ys[0], w, None, _seed(0))
    return
  want = _np_run(name, xs, ys, w, options, xla=compile_with == 'xla')
  state = None
  for i, (x, y, (at, ref)) in enumerate(zip(xs, ys, want)):
    got, state = step(x, y, [tf.constant(a, tf.float32) for a in at], state,
                      _seed(i))
    for got_g, ref_g in zip(got, ref):
      np.testing.assert_allclose(got_g, ref_g, rtol=1e-5, atol=1e-6)
  # The reference is no plain gradient: the perturbation mattered (at some
  # step: ESAM's draw may perturb nothing at one).
  assert any(np.abs(ref[0] - _np_grad(x, y, at)[0]).max() > 1e-4
             for x, y, (at, ref) in zip(xs, ys, want))


@pytest.mark.parametrize(*grid(
    {('sam', 2, 'accumulation'), ('asam', 1, 'no adaptive biases')},
    name=sorted(perturbations.REGISTRY), num_replicas=[1, 2],
    case=sorted(c for c in CASES if CASES[c][1])))
def test_variant_through_sam_model_matches_numpy(mirrored, name,
                                                 num_replicas, case):
  """STEPS `fit` steps of SAMModel(variant=name) with SGD."""
  options, model_options = CASES[case]
  xs, ys, w = _problem()
  with mirrored(num_replicas).scope():
    inner = keras.Sequential([keras.Input((DIM,)),
                              keras.layers.Dense(CLASSES, name='dense')])
    inner.set_weights(w)
    if _refused(name, options):
      with pytest.raises(ValueError, match='keeps one state for all'):
        SAMModel(inner, rho=RHO, variant=name, **model_options)
      return
    # The perturbation alone: ESAM's data selection (esam_gamma) is checked
    # against the custom loop in keras_test.
    model = SAMModel(inner, rho=RHO, variant=name, esam_gamma=1.0,
                     **model_options)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=LR),
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True))
  model.fit(xs.reshape(-1, DIM), ys.reshape(-1), batch_size=BATCH, epochs=1,
            shuffle=False, verbose=0)
  at, g = _np_run(name, xs, ys, w, options)[-1]
  want = [wi - LR * gi for wi, gi in zip(at, g)]
  for got, ref in zip(inner.get_weights(), want):
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


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
  xs, ys, w = _problem()
  x, y = xs[0], ys[0]
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
    eps, _ = _np_sam(g, w, RHO, {}, None)
    perturbed = _np_grad(x[half], y[half], [wi + e for wi, e in zip(w, eps)])
    want = [wi - gi / 2 for wi, gi in zip(want, perturbed)]
  for got, ref in zip(inner.get_weights(), want):
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_swp_keeps_each_tensor_with_probability_beta():
  keep = perturbations.swp_keep([3, 7], 4000, 0.3).numpy()
  assert set(np.unique(keep)) == {0.0, 1.0}
  assert abs(keep.mean() - 0.3) < 0.03  # 4 standard errors.
  # Another step, another draw; beta = 1 keeps every tensor.
  assert not np.array_equal(
      keep, perturbations.swp_keep([3, 8], 4000, 0.3).numpy())
  assert perturbations.swp_keep([3, 7], 50, 1.0).numpy().all()


def test_esam_without_a_seed_is_one_line():
  xs, ys, w = _problem()
  with pytest.raises(ValueError, match=r'needs a seed per step: '
                     r'sam_step\(esam_seed=\[seed, step\]\)'):
    sam.sam_step(_loss_fn(xs[0], ys[0]), w, rho=RHO, variant='esam')
