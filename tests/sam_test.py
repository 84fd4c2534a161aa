"""SAM gradients against a NumPy reference, on 1, 2 and 4 replicas."""

import numpy as np
import pytest
import tensorflow as tf

from sam import looksam
from sam import sam

NUM_CLASSES = 3
DIM = 5
BATCH = 8


def _problem(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(BATCH, DIM)).astype(np.float32)
  y = rng.integers(0, NUM_CLASSES, BATCH)
  w = rng.normal(size=(DIM, NUM_CLASSES)).astype(np.float32)
  b = rng.normal(size=(NUM_CLASSES,)).astype(np.float32)
  return x, y, w, b


def _np_grad(x, y, w, b, global_batch):
  """Gradient of sum softmax-CE / global_batch for logits = x w + b."""
  logits = x @ w + b
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  d = (p - np.eye(NUM_CLASSES)[y]) / global_batch
  return [x.T @ d, d.sum(0)]


def _np_sam(x, y, w, b, rho, adaptive=False, eta=0.0):
  """Reference SAM gradient on the whole batch (one device)."""
  g = _np_grad(x, y, w, b, len(y))
  params = [w, b]
  if adaptive:
    t = [np.abs(p) + eta for p in params]
    norm = np.sqrt(sum(((ti * gi)**2).sum() for ti, gi in zip(t, g)))
    eps = [rho * ti**2 * gi / norm for ti, gi in zip(t, g)]
  else:
    norm = np.sqrt(sum((gi**2).sum() for gi in g))
    eps = [rho * gi / norm for gi in g]
  return _np_grad(x, y, w + eps[0], b + eps[1], len(y))


def _loss_fn(x, y, global_batch, calls=None):
  def loss_fn(params):
    if calls is not None:
      calls.append(1)
    w, b = params
    logits = tf.matmul(x, w) + b
    loss = tf.reduce_sum(
        tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
    return loss / global_batch, logits
  return loss_fn


@pytest.mark.parametrize('adaptive', [False, True])
def test_eager_matches_numpy(adaptive):
  x, y, w, b = _problem()
  loss, grads, logits, *_ = sam.sam_step(
      _loss_fn(x, y, BATCH), [tf.constant(w), tf.constant(b)], rho=0.5,
      adaptive=adaptive, eta=0.01)
  want = _np_sam(x, y, w, b, 0.5, adaptive=adaptive, eta=0.01)
  for got, ref in zip(grads, want):
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(logits, x @ w + b, rtol=1e-5, atol=1e-5)
  # The loss returned is the clean loss at w.
  np.testing.assert_allclose(
      loss, _loss_fn(x, y, BATCH)([w, b])[0], rtol=1e-6)


def test_sam_differs_from_plain_gradient():
  # Guards the reference itself: SAM must not be the plain gradient.
  x, y, w, b = _problem()
  plain = _np_grad(x, y, w, b, BATCH)
  sam_ref = _np_sam(x, y, w, b, 0.5)
  assert np.abs(plain[0] - sam_ref[0]).max() > 1e-3


def test_rho_zero_is_one_plain_pass():
  x, y, w, b = _problem()
  calls = []
  grads = sam.sam_step(
      _loss_fn(x, y, BATCH, calls), [tf.constant(w), tf.constant(b)],
      rho=0).grads
  assert len(calls) == 1
  for got, ref in zip(grads, _np_grad(x, y, w, b, BATCH)):
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)


def test_sam_step_reports_perturbed_loss_and_norm():
  x, y, w, b = _problem()
  out = sam.sam_step(_loss_fn(x, y, BATCH),
                     [tf.constant(w), tf.constant(b)], rho=0.5)
  g = _np_grad(x, y, w, b, BATCH)
  norm = np.sqrt(sum((gi**2).sum() for gi in g))
  np.testing.assert_allclose(out.grad_norm, norm, rtol=1e-5)
  eps = [0.5 * gi / norm for gi in g]
  perturbed = _loss_fn(x, y, BATCH)([w + eps[0], b + eps[1]])[0]
  np.testing.assert_allclose(out.perturbed_loss, perturbed, rtol=1e-5)
  assert out.perturbed_loss > out.loss


def _float16_loss_fn(x, y, global_batch, tiny):
  """The loss of `_loss_fn`, times `tiny`, with float16 logits."""
  def loss_fn(params):
    w, b = (tf.cast(p, tf.float16) for p in params)
    logits = tf.cast(tf.matmul(tf.cast(x, tf.float16), w) + b, tf.float32)
    loss = tf.reduce_sum(
        tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
    return tiny * loss / global_batch, None
  return loss_fn


def test_loss_scale_keeps_float16_gradients_from_underflowing():
  x, y, w, b = _problem()
  # d loss / d logits is ~1e-9: below float16's smallest subnormal (6e-8).
  tiny = 1e-8
  params = [tf.constant(w), tf.constant(b)]
  want = [tiny * g for g in _np_sam(x, y, w, b, 0.5)]
  underflowed = sam.sam_step(_float16_loss_fn(x, y, BATCH, tiny), params, 0.5)
  assert not np.any(underflowed.grads[0])
  out = sam.sam_step(_float16_loss_fn(x, y, BATCH, tiny), params, 0.5,
                     loss_scale=tf.constant(2.0**24))
  # Unscaled grads and norm, in float32; float16 logits cost some digits.
  assert all(g.dtype == tf.float32 for g in out.grads)
  for got, ref in zip(out.grads, want):
    np.testing.assert_allclose(got, ref, rtol=0.02, atol=1e-3 * tiny)
  norm = np.sqrt(sum((gi**2).sum() for gi in _np_grad(x, y, w, b, BATCH)))
  np.testing.assert_allclose(out.grad_norm, tiny * norm, rtol=0.02)
  # An overflowing scale makes the grads non-finite (a step to skip).
  overflowed = sam.sam_step(_float16_loss_fn(x, y, BATCH, 1.0), params, 0.5,
                            loss_scale=tf.constant(2.0**60))
  assert not np.isfinite(overflowed.grad_norm)
  assert not all(np.isfinite(g).all() for g in overflowed.grads)


def _summed_sam_grads(strategy, x, y, w, b, **kwargs):
  """sam_step's gradients on each replica's shard, summed over replicas."""
  shards = _shards(strategy, x, y)

  @tf.function
  def run(shard):
    def replica_fn(shard):
      xs, ys = shard
      return sam.sam_step(_loss_fn(xs, ys, BATCH),
                          [tf.constant(w), tf.constant(b)], **kwargs).grads
    grads = strategy.run(replica_fn, args=(shard,))
    return [strategy.reduce('SUM', g, axis=None) for g in grads]

  return run(shards)


def _shards(strategy, x, y):
  """Consecutive equal shards of (x, y), one per replica."""
  size = len(x) // strategy.num_replicas_in_sync
  return strategy.experimental_distribute_values_from_function(
      lambda ctx: (x[ctx.replica_id_in_sync_group * size:][:size],
                   y[ctx.replica_id_in_sync_group * size:][:size]))


@pytest.mark.parametrize('num_replicas', [1, 2, 4])
@pytest.mark.parametrize('adaptive', [False, True])
def test_replicas_match_single_device(mirrored, num_replicas, adaptive):
  """Per-replica SAM grads, summed, equal SAM on the whole batch."""
  x, y, w, b = _problem()
  strategy = mirrored(num_replicas)
  shards = _shards(strategy, x, y)

  @tf.function
  def run(shard):
    def replica_fn(shard):
      xs, ys = shard
      out = sam.sam_step(
          _loss_fn(xs, ys, BATCH), [tf.constant(w), tf.constant(b)],
          rho=0.5, adaptive=adaptive, eta=0.01)
      return out.loss, out.grads
    loss, grads = strategy.run(replica_fn, args=(shard,))
    return (strategy.reduce('SUM', loss, axis=None),
            [strategy.reduce('SUM', g, axis=None) for g in grads])

  loss, grads = run(shards)
  want = _np_sam(x, y, w, b, 0.5, adaptive=adaptive, eta=0.01)
  for got, ref in zip(grads, want):
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      loss, _loss_fn(x, y, BATCH)([w, b])[0], rtol=1e-5)


def test_unsynced_perturbation_is_per_replica(mirrored):
  """sync_perturbation=False: each replica ascends its own gradient."""
  x, y, w, b = _problem()
  strategy = mirrored(2)
  half = BATCH // 2
  shards = _shards(strategy, x, y)

  @tf.function
  def run(shard):
    def replica_fn(shard):
      xs, ys = shard
      return sam.sam_step(
          _loss_fn(xs, ys, BATCH), [tf.constant(w), tf.constant(b)],
          rho=0.5, sync_perturbation=False).grads
    return strategy.run(replica_fn, args=(shard,))

  grads = run(shards)
  for r in range(2):
    xs, ys = x[r * half:][:half], y[r * half:][:half]
    g = _np_grad(xs, ys, w, b, BATCH)
    norm = np.sqrt(sum((gi**2).sum() for gi in g))
    want = _np_grad(xs, ys, w + 0.5 * g[0] / norm, b + 0.5 * g[1] / norm,
                    BATCH)
    local = [strategy.experimental_local_results(gi)[r] for gi in grads]
    for got, ref in zip(local, want):
      np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_works_under_tf_function_without_strategy():
  x, y, w, b = _problem()
  fn = tf.function(lambda w, b: sam.sam_step(
      _loss_fn(x, y, BATCH), [w, b], rho=0.5).grads)
  for got, ref in zip(fn(tf.constant(w), tf.constant(b)),
                      _np_sam(x, y, w, b, 0.5)):
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def _np_gsam(x, y, w, b, rho, alpha):
  f = _np_grad(x, y, w, b, len(y))
  h = _np_sam(x, y, w, b, rho)
  flat_f = np.concatenate([a.ravel() for a in f])
  flat_h = np.concatenate([a.ravel() for a in h])
  coef = flat_f @ flat_h / (flat_h @ flat_h)
  return [hi - alpha * (fi - coef * hi) for fi, hi in zip(f, h)]


@pytest.mark.parametrize('num_replicas', [1, 2])
def test_gsam_matches_numpy(mirrored, num_replicas):
  x, y, w, b = _problem()
  want = _np_gsam(x, y, w, b, 0.5, 0.3)
  grads = _summed_sam_grads(mirrored(num_replicas), x, y, w, b, rho=0.5,
                            gsam_alpha=0.3)
  for got, ref in zip(grads, want):
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
  # The reference is not plain SAM.
  assert np.abs(want[0] - _np_sam(x, y, w, b, 0.5)[0]).max() > 1e-4


def test_micro_batches_perturb_separately():
  x, y, w, b = _problem()
  fns = [_loss_fn(x[i:i + 4], y[i:i + 4], BATCH) for i in (0, 4)]
  out = sam.micro_batch_sam_step(fns, [tf.constant(w), tf.constant(b)],
                                 rho=0.5)
  want = [0, 0]
  for i in (0, 4):
    xs, ys = x[i:i + 4], y[i:i + 4]
    g = _np_grad(xs, ys, w, b, BATCH)
    norm = np.sqrt(sum((gi**2).sum() for gi in g))
    part = _np_grad(xs, ys, w + 0.5 * g[0] / norm, b + 0.5 * g[1] / norm,
                    BATCH)
    want = [a + p for a, p in zip(want, part)]
  for got, ref in zip(out.grads, want):
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out.loss, _loss_fn(x, y, BATCH)([w, b])[0],
                             rtol=1e-6)
  assert len(out.aux) == 2


def test_looksam_direction_and_reuse_match_numpy():
  """g_v is g_s minus its projection on g; the reuse rescales it to ||g||."""
  rng = np.random.default_rng(0)
  g = [rng.normal(size=(3, 2)), rng.normal(size=4)]
  g_s = [rng.normal(size=(3, 2)), rng.normal(size=4)]
  flat_g, flat_s = (np.concatenate([x.ravel() for x in t]) for t in (g, g_s))
  want = flat_s - flat_g.dot(flat_s) / flat_g.dot(flat_g) * flat_g
  direction = looksam.looksam_direction([tf.constant(x) for x in g],
                                    [tf.constant(x) for x in g_s])
  got = np.concatenate([d.numpy().ravel() for d in direction])
  np.testing.assert_allclose(got, want, rtol=1e-10)
  assert abs(got.dot(flat_g)) < 1e-10  # Orthogonal to g.
  # Two replicas, each adding half the term to its half of g.
  halves = [[tf.constant(x / 2) for x in g]] * 2
  norm = tf.constant(np.linalg.norm(flat_g))
  parts = [looksam.looksam_reuse(h, direction, 0.7, norm, share=0.5)
           for h in halves]
  total = np.concatenate([(a + b).numpy().ravel() for a, b in zip(*parts)])
  np.testing.assert_allclose(
      total, flat_g + 0.7 * np.linalg.norm(flat_g) / np.linalg.norm(want) *
      want, rtol=1e-10)


def _np_grouped_sam(x, y, w, b, rho, num_replicas, group_size):
  """SAM gradient with one eps per group of consecutive replicas' shards."""
  size = BATCH // num_replicas
  total = [np.zeros_like(w), np.zeros_like(b)]
  for start in range(0, BATCH, size * group_size):
    xs, ys = x[start:start + size * group_size], y[start:start + size *
                                                     group_size]
    g = _np_grad(xs, ys, w, b, BATCH)  # The group's part of the loss.
    norm = np.sqrt(sum((gi**2).sum() for gi in g))
    want = _np_grad(xs, ys, w + rho * g[0] / norm, b + rho * g[1] / norm,
                    BATCH)
    total = [t + v for t, v in zip(total, want)]
  return total


@pytest.mark.parametrize('group_size', [1, 2, 4])
def test_inner_groups_share_one_eps_each(mirrored, group_size):
  """inner_group_size: groups of consecutive replicas, one eps per group."""
  x, y, w, b = _problem()
  want = _np_grouped_sam(x, y, w, b, 0.5, 4, group_size)
  grads = _summed_sam_grads(mirrored(4), x, y, w, b, rho=0.5,
                            inner_group_size=group_size)
  for got, ref in zip(grads, want):
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
  if group_size < 4:  # Not the global-batch SAM.
    assert np.abs(want[0] - _np_sam(x, y, w, b, 0.5)[0]).max() > 1e-4
