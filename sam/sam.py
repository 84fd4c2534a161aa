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
them with their papers, reference code and options, some with a state),
ESAM's data selection (`select_examples`), GSAM's descent (`gsam_alpha`),
m-sharpness per replica (`sync_perturbation=False`) or per micro-batch
(`micro_batch_sam_step`); LookSAM is `sam.looksam`.

Foret et al., "Sharpness-Aware Minimization for Efficiently Improving
Generalization", ICLR 2021. Kwon et al., "ASAM: Adaptive Sharpness-Aware
Minimization for Scale-Invariant Learning of Deep Neural Networks", ICML 2021.
"""

from collections.abc import Callable, Sequence
import functools
from typing import Any, NamedTuple

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
    state: the variant's new state (`sam_step`'s `state`), empty for most.
    perturbed_aux: the aux of the pass at `params + eps` (of the only pass
      if rho == 0 or the variant takes no pass at w).
  """
  loss: tf.Tensor
  grads: list[tf.Tensor]
  aux: Any
  perturbed_loss: tf.Tensor
  grad_norm: tf.Tensor
  clean_grads: list[tf.Tensor]
  state: Any = ()
  perturbed_aux: Any = None


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
    variant: str = 'sam',
    **options: Any,
) -> tuple[list[tf.Tensor], tf.Tensor]:
  """The perturbation of a variant without state for a gradient.

  `sam_step` carries the state of the variants that have one (F-SAM, ...).

  Args:
    grads: the ascent gradient g, one tensor per param: the mean gradient of
      the examples that share eps (`sam.perturbations`' contract).
    params: the params w (read by ASAM).
    rho: the neighbourhood radius.
    adaptive: ASAM; the same as variant='asam'.
    variant: a name in `sam.perturbations.REGISTRY`.
    **options: the variants' options by name (`eta`, `adaptive_biases`, ...:
      `sam.perturbations.all_options()`, each at its default unless given)
      and the loop's inputs: `mask` (which params are perturbed,
      `sam.perturbations.parameter_mask`; the others get eps = 0 and no part
      in the norm; None: all) and `names` (the params' variable paths, for
      variants that treat kinds of params differently).

  Returns:
    (eps, norm): eps per param, and the norm that scaled it.
  """
  entry = perturbations.get('asam' if adaptive else variant)
  if entry.stateful:
    raise ValueError(f'variant {variant!r} has a state: call sam_step.')
  eps, norm, _ = _perturb(entry, grads, params, rho, _options(options), [])
  return eps, norm


def _options(given: dict[str, Any]) -> dict[str, Any]:
  """Every variant's options, the given ones over the defaults."""
  unknown = set(given) - set(perturbations.defaults()) - set(
      perturbations.LOOP_INPUTS)
  if unknown:
    raise TypeError(f'{sorted(unknown)} is no option of a registered variant '
                    f'(sam.perturbations.all_options()) nor one of '
                    f'{list(perturbations.LOOP_INPUTS)}.')
  return {**perturbations.defaults(), **given}


def _perturb(entry: perturbations.Perturbation, grads, params, rho, options,
             state):
  """entry.perturb on the gradient with the unperturbed params masked out."""
  mask = options.get('mask')
  if mask is not None and grads is not None:
    grads = [g if m else tf.zeros_like(g) for g, m in zip(grads, mask)]
  return entry.perturb(grads, params, rho, options, state)


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
    gsam_alpha: float = 0.0,
    loss_scale: tf.Tensor | None = None,
    inner_group_size: int = 0,
    ascent_steps: int = 1,
    ascent_loss_fn: LossFn | Sequence[LossFn] | None = None,
    variant: str = 'sam',
    state: Sequence[tf.Tensor] | None = None,
    select_examples: Callable[[Any, list[tf.Tensor]], LossFn] | None = None,
    loss_fraction: float = 1.0,
    **options: Any,
) -> SAMOutput:
  """The SAM gradient: the gradient at params + eps, for any base optimizer.

  Call it where you would call `tape.gradient` (docs/api.md).

  Args:
    loss_fn: `loss_fn(params) -> (loss, aux)`, pure in `params`; under a
      strategy, `loss` is this replica's share of the global-batch loss
      (sum of per-example losses / global batch). A list, one per
      micro-batch, accumulates: each pass sums them (one eps for all).
    params: the trainable values: tensors, not variables (nothing is assigned).
    rho: the neighbourhood radius; a Python 0 means the plain base optimizer
      (one forward/backward pass, no all-reduce). A tensor always runs SAM.
    adaptive: ASAM, the same as variant='asam'.
    sync_perturbation: sum the ascent gradient across the replicas before
      its norm: one eps for all. False: each replica's own (m-sharpness).
    gsam_alpha: GSAM's alpha (see `surrogate_gap_guided`); 0 is SAM.
    loss_scale: float16 loss scaling: each pass differentiates loss *
      loss_scale and unscales at once (non-finite on overflow); None: off.
    inner_group_size: share eps within groups of this many consecutive
      replicas only (the SAM code's inner_group_size); 0: all replicas.
    ascent_steps: n ascent steps, each adding the perturbation of the
      gradient where the last ended (optax.contrib.sam's sync_period n + 1).
    ascent_loss_fn: the loss of the ascent passes, if not `loss_fn` (the
      model in inference mode, or with Shake-Shake's true gradient).
    variant: the perturbation's name in `sam.perturbations.REGISTRY`.
    state: the variant's state, as the last step's `SAMOutput.state` left
      it (F-SAM's momentum, ...); None: its initial state.
    select_examples: `(aux at w, w + eps) -> the loss_fn at w + eps`, if not
      `loss_fn` (ESAM's data selection: `sam.step.esam_selection`).
    loss_fraction: the part of the replica's share of the loss that
      `loss_fn` is (1/m for one of m micro-batches; `micro_batch_sam_step`
      sets it): with the replicas that share eps, it turns their summed
      gradient into the mean gradient that perturbations receive.
    **options: the variants' options and the loop's inputs (see
      `perturbation`; `esam_seed`, ESAM's [seed, step]; `base_momentum`,
      the base optimizer's momentum, which MSAM may follow).

  Returns:
    A `SAMOutput`; its gradients are per replica (the optimizer sums them).
  """
  params = [tf.convert_to_tensor(p) for p in params]
  if isinstance(rho, (int, float)) and rho == 0:
    return _plain(loss_fn, params, loss_scale, state)
  entry = _variant(variant, adaptive, sync_perturbation, inner_group_size,
                   ascent_steps, gsam_alpha)
  ctx = _replica_context_to_sync() if sync_perturbation else None
  options = _options(options)
  state = entry.init(params) if state is None else list(state)
  first, ascent, eps, norm, state = _ascend(
      entry, functools.partial(_value_and_grad, ascent_loss_fn or loss_fn,
                               loss_scale=loss_scale),
      params, rho, options, state, ctx, inner_group_size, ascent_steps,
      _to_mean(sync_perturbation, inner_group_size, loss_fraction))
  moved = _moved(params, eps)
  descent_fn = (loss_fn if select_examples is None or first is None
                else select_examples(first[2], moved))
  perturbed = _value_and_grad(descent_fn, moved, loss_scale)
  # A variant without a pass at w: the one pass is the step's.
  loss, grads, aux = first if first is not None else perturbed
  sam_grads, state = _descent(entry, first and grads, ascent, perturbed[1],
                              options, gsam_alpha, ctx, state)
  return SAMOutput(loss, sam_grads, aux, perturbed[0], norm, grads, state,
                   perturbed[2])


def _descent(entry, at_w, ascent, at_eps, options, gsam_alpha, ctx, state):
  """The descent gradient, and the variant's state after it.

  SAM's is the gradient at w + eps; a variant's `combine` (WSAM) or GSAM
  mixes in the gradient at w (`at_w`, None without a pass there).
  """
  if entry.combine is not None and at_w is not None:
    at_eps = entry.combine(at_w, at_eps, options)
  if gsam_alpha:
    at_eps = surrogate_gap_guided(at_w, ascent, at_eps, gsam_alpha, ctx)
  if entry.descend is not None:
    state = entry.descend(state, _ascent_sum(at_eps, ctx, 0), options)
  return at_eps, state


def _plain(loss_fn, params, loss_scale, state) -> SAMOutput:
  """The plain base optimizer: one pass and no cross-replica traffic."""
  loss, grads, aux = _value_and_grad(loss_fn, params, loss_scale)
  return SAMOutput(loss, grads, aux, loss, tf.zeros([], loss.dtype), grads,
                   list(state or []), aux)


def _variant(name, adaptive, *arguments) -> perturbations.Perturbation:
  """The perturbation, or one line on what keeps it from the arguments."""
  problem = perturbations.conflict(name, adaptive, *arguments)
  if problem:
    raise ValueError(f'sam_step: {problem}.')
  return perturbations.get('asam' if adaptive else name)


def _to_mean(sync_perturbation: bool, inner_group_size: int,
             loss_fraction: float) -> float:
  """What turns the summed ascent gradient into the mean gradient of the
  examples that share eps: their part of the global-batch loss, inverted."""
  ctx = tf.distribute.get_replica_context()
  replicas = 1 if ctx is None else ctx.num_replicas_in_sync
  sharing = (inner_group_size or replicas) if sync_perturbation else 1
  return replicas / sharing / loss_fraction


def _ascend(entry, value_and_grad, params, rho, options, state, ctx,
            inner_group_size, ascent_steps, to_mean):
  """The pass at w (None for a variant without one) and eps from it.

  Returns:
    (loss, grads, aux) at w or None, the ascent gradient (summed over the
    replicas that share eps) or None, eps, its norm and the new state.
  """
  def perturb(summed, state):
    if summed is not None and to_mean != 1:
      summed = [g * to_mean for g in summed]
    return _perturb(entry, summed, params, rho, options, state)

  first = ascent = None
  if entry.ascent:
    first = value_and_grad(params)
    ascent = _ascent_sum(first[1], ctx, inner_group_size)
  eps, norm, state = perturb(ascent, state)
  for _ in range(ascent_steps - 1):
    _, more, _ = value_and_grad(_moved(params, eps))
    step, _, _ = perturb(_ascent_sum(more, ctx, inner_group_size), state)
    eps = [e + d for e, d in zip(eps, step)]
  return first, ascent, eps, norm, state


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


def micro_batch_sam_step(
    loss_fns: Sequence[LossFn],
    params: Sequence[tf.Tensor],
    rho: float | tf.Tensor,
    ascent_loss_fns: Sequence[LossFn] | None = None,
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
    ascent_loss_fns: their `ascent_loss_fn`s (see `sam_step`), or None.
    **kwargs: further `sam_step` arguments (adaptive, eta, gsam_alpha,
      loss_scale); sync_perturbation is False by definition.

  Returns:
    The summed loss, perturbed loss and gradients; the mean of the
    micro-batches' gradient norms; and the lists of their auxes.
  """
  outs = [sam_step(fn, params, rho, sync_perturbation=False,
                   ascent_loss_fn=ascent, loss_fraction=1 / len(loss_fns),
                   **kwargs)
          for fn, ascent in zip(loss_fns,
                                ascent_loss_fns or [None] * len(loss_fns))]
  return SAMOutput(
      loss=tf.add_n([o.loss for o in outs]),
      grads=[tf.add_n(g) for g in zip(*[o.grads for o in outs])],
      aux=[o.aux for o in outs],
      perturbed_loss=tf.add_n([o.perturbed_loss for o in outs]),
      grad_norm=tf.add_n([o.grad_norm for o in outs]) / len(outs),
      clean_grads=[tf.add_n(g) for g in zip(*[o.clean_grads for o in outs])],
      perturbed_aux=[o.perturbed_aux for o in outs])

