"""The conformance harness of the perturbation registry (sam.perturbations).

Every registered variant runs the whole SAM step (`sam_step(variant=...)`)
against a NumPy reference written here, independently of the code under
test: on 1, 2 and 4 replicas (the ascent gradient summed across replicas
before the perturbation: every replica shares one eps, as the SAM paper's
global-batch rule), under tf.function, compiled with XLA, and through
`sam.keras.SAMModel`'s `fit`. A variant registered without a reference here
fails the harness. Where the authors' code can be run, the variant is also
checked against the weights it gives (tools/golden), and SAM against
optax.contrib.sam.
"""

import dataclasses
import json
import os
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from sam import config_checks
from sam import input_pipeline
from sam import models
from sam import perturbations
from sam import sam
from sam.keras import SAMModel
from sam.trainer import Trainer
from tests.conftest import grid
from tests.conftest import requires_xla_cpu
from tests.conftest import ROOT
from tests.conftest import tiny_config

CLASSES, DIM, BATCH = 3, 5, 8
RHO = 0.5
NAMES = ['dense/kernel', 'dense/bias']  # The params' variable paths.

# Every variant runs with every registered option at its test value, away
# from its default (an option that never reaches eps fails), and the loop's
# inputs. The cases: (sam_step's arguments, SAMModel's) over those.
TEST_VALUES = {o.name: o.test_value for o in perturbations.all_options()}
CASES = {
    'all params': ({}, {}),
    # Only the bias perturbed: a stand-in for SAM-ON's normalization params.
    'mask': ({'mask': [False, True]}, {'perturb_only': 'bias$'}),
    # ASAM's T = |w| + eta on the bias too (the test value is False).
    'adaptive biases': ({'adaptive_biases': True}, {'adaptive_biases': True}),
    # Two ascent steps, each from where the last ended (optax.contrib.sam).
    'two ascent steps': ({'ascent_steps': 2}, {'ascent_steps': 2}),
    # Gradient accumulation: each replica's shard as 2 micro-batches, one
    # eps for all; the same as SAM on the whole batch.
    'accumulation': ({'micro_batches': 2}, {'micro_batches': 2}),
}


def _options(case):
  """sam_step's and SAMModel's options of a case."""
  options, model_options = CASES[case]
  return {**TEST_VALUES, **options}, {**TEST_VALUES, **model_options}


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
  if not options['adaptive_biases']:
    t[1] = np.ones_like(t[1])
  norm = _norm([ti * gi for ti, gi in zip(t, g)])
  return [rho * ti**2 * gi / norm for ti, gi in zip(t, g)], state


def _np_fsam(g, w, rho, options, momentum):
  # Li et al. (nblt/F-SAM FriendlySAM.first_step): the first step ascends
  # along g and sets m = g; later ones along g - sigma m, then
  # m = lambda m + (1 - lambda) g.
  del w
  sigma, lam = options['fsam_sigma'], options['fsam_lambda']
  if momentum is None:
    d, momentum = g, g
  else:
    d = [gi - sigma * mi for gi, mi in zip(g, momentum)]
    momentum = [lam * mi + (1 - lam) * gi for gi, mi in zip(g, momentum)]
  return [rho * di / _norm(d) for di in d], momentum


def _np_esam(g, w, rho, options, state):
  # Du et al. (dydjw9/Efficient_SAM ESAM.first_step): the kept tensors'
  # part of g over its own norm, times rho / beta; 0 if none kept. The draw
  # is the input: the code under test's, per step.
  del w
  keep = options['esam_keep']
  kept = [k * gi for k, gi in zip(keep, g)]
  norm = _norm(kept)
  return [rho / options['esam_beta'] * gi / norm if norm else gi
          for gi in kept], state


def _np_vasso(g, w, rho, options, average):
  # Li & Giannakis (BingcongLi/VaSSO VASSO.first_step): d = g at the first
  # step, then d = (1 - theta) d + theta g; eps = rho d / ||d||.
  del w
  theta = options['vasso_theta']
  average = g if average is None else [
      (1 - theta) * di + theta * gi for gi, di in zip(g, average)]
  return [rho * di / _norm(average) for di in average], average


def _np_fisher(g, w, rho, options, state):
  # Kim et al. 2022: eps = rho f^-1 g / sqrt(g^T f^-1 g), f = 1 + eta g^2
  # elementwise (the diagonal Fisher of the batch gradient).
  del w
  u = [gi / (1 + options['fisher_eta'] * gi**2) for gi in g]
  scale = rho / np.sqrt(sum((gi * ui).sum() for gi, ui in zip(g, u)))
  return [scale * ui for ui in u], state


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


def _np_wsam(grad_at, w, rho, options, state):
  # Yue et al. (pytorch_optimizer WSAM.second_step, decouple=False): SAM's
  # eps; the descent gradient a g~ + (1 - a) g, a = gamma / (1 - gamma).
  sam_gradient, state = _ascending(_np_sam)(grad_at, w, rho, options, state)
  a = options['wsam_gamma'] / (1 - options['wsam_gamma'])
  return [a * h + (1 - a) * g for h, g in zip(
      sam_gradient, _masked(grad_at(w), {}))], state


def _np_msam(grad_at, w, rho, options, velocity):
  # Becker et al. (MarlonBecker/MSAM optimizer/msam.py): the gradient at
  # w - rho v / ||v|| (at w while v = 0), then v = mu v + g.
  if velocity is None:
    velocity = [np.zeros_like(wi, np.float64) for wi in w]
  v = _masked(velocity, options)
  norm = _norm(v)
  eps = [-rho * vi / norm if norm else vi for vi in v]
  g = grad_at([wi + ei for wi, ei in zip(w, eps)])
  mu = options['msam_momentum']
  return g, [mu * vi + gi for vi, gi in zip(velocity, g)]


# name -> (grad_at, w, rho, options, state) -> (SAM gradient, state) in
# NumPy: grad_at(w) is the whole batch's gradient at w; state None at first.
NUMPY_REFERENCES = {'sam': _ascending(_np_sam), 'asam': _ascending(_np_asam),
                    'esam': _ascending(_np_esam),
                    'fisher': _ascending(_np_fisher),
                    'vasso': _ascending(_np_vasso), 'wsam': _np_wsam,
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
  if name == 'esam':
    draw = tf.function(lambda seed: perturbations.swp_keep(
        seed, len(w), options['esam_beta']), jit_compile=xla)
    options = dict(options, esam_keep=None)
  steps, state = [], None
  for i, (x, y) in enumerate(zip(xs, ys)):
    if name == 'esam':
      options['esam_keep'] = draw(_seed(i)).numpy()
    g, state = NUMPY_REFERENCES[name](
        lambda at, x=x, y=y: _np_grad(x, y, at), w, RHO, options, state)
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
  # Code to read, or why there is none.
  assert entry.reference.startswith(('github.com/', 'none: '))


def test_an_unknown_variant_is_one_line_naming_the_known_ones():
  with pytest.raises(ValueError, match=r"'samm' is not one of \['asam'"):
    perturbations.get('samm')


def _refused(name, options):
  """Whether the variant refuses these options (one state for all)."""
  return perturbations.conflict(
      name, ascent_steps=options.get('ascent_steps', 1)) is not None


# The fast subset: one case per variant, each on 2 replicas with one of its
# options away from its default (the rest of the grid is in the slow set).
FAST_CASES = {'asam': 'all params', 'esam': 'mask', 'fisher': 'all params',
              'fsam': 'accumulation', 'msam': 'mask',
              'sam': 'two ascent steps', 'vasso': 'mask',
              'wsam': 'accumulation'}


@pytest.mark.parametrize(*grid(
    {(name, 2, 'tf.function', case) for name, case in FAST_CASES.items()},
    name=sorted(perturbations.REGISTRY), num_replicas=[1, 2, 4],
    compile_with=['tf.function', pytest.param('xla', marks=requires_xla_cpu)],
    case=sorted(CASES)))
def test_variant_matches_numpy(mirrored, name, num_replicas, compile_with,
                               case):
  options, _ = _options(case)
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
    {('sam', 2, 'accumulation'), ('asam', 1, 'all params')},
    name=sorted(perturbations.REGISTRY), num_replicas=[1, 2],
    case=sorted(CASES)))
def test_variant_through_sam_model_matches_numpy(mirrored, name,
                                                 num_replicas, case):
  """STEPS `fit` steps of SAMModel(variant=name) with SGD."""
  options, model_options = _options(case)
  xs, ys, w = _problem()
  with mirrored(num_replicas).scope():
    inner = keras.Sequential([keras.Input((DIM,)),
                              keras.layers.Dense(CLASSES, name='dense')])
    inner.set_weights(w)
    if _refused(name, options):
      with pytest.raises(ValueError, match='keeps one state for all'):
        SAMModel(inner, rho=RHO, variant=name, **dict(model_options,
                                                      esam_gamma=1.0))
      return
    # The perturbation alone: ESAM's data selection (esam_gamma) is checked
    # against the custom loop in keras_test.
    model = SAMModel(inner, rho=RHO, variant=name,
                     **dict(model_options, esam_gamma=1.0))
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


# Who shares one eps, as groups of the batch's examples (in replica order):
# sam_step's arguments, the replicas and the groups. Fisher SAM's eps
# depends on the size of g (f = 1 + eta g^2), so each case fails unless the
# perturbation receives the mean gradient of its group (the module's
# contract), not the group's share of the global loss.
CONTRACT_CASES = {
    'each replica its own': ({'sync_perturbation': False}, 2, 2),
    'groups of replicas': ({'inner_group_size': 2}, 4, 2),
    'micro-batches': ({'micro_batches': 2}, 2, 4),
    'loss scale': ({'loss_scale': 2.0**10}, 1, 1),
}


def _np_shared_by_groups(x, y, w, groups, options):
  """The SAM gradient when each of `groups` equal parts of the batch
  perturbs with its own mean gradient."""
  total = [np.zeros_like(wi, np.float64) for wi in w]
  for part_x, part_y in zip(np.split(x, groups), np.split(y, groups)):
    eps, _ = _np_fisher(_np_grad(part_x, part_y, w), w, RHO, options, None)
    moved = _np_grad(part_x, part_y, [wi + e for wi, e in zip(w, eps)])
    total = [t + m / groups for t, m in zip(total, moved)]
  return total


@pytest.mark.parametrize('case', sorted(CONTRACT_CASES))
def test_perturbations_receive_the_mean_gradient_of_who_shares_eps(
    mirrored, case):
  arguments, num_replicas, groups = CONTRACT_CASES[case]
  arguments = dict(arguments)
  xs, ys, w = _problem()
  x, y = xs[0], ys[0]
  size = BATCH // num_replicas
  strategy = mirrored(num_replicas)
  micro = arguments.pop('micro_batches', 0)
  if 'loss_scale' in arguments:
    arguments['loss_scale'] = tf.constant(arguments['loss_scale'])

  def replica_step(x, y, params):
    if micro:
      return sam.micro_batch_sam_step(
          [_loss_fn(a, b) for a, b in zip(tf.split(x, micro),
                                          tf.split(y, micro))],
          params, RHO, variant='fisher', **TEST_VALUES).grads
    return sam.sam_step(_loss_fn(x, y), params, RHO, variant='fisher',
                        **TEST_VALUES, **arguments).grads

  @tf.function
  def step(x, y, params):
    shards = strategy.experimental_distribute_values_from_function(
        lambda ctx: (x[ctx.replica_id_in_sync_group * size:][:size],
                     y[ctx.replica_id_in_sync_group * size:][:size]))
    grads = strategy.run(replica_step, args=(*shards, params))
    return [strategy.reduce('SUM', g, axis=None) for g in grads]

  got = step(x, y, [tf.constant(wi) for wi in w])
  want = _np_shared_by_groups(x, y, w, groups, TEST_VALUES)
  for got_g, want_g in zip(got, want):
    np.testing.assert_allclose(got_g, want_g, rtol=1e-5, atol=1e-6)


def test_sam_model_under_loss_scaling_perturbs_with_the_unscaled_gradient():
  xs, ys, w = _problem()
  inner = keras.Sequential([keras.Input((DIM,)),
                            keras.layers.Dense(CLASSES, name='dense')])
  inner.set_weights(w)
  model = SAMModel(inner, rho=RHO, variant='fisher', **TEST_VALUES)
  model.compile(optimizer=keras.optimizers.LossScaleOptimizer(
      keras.optimizers.SGD(learning_rate=LR), initial_scale=2.0**10),
                loss=keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True))
  model.fit(xs.reshape(-1, DIM), ys.reshape(-1), batch_size=BATCH, epochs=1,
            shuffle=False, verbose=0)
  at, g = _np_run('fisher', xs, ys, w, TEST_VALUES)[-1]
  for got, ref in zip(inner.get_weights(),
                      [wi - LR * gi for wi, gi in zip(at, g)]):
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


@pytest.fixture(name='seen_options')
def seen_options_fixture(monkeypatch):
  """The options SAM's perturbation is called with (at trace time)."""
  seen = []
  entry = perturbations.get('sam')

  def spy(grads, params, rho, options, state):
    seen.append(dict(options))
    return entry.perturb(grads, params, rho, options, state)

  monkeypatch.setitem(perturbations.REGISTRY, 'sam',
                      dataclasses.replace(entry, perturb=spy))
  return seen


def _assert_every_option_reached(seen):
  assert seen
  for options in seen:
    assert {name: options[name] for name in TEST_VALUES} == TEST_VALUES


def test_every_option_reaches_the_perturbation_from_the_config(seen_options):
  # The config main.py runs, every option at its test value: what the
  # custom loop (sam/step.py) hands to the perturbation.
  config = tiny_config(**{f'sam.{name}': value
                          for name, value in TEST_VALUES.items()})
  config_checks.validate_config(config, 1)
  data = input_pipeline.load(config)
  strategy = tf.distribute.get_strategy()
  trainer = Trainer(config, strategy, data.num_classes, data.image_shape,
                    input_pipeline.steps_per_epoch(data, config.batch_size), 1)
  trainer.train_loop(iter(strategy.distribute_datasets_from_function(
      lambda ctx: input_pipeline.train_dataset(data, config, ctx))),
                     tf.constant(1))
  _assert_every_option_reached(seen_options)


def test_every_option_reaches_the_perturbation_from_sam_model(seen_options):
  xs, ys, w = _problem()
  inner = keras.Sequential([keras.Input((DIM,)),
                            keras.layers.Dense(CLASSES, name='dense')])
  model = SAMModel(inner, rho=RHO, **TEST_VALUES)
  model.compile(optimizer='sgd', loss=keras.losses.
                SparseCategoricalCrossentropy(from_logits=True))
  model.fit(xs[0], ys[0], batch_size=BATCH, verbose=0)
  _assert_every_option_reached(seen_options)
  # And its config, for a saved model.
  assert {name: model.get_config()[name] for name in TEST_VALUES} == (
      TEST_VALUES)


def test_sam_step_names_an_unknown_option():
  xs, ys, w = _problem()
  with pytest.raises(TypeError, match=r"\['fsam_sigmaa'\] is no option"):
    sam.sam_step(_loss_fn(xs[0], ys[0]), w, rho=RHO, fsam_sigmaa=2.0)


def test_every_variant_is_described_from_its_registration():
  """`python -m sam.perturbations` lists every variant and option (the
  docs' full list); each row of docs/configs.md that names a variant is a
  registered one and names all its options."""
  text = perturbations.describe()
  for name, entry in perturbations.REGISTRY.items():
    assert f"## `sam.variant='{name}'`" in text
    assert entry.reference in text
    for option in entry.options:
      assert f'- `sam.{option.name}` (default {option.default!r})' in text
  with open(os.path.join(ROOT, 'docs', 'configs.md')) as f:
    rows = [line for line in f if line.lstrip().startswith('| `sam.')]
  named = [re.findall(r"`sam\.variant='(\w+)'`", r) for r in rows]
  assert sum(map(len, named)) >= 5
  for row, names in zip(rows, named):
    first_cell = re.split(r'(?<!\\)\|', row)[1]
    for name in names:
      for option in perturbations.get(name).options:
        assert f'`sam.{option.name}`' in first_cell, (name, option.name)


@pytest.mark.parametrize(*grid({(2, 2)}, num_replicas=[1, 2],
                               ascent_steps=[1, 2]))
def test_sam_matches_optax_contrib_sam(mirrored, num_replicas, ascent_steps):
  """SAM against Google DeepMind's own SAM in JAX (optax.contrib.sam: its
  opaque mode is one whole step, sync_period - 1 ascent steps, each along
  the normalized gradient where the last ended)."""
  jax = pytest.importorskip('jax')
  optax = pytest.importorskip('optax')
  xs, ys, w = _problem()

  def loss(params, x, y):
    logits = x @ params[0] + params[1]
    return -jax.numpy.mean(jax.nn.log_softmax(logits)[
        jax.numpy.arange(len(y)), y])

  sam_opt = optax.contrib.sam(
      optax.sgd(LR), optax.chain(optax.contrib.normalize(), optax.sgd(RHO)),
      sync_period=ascent_steps + 1, opaque_mode=True)
  params = [jax.numpy.asarray(wi) for wi in w]
  opt_state = sam_opt.init(params)
  for x, y in zip(xs, ys):
    grad_fn = jax.grad(lambda p, _, x=x, y=y: loss(p, x, y))
    updates, opt_state = sam_opt.update(grad_fn(params, 0), opt_state,
                                        params, grad_fn=grad_fn)
    params = optax.apply_updates(params, updates)
  want = [np.asarray(p) for p in params]

  with mirrored(num_replicas).scope():
    inner = keras.Sequential([keras.Input((DIM,)),
                              keras.layers.Dense(CLASSES, name='dense')])
    inner.set_weights(w)
    model = SAMModel(inner, rho=RHO, ascent_steps=ascent_steps)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=LR),
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True))
  model.fit(xs.reshape(-1, DIM), ys.reshape(-1), batch_size=BATCH, epochs=1,
            shuffle=False, verbose=0)
  for got, ref in zip(inner.get_weights(), want):
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


GOLDEN = os.path.join(ROOT, 'tools', 'golden')


@pytest.mark.parametrize(*grid(
    {('asam', 2), ('vasso', 2)},
    name=sorted(f[:-5] for f in os.listdir(GOLDEN)
                if f.endswith('.json') and f != 'esam.json'),
    num_replicas=[1, 2, 4]))
def test_variant_matches_the_authors_code(mirrored, name, num_replicas):
  """Our steps against the weights the authors' own PyTorch code gives on
  the harness's problem (tools/golden: its README names each repository
  and commit, and the command that regenerates the files)."""
  with open(os.path.join(GOLDEN, f'{name}.json')) as f:
    golden = json.load(f)
  xs = np.array(golden['xs'], np.float32)
  ys = np.array(golden['ys'])
  size = BATCH // num_replicas
  strategy = mirrored(num_replicas)

  def replica_step(x, y, params, state):
    out = sam.sam_step(_loss_fn(x, y), params, rho=golden['rho'],
                       variant=golden['variant'], names=NAMES, state=state,
                       **golden['options'])
    return out.grads, out.state

  @tf.function
  def step(x, y, params, state):
    shards = strategy.experimental_distribute_values_from_function(
        lambda ctx: (x[ctx.replica_id_in_sync_group * size:][:size],
                     y[ctx.replica_id_in_sync_group * size:][:size]))
    grads, state = strategy.run(replica_step, args=(*shards, params, state))
    return [strategy.reduce('SUM', g, axis=None) for g in grads], state

  w = [tf.constant(wi, tf.float32) for wi in golden['weights0']]
  # Their base SGD: v = mu v + g, w -= lr v (plain SGD for mu = 0).
  velocity = [tf.zeros_like(wi) for wi in w]
  state = None
  for x, y, want in zip(xs, ys, golden['weights']):
    grads, state = step(x, y, w, state)
    velocity = [golden['base_momentum'] * v + g
                for v, g in zip(velocity, grads)]
    w = [wi - golden['learning_rate'] * v for wi, v in zip(w, velocity)]
    for got, ref in zip(w, want):
      np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_esam_matches_the_authors_code():
  """ESAM, its data selection included, against dydjw9/Efficient_SAM's
  ESAM.step (tools/golden/esam.json: beta 1, and 3 of 8 examples kept, as
  their gamma 0.5 keeps): SAMModel's steps on one replica (their selection
  is per process, ours per replica: one replica is the case both define
  alike)."""
  with open(os.path.join(GOLDEN, 'esam.json')) as f:
    golden = json.load(f)
  inner = keras.Sequential([keras.Input((DIM,)),
                            keras.layers.Dense(CLASSES, name='dense')])
  inner.set_weights([np.array(wi, np.float32) for wi in golden['weights0']])
  model = SAMModel(inner, rho=golden['rho'], variant='esam',
                   **golden['options'])
  model.compile(optimizer=keras.optimizers.SGD(golden['learning_rate']),
                loss=keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True))
  for x, y, want in zip(golden['xs'], golden['ys'], golden['weights']):
    model.train_on_batch(np.array(x, np.float32), np.array(y))
    for got, ref in zip(inner.get_weights(), want):
      np.testing.assert_allclose(got, ref, rtol=0, atol=1.2e-7)
