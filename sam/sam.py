"""Sharpness-Aware Minimization: the SAM gradient.

This is the module to read first and to fork. It holds one rule, used by the
training loop of this package and usable in any TensorFlow training step:

  g      = sum_r grad L_r(w)                  (ascent gradient, all replicas)
  eps    = rho * g / (||g|| + 1e-12)          (SAM)
  eps    = rho * T^2 g / (||T g|| + 1e-12)    (ASAM, T = |w| + eta)
  g_SAM  = grad L_r(w + eps)                  (per replica; the optimizer sums)

where L_r is replica r's share of the global-batch loss. The base optimizer
then updates w (never w + eps) with g_SAM. Everything is functional: the
weights are never perturbed in place, so no checkpoint, summary or evaluation
can ever see w + eps, and there is no `w + eps - eps != w` rounding to undo.

Variants: the perturbation by name (`variant`; `sam.perturbations` holds
them with their papers and reference code: SAM, ASAM), GSAM's descent
direction (`gsam_alpha`), m-sharpness per replica (`sync_perturbation=False`)
or per micro-batch (`micro_batch_sam_step`), and LookSAM's reuse of the
sharpness direction between SAM steps (`looksam_direction`, `looksam_reuse`).

Foret et al., "Sharpness-Aware Minimization for Efficiently Improving
Generalization", ICLR 2021. Kwon et al., "ASAM: Adaptive Sharpness-Aware
Minimization for Scale-Invariant Learning of Deep Neural Networks", ICML 2021.
Liu et al., "Towards Efficient and Scalable Sharpness-Aware Minimization",
CVPR 2022 (LookSAM).
"""

from collections.abc import Callable, Sequence
import functools
from typing import Any, NamedTuple
import warnings

import tensorflow as tf

from sam import perturbations

_EPSILON = perturbations.EPSILON

LossFn = Callable[[list[tf.Tensor]], tuple[tf.Tensor, Any]]


class SAMOutput(NamedTuple):
  """Everything one SAM evaluation computes.

  Attributes:
    loss: the loss at `params` (the clean loss), as `loss_fn` returned it.
    grads: the gradients to hand to the optimizer: at `params + eps` if SAM is
      on, at `params` if `rho == 0`. Per replica, not summed across replicas.
    aux: the auxiliary output of `loss_fn` at `params` (first pass only).
    perturbed_loss: the loss at `params + eps` (equal to `loss` if rho == 0);
      `perturbed_loss - loss` estimates the sharpness.
    grad_norm: the norm of the ascent gradient that scaled eps (of `T g` for
      ASAM), over all params jointly; summed across replicas first unless
      `sync_perturbation=False`. Zero if rho == 0 (nothing was reduced).
    clean_grads: the gradients at `params` (the first pass), per replica.
  """
  loss: tf.Tensor
  grads: list[tf.Tensor]
  aux: Any
  perturbed_loss: tf.Tensor
  grad_norm: tf.Tensor
  clean_grads: list[tf.Tensor]


def _replica_context_to_sync() -> tf.distribute.ReplicaContext | None:
  """The replica context if the ascent gradient must be summed over it."""
  ctx = tf.distribute.get_replica_context()
  # Outside `strategy.run` under a non-default strategy the context is None
  # (cross-replica); with one replica a sum would be a needless no-op.
  if ctx is None or ctx.num_replicas_in_sync == 1:
    return None
  return ctx


def sync_model_state(values: Sequence[tf.Tensor]) -> list[tf.Tensor]:
  """The new model state of a replica step, made the same on every replica.

  Replicas saw different batches, so their float state (batch-norm moving
  statistics) is averaged across them; integer state (the seeds of dropout,
  ShakeDrop and Shake-Shake) advances identically everywhere by construction,
  and a mean would not be an integer. Call it in replica context on the
  `aux` state of `sam_step`'s first pass before assigning it: Keras 3
  variables have no aggregation, so an assign there writes only this
  replica's copy.

  Args:
    values: the new values of the model's non-trainable variables.

  Returns:
    The values to assign, identical on every replica.
  """
  values = list(values)
  ctx = tf.distribute.get_replica_context()
  floats = [i for i, v in enumerate(values) if v.dtype.is_floating]
  if ctx is None or ctx.num_replicas_in_sync == 1 or not floats:
    return values
  means = ctx.all_reduce(tf.distribute.ReduceOp.MEAN,
                         [values[i] for i in floats])
  for i, mean in zip(floats, means):
    values[i] = mean
  return values


def _value_and_grad(
    loss_fn: LossFn | Sequence[LossFn], params: Sequence[tf.Tensor],
    loss_scale: tf.Tensor | None = None,
) -> tuple[tf.Tensor, list[tf.Tensor], Any]:
  """The loss, its gradient and aux; summed over a sequence of loss_fns.

  A sequence is gradient accumulation: one micro-batch after the other
  (control dependencies order them, so that each one's activations can be
  freed before the next), the losses and gradients summed, the auxes listed.
  """
  if not callable(loss_fn):
    loss, grads, auxes = 0.0, [tf.zeros_like(p) for p in params], []
    for fn in loss_fn:
      with tf.control_dependencies(grads):
        one_loss, one_grads, aux = _value_and_grad(fn, params, loss_scale)
      loss += one_loss
      grads = [g + d for g, d in zip(grads, one_grads)]
      auxes.append(aux)
    return loss, grads, auxes
  with tf.GradientTape(watch_accessed_variables=False) as tape:
    tape.watch(params)
    loss, aux = loss_fn(list(params))
    scaled = loss if loss_scale is None else loss * loss_scale
  grads = tape.gradient(
      scaled, params, unconnected_gradients=tf.UnconnectedGradients.ZERO)
  if loss_scale is not None:
    grads = [g / loss_scale for g in grads]
  return loss, grads, aux


def perturbation(
    grads: Sequence[tf.Tensor],
    params: Sequence[tf.Tensor],
    rho: float | tf.Tensor,
    adaptive: bool = False,
    eta: float = 0.0,
    variant: str = 'sam',
    mask: Sequence[bool] | None = None,
    names: Sequence[str] | None = None,
    adaptive_biases: bool = True,
) -> tuple[list[tf.Tensor], tf.Tensor]:
  """The perturbation of a variant (`sam.perturbations`) for a gradient.

  Args:
    grads: the ascent gradient g, one tensor per param (already summed across
      replicas if the perturbation is to be shared).
    params: the params w (read by ASAM).
    rho: the neighbourhood radius.
    adaptive: ASAM; the same as variant='asam'.
    eta: ASAM's offset that keeps zero weights perturbable.
    variant: a name in `sam.perturbations.REGISTRY`: 'sam',
      eps = rho g / ||g||; 'asam', eps = rho T^2 g / ||T g||, T = |w| + eta.
    mask: which params are perturbed (`sam.perturbations.parameter_mask`);
      the others get eps = 0 and no part in the norm. None: all.
    names: the params' variable paths ('stem_bn/beta'), for variants that
      treat kinds of params differently.
    adaptive_biases: ASAM's T = |w| + eta on biases and normalization
      offsets too; False leaves T = 1 there, as ASAM's reference code does
      (needs `names`).

  Returns:
    (eps, norm): eps per param, and the norm that scaled it.
  """
  if mask is not None:
    grads = [g if m else tf.zeros_like(g) for g, m in zip(grads, mask)]
  options = {'eta': eta, 'names': names, 'adaptive_biases': adaptive_biases}
  return perturbations.get('asam' if adaptive else variant).perturb(
      grads, params, rho, options)


def surrogate_gap_guided(
    clean: Sequence[tf.Tensor],
    clean_total: Sequence[tf.Tensor],
    perturbed: Sequence[tf.Tensor],
    alpha: float,
    ctx: tf.distribute.ReplicaContext | None,
) -> list[tf.Tensor]:
  """GSAM's descent direction (Zhuang et al., ICLR 2022).

  With f = grad L(w) and h = grad L(w + eps) over the whole batch, the
  surrogate gap L(w + eps) - L(w) is reduced without raising L(w + eps) by
  adding the part of f orthogonal to h, ascending on it:

    f_perp = f - (f.h / ||h||^2) h,     d = h - alpha * f_perp.

  The rule is linear in (f, h) once the scalar f.h / ||h||^2 is known, so each
  replica applies it to its own parts (the optimizer sums them) with that
  scalar taken from the cross-replica totals.

  Args:
    clean: this replica's f, per param.
    clean_total: f summed over the replicas that share eps.
    perturbed: this replica's h, per param.
    alpha: GSAM's alpha; 0 is SAM.
    ctx: the replica context to sum h over, or None for a local rule.

  Returns:
    This replica's share of d, per param.
  """
  perturbed_total = perturbed
  if ctx is not None:
    perturbed_total = ctx.all_reduce(tf.distribute.ReduceOp.SUM, perturbed)
  dot = tf.add_n([tf.reduce_sum(f * h)
                  for f, h in zip(clean_total, perturbed_total)])
  coef = dot / (tf.add_n([tf.reduce_sum(tf.square(h))
                          for h in perturbed_total]) + _EPSILON)
  return [h - alpha * (f - coef * h) for f, h in zip(clean, perturbed)]


def sam_step(
    loss_fn: LossFn | Sequence[LossFn],
    params: Sequence[tf.Tensor],
    rho: float | tf.Tensor,
    adaptive: bool = False,
    sync_perturbation: bool = True,
    eta: float = 0.0,
    gsam_alpha: float = 0.0,
    loss_scale: tf.Tensor | None = None,
    inner_group_size: int = 0,
    ascent_steps: int = 1,
    **perturbation_args: Any,
) -> SAMOutput:
  """The SAM gradient: the gradient at params + eps, for any base optimizer.

  The one entry point of the SAM rule (the variants are its arguments). Call
  it where you would call `tape.gradient`: in a `strategy.run` replica
  function, under `tf.function`, or eagerly (a whole step: docs/api.md).

  Args:
    loss_fn: `loss_fn(params) -> (loss, aux)`, a pure function of `params`;
      under a strategy, `loss` is this replica's share of the global-batch
      loss (sum of per-example losses / global batch size). `aux` is anything
      (logits, new batch-norm statistics); only the first pass's is returned.
      A list, one per micro-batch, accumulates: each pass sums them one
      after the other, one eps for all; aux is then a list.
    params: the trainable values: tensors, not variables (nothing is assigned).
    rho: the neighbourhood radius; a Python 0 means the plain base optimizer
      (one forward/backward pass, no all-reduce). A tensor always runs SAM.
    adaptive: ASAM, eps = rho T^2 g / ||T g|| with T = |w| + eta.
    sync_perturbation: with several replicas, sum the ascent gradient across
      them before its norm: one eps for all (SAM on the global batch). False:
      each replica's own (m-sharpness, m the per-replica batch).
    eta: ASAM's offset (Kwon et al. use 0.01); ignored unless adaptive.
    gsam_alpha: GSAM (Zhuang et al. 2022): descend along
      h - alpha * f_perp instead of h (see `surrogate_gap_guided`); 0 is SAM.
    loss_scale: float16 loss scaling: each backward pass differentiates
      loss * loss_scale and divides its gradients by it at once (in float32),
      so the norm, eps and grads are unscaled; an overflow gives non-finite
      grads, for the caller to skip the step. None: no scaling.
    inner_group_size: with `sync_perturbation`, sum the ascent gradient
      over groups of this many consecutive replicas only, each group with
      its own eps (m-sharpness over groups, the SAM code's
      inner_group_size); 0: over all replicas.
    ascent_steps: n > 1 ascends n times, each step the perturbation of the
      gradient at the point reached, added up (as optax.contrib.sam with
      sync_period = n + 1): n + 1 passes.
    **perturbation_args: `variant` (the perturbation's name in
      `sam.perturbations.REGISTRY`), `mask`, `names`, `adaptive_biases`:
      see `perturbation`.

  Returns:
    A `SAMOutput`: the loss at params, the SAM gradients (per replica, for a
    Keras optimizer to sum across replicas), the first pass's aux, the
    perturbed loss, ||g|| and the clean gradients.
  """
  params = [tf.convert_to_tensor(p) for p in params]
  loss, grads, aux = _value_and_grad(loss_fn, params, loss_scale)
  if isinstance(rho, (int, float)) and rho == 0:
    # The plain base optimizer: one pass and no cross-replica traffic.
    return SAMOutput(loss, grads, aux, loss, tf.zeros([], loss.dtype), grads)

  ctx = _replica_context_to_sync() if sync_perturbation else None
  if gsam_alpha and inner_group_size:
    raise ValueError('GSAM over groups of replicas is not supported.')
  perturb = functools.partial(perturbation, params=params, rho=rho,
                              adaptive=adaptive, eta=eta, **perturbation_args)
  ascent = _ascent_sum(grads, ctx, inner_group_size)
  eps, norm = perturb(ascent)
  for _ in range(ascent_steps - 1):
    _, more, _ = _value_and_grad(loss_fn, _moved(params, eps), loss_scale)
    step, _ = perturb(_ascent_sum(more, ctx, inner_group_size))
    eps = [e + d for e, d in zip(eps, step)]
  perturbed_loss, sam_grads, _ = _value_and_grad(
      loss_fn, _moved(params, eps), loss_scale)
  if gsam_alpha:
    sam_grads = surrogate_gap_guided(grads, ascent, sam_grads, gsam_alpha,
                                     ctx)
  return SAMOutput(loss, sam_grads, aux, perturbed_loss, norm, grads)


def _moved(params: list[tf.Tensor], eps: list[tf.Tensor]) -> list[tf.Tensor]:
  # tf.stop_gradient: eps is a constant of the next pass (the paper drops
  # its second-order term), and w + eps is a new tensor, not a new variable.
  return [p + tf.stop_gradient(e) for p, e in zip(params, eps)]


def _ascent_sum(grads: list[tf.Tensor],
                ctx: tf.distribute.ReplicaContext | None,
                group_size: int) -> list[tf.Tensor]:
  """The ascent gradient: summed over all replicas, or over a replica group.

  A group is `group_size` consecutive replica ids. Each replica writes its
  gradient into its group's slot of a [num_groups, ...] tensor, and one
  all-reduce fills every slot with its group's sum.
  """
  if ctx is None:
    return grads
  if not group_size or group_size == ctx.num_replicas_in_sync:
    return ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)
  num_groups, ragged = divmod(ctx.num_replicas_in_sync, group_size)
  if ragged:
    raise ValueError(f'inner_group_size={group_size} does not divide the '
                     f'{ctx.num_replicas_in_sync} replicas.')
  slot = tf.one_hot(ctx.replica_id_in_sync_group // group_size, num_groups)
  spread = [tf.tensordot(tf.cast(slot, g.dtype), g, axes=0) for g in grads]
  totals = ctx.all_reduce(tf.distribute.ReduceOp.SUM, spread)
  return [tf.tensordot(tf.cast(slot, t.dtype), t, axes=1) for t in totals]


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


def micro_batch_sam_step(
    loss_fns: Sequence[LossFn],
    params: Sequence[tf.Tensor],
    rho: float | tf.Tensor,
    **kwargs,
) -> SAMOutput:
  """m-sharpness: one perturbation per micro-batch (SAM paper, section 4.1).

  Each `loss_fns[i]` is the loss of micro-batch i (its share of the
  global-batch loss, so the sum over micro-batches is the replica's loss).
  Micro-batch i ascends with its own gradient, eps_i = rho g_i / ||g_i||,
  and contributes grad L_i(w + eps_i); the results are summed. Smaller
  micro-batches measure (and minimize) a sharper, more local notion of
  sharpness; the paper finds m = 32..128 generalizes best.

  Args:
    loss_fns: one pure loss function of the params per micro-batch.
    params: the trainable values.
    rho: the neighbourhood radius.
    **kwargs: further `sam_step` arguments (adaptive, eta, gsam_alpha,
      loss_scale); sync_perturbation is False by definition.

  Returns:
    The summed loss, perturbed loss and gradients; the mean of the
    micro-batches' gradient norms; and the list of their auxes.
  """
  outs = [sam_step(fn, params, rho, sync_perturbation=False, **kwargs)
          for fn in loss_fns]
  return SAMOutput(
      loss=tf.add_n([o.loss for o in outs]),
      grads=[tf.add_n(g) for g in zip(*[o.grads for o in outs])],
      aux=[o.aux for o in outs],
      perturbed_loss=tf.add_n([o.perturbed_loss for o in outs]),
      grad_norm=tf.add_n([o.grad_norm for o in outs]) / len(outs),
      clean_grads=[tf.add_n(g) for g in zip(*[o.clean_grads for o in outs])])


def sam_gradients(
    loss_fn: LossFn,
    params: Sequence[tf.Tensor],
    rho: float | tf.Tensor,
    adaptive: bool = False,
    sync_perturbation: bool = True,
    eta: float = 0.0,
    gsam_alpha: float = 0.0,
    loss_scale: tf.Tensor | None = None,
) -> tuple[tf.Tensor, list[tf.Tensor], Any]:
  """`sam_step`'s (loss, grads, aux), for code written against earlier releases.

  Deprecated: call `sam_step`, the one entry point, and read `.loss`,
  `.grads` and `.aux` of its result.
  """
  warnings.warn('sam_gradients is deprecated: call sam_step and read .loss, '
                '.grads and .aux of its result.', DeprecationWarning,
                stacklevel=2)
  out = sam_step(loss_fn, params, rho, adaptive=adaptive,
                 sync_perturbation=sync_perturbation, eta=eta,
                 gsam_alpha=gsam_alpha, loss_scale=loss_scale)
  return out.loss, out.grads, out.aux
