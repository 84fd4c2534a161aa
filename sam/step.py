"""The replica steps: `train_step` (one SAM or plain step) and `eval_step`.

Both run in replica context, inside `strategy.run` of the compiled loops of
`sam.train`, and hold no host-side op (TPUs compile them whole). Read
`train_step` top to bottom: the loss, the SAM gradient (`sam.sam.sam_step`),
batch-norm statistics averaged across replicas, clipping by the global norm,
the update, the moving average of the weights, the metric sums.
"""

import ml_collections
import tensorflow as tf

from sam import looksam
from sam import loss_scaling
from sam import mixup
from sam import optim
from sam import perturbations
from sam import sam as sam_lib
from sam.models import true_gradient
from sam.state import SAM_FIELDS
from sam.state import TRAIN_FIELDS
from sam.state import TrainState

_SUM = tf.distribute.ReduceOp.SUM


def train_step(state: TrainState, config: ml_collections.ConfigDict, batch,
               sam_now: bool) -> None:
  """One step on this replica's batch.

  Args:
    state: the run's state, updated in place.
    config: the run's config.
    batch: (images, labels) of this replica, and under label noise whether
      each label was flipped.
    sam_now: False on the steps between SAM steps (sam.every_k_steps > 1):
      the plain gradient, plus LookSAM's reused direction if it is on.
  """
  images, labels, *flipped = batch
  ctx = tf.distribute.get_replica_context()
  sc = config.sam
  model = state.model
  params = [v.value for v in model.trainable_variables]
  model_state = [v.value for v in model.non_trainable_variables]
  share = 1 / ctx.num_replicas_in_sync  # Of the global batch's loss.
  targets = labels  # The loss's; the metrics count the labels.
  if config.dataset.mixup_alpha:
    images, targets = mixup.mix(images, labels, state.num_classes,
                                mixup.draw_weight(
                                    config.dataset.mixup_alpha, config.seed,
                                    state.optimizer.iterations))
  loss_fn, ascent_loss_fn = (
      make_loss_fn(state, config, images, targets, model_state, share, ascent)
      for ascent in (False, True))
  scale = loss_scaling.scale(state)
  if sam_now and sc.micro_batch_size:
    out = _micro_batch_sam(state, config, images, targets, model_state,
                           params)
  elif sam_now:
    # The SAM rule: the gradient at w, its norm across replicas, eps, the
    # gradient at w + eps (one pass at w if rho is 0).
    select = None
    if sc.variant == 'esam' and sc.esam_gamma < 1:
      select = esam_selection(state, config, images, targets, model_state,
                              share)
    out = sam_lib.sam_step(
        loss_fn, params, _rho(state, config),
        sync_perturbation=sc.sync_perturbation,
        loss_scale=scale, ascent_loss_fn=ascent_loss_fn,
        select_examples=select, **_variant_args(state, config))
  else:
    out = sam_lib.sam_step(loss_fn, params, 0.0, loss_scale=scale)  # Plain.
  if sc.looksam_alpha:
    out = _looksam(state, out, sam_now, sc.looksam_alpha)
  # The new batch-norm statistics and the logits: of the pass at w, unless
  # that one ran in inference mode (then of the pass at w + eps).
  logits, new_state = (out.aux if sc.ascent_mode == 'train'
                       else out.perturbed_aux)
  finite = loss_scaling.all_finite(state, [out.loss, out.grad_norm,
                                           *out.grads])
  _assign_model_state(state, new_state, finite)
  for variable, value in zip(state.sam_state, out.state):
    # The same on every replica (made of cross-replica sums).
    variable.assign(value if finite is None else
                    tf.where(finite, value, variable.read_value()))
  grads = _clip_by_global_norm(out.grads, config.optimizer.grad_clip_norm)
  loss_scaling.apply_gradients(state, config, grads, finite)
  if config.ema_decay:
    _update_ema(state, config.ema_decay, finite)
  _add_train_metrics(state, out, logits, labels, finite, sam_now,
                     flipped[0] if flipped else None)


def make_loss_fn(state: TrainState, config: ml_collections.ConfigDict, images,
                 labels, model_state, l2_share: float, ascent: bool = False,
                 examples: tf.Tensor | None = None):
  """A share of the global-batch loss, as a function of the trainable values.

  Args:
    state: the run's state (its model and L2 weight).
    config: the run's config.
    images: this replica's (micro-)batch.
    labels: its labels.
    model_state: the non-trainable values (batch-norm statistics, seeds).
    l2_share: the fraction of the L2 term this (micro-)batch carries, so
      that the shares of all replicas and micro-batches sum to one.
    ascent: the loss of SAM's ascent pass: the model in inference mode if
      config.sam.ascent_mode is 'inference', else with the true gradient of
      Shake-Shake and ShakeDrop (as the SAM code's ascent pass).
    examples: the number of examples of all replicas that the data loss
      averages over (a float; default: config.batch_size).

  Returns:
    loss_fn(params) -> (loss, (logits, new_model_state)).
  """
  model = state.model
  decayed = optim.decayed(model.trainable_variables,
                          config.optimizer.decay_all_params)
  training = not ascent or config.sam.ascent_mode == 'train'

  def loss_fn(params):
    with true_gradient.true_gradient(ascent):
      logits, new_state = model.stateless_call(
          params, model_state, images, training=training)
    logits = tf.cast(logits, tf.float32)
    per_example = _per_example_loss(state, config, labels, logits)
    loss = tf.reduce_sum(per_example) / (
        config.batch_size if examples is None else examples)
    if state.l2:
      l2 = tf.add_n([tf.reduce_sum(tf.square(p))
                     for p, d in zip(params, decayed) if d])
      loss += 0.5 * state.l2 * l2 * l2_share
    return loss, (logits, new_state)

  return loss_fn


def _per_example_loss(state, config, labels, logits):
  """The cross-entropy of each example, with the config's label smoothing.

  `labels`: integer labels, or soft targets [b, classes] (mixup's).
  """
  smoothing = config.optimizer.label_smoothing
  targets = (labels if labels.dtype.is_floating else
             tf.one_hot(labels, state.num_classes))
  targets = targets * (1 - smoothing) + smoothing / state.num_classes
  return tf.nn.softmax_cross_entropy_with_logits(targets, logits)


def esam_selection(state: TrainState, config: ml_collections.ConfigDict,
                   images, labels, model_state, l2_share: float):
  """ESAM's sharpness-sensitive data selection, for `sam_step`.

  Du et al., ICLR 2022 (github.com/dydjw9/Efficient_SAM, utils/Esam.py):
  the pass at w + eps takes the int(gamma b) examples of this replica's b
  (gamma: config.sam.esam_gamma) whose loss rose most from w to w + eps,
  measured by one more forward pass at w + eps in training mode; its loss is
  the mean over the examples kept by all replicas. As the reference, batch
  norm in that pass normalizes over the kept examples; unlike it, exactly
  int(gamma b) are kept (its strict `>` against the int(gamma b)-th largest
  keeps one fewer), and that forward pass updates no batch-norm statistics.

  Returns:
    select(aux, moved) -> the loss_fn of the kept examples, given the aux of
    the pass at w (its logits) and the params at w + eps.
  """
  gamma = config.sam.esam_gamma
  if images.shape[0] is not None:
    keep = int(images.shape[0] * gamma)
  else:  # A batch without drop_remainder (not the trainer's own data).
    keep = tf.cast(tf.cast(tf.shape(images)[0], tf.float32) * gamma, tf.int32)
  num_replicas = tf.distribute.get_replica_context().num_replicas_in_sync

  def select(aux, moved):
    logits, _ = aux
    after, _ = state.model.stateless_call(moved, model_state, images,
                                          training=True)
    rise = (_per_example_loss(state, config, labels, tf.cast(after, tf.float32))
            - _per_example_loss(state, config, labels, logits))
    _, kept = tf.math.top_k(tf.stop_gradient(rise), keep)
    return make_loss_fn(state, config, tf.gather(images, kept),
                        tf.gather(labels, kept), model_state, l2_share,
                        examples=tf.cast(keep * num_replicas, tf.float32))

  return select


def _micro_batch_sam(state, config, images, labels, model_state, params):
  """Micro-batches of config.sam.micro_batch_size, one after the other.

  Each with its own eps (m-sharpness), or with one eps for the replica's
  batch (sam.accumulate_micro_batches: gradient accumulation, SAM on the
  whole batch, the micro-batches computed one after the other).
  """
  sc = config.sam
  num_replicas = tf.distribute.get_replica_context().num_replicas_in_sync
  chunks = images.shape[0] // sc.micro_batch_size
  fns, ascent_fns = ([make_loss_fn(state, config, x, y, model_state,
                                   1 / (num_replicas * chunks), ascent)
                      for x, y in zip(tf.split(images, chunks),
                                      tf.split(labels, chunks))]
                     for ascent in (False, True))
  if sc.accumulate_micro_batches:
    out = sam_lib.sam_step(
        fns, params, _rho(state, config),
        sync_perturbation=sc.sync_perturbation,
        loss_scale=loss_scaling.scale(state), ascent_loss_fn=ascent_fns,
        **_variant_args(state, config))
  else:
    out = sam_lib.micro_batch_sam_step(
        fns, params, _rho(state, config),
        loss_scale=loss_scaling.scale(state),
        ascent_loss_fns=ascent_fns, **_variant_args(state, config))

  def joined(auxes):
    logits = tf.concat([a[0] for a in auxes], 0)
    # Each micro-batch updated the statistics from the same start; their
    # mean is what one pass over the replica's batch gives, to first order.
    return logits, [tf.add_n(s) / chunks for s in zip(*[a[1] for a in auxes])]
  return out._replace(aux=joined(out.aux),
                      perturbed_aux=joined(out.perturbed_aux))


def _rho(state: TrainState, config: ml_collections.ConfigDict):
  """This step's rho (config.sam.rho_schedule)."""
  return optim.sam_rho(config, state.schedule, state.optimizer.iterations)


def _variant_args(state: TrainState, config: ml_collections.ConfigDict):
  """sam_step's arguments that choose and shape the SAM variant: every
  registered variant's options from config.sam, and the loop's inputs."""
  sc, oc = config.sam, config.optimizer
  return dict(variant=sc.variant, adaptive=sc.adaptive,
              gsam_alpha=sc.gsam_alpha, mask=state.sam_mask,
              names=[v.path for v in state.model.trainable_variables],
              inner_group_size=sc.inner_group_size,
              ascent_steps=sc.ascent_steps,
              state=[v.read_value() for v in state.sam_state],
              base_momentum=oc.momentum if oc.name == 'sgd' else oc.beta1,
              esam_seed=tf.stack([tf.constant(config.seed, tf.int64),
                                  tf.cast(state.optimizer.iterations,
                                          tf.int64)]),
              **{o.name: sc[o.name] for o in perturbations.all_options()})


def _total(grads):
  """The gradient summed across replicas."""
  ctx = tf.distribute.get_replica_context()
  if ctx.num_replicas_in_sync == 1:
    return grads
  return ctx.all_reduce(_SUM, grads)


def _looksam(state: TrainState, out: sam_lib.SAMOutput, sam_now: bool,
             alpha: float) -> sam_lib.SAMOutput:
  """LookSAM: keep g_v at a SAM step, add it back on the steps between."""
  if not sam_now:
    share = 1 / tf.distribute.get_replica_context().num_replicas_in_sync
    return out._replace(grads=looksam.looksam_reuse(
        out.grads, [v.read_value() for v in state.looksam_direction], alpha,
        tf.linalg.global_norm(_total(out.grads)), share=share))
  # Every replica computes and keeps the same g_v.
  direction = looksam.looksam_direction(_total(out.clean_grads),
                                        _total(out.grads))
  # Made of the totals: finite on every replica or on none.
  finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(d))
                          for d in direction])
  for variable, value in zip(state.looksam_direction, direction):
    # A skipped step (loss scaling) keeps the last finite direction.
    variable.assign(tf.where(finite, value, variable.read_value())
                    if state.loss_scaling else value)
  return out


def _assign_model_state(state: TrainState, new_state, finite) -> None:
  """Batch-norm statistics of the first pass, averaged across replicas."""
  variables = state.model.non_trainable_variables
  if finite is not None:
    # A skipped step keeps the batch-norm statistics too.
    new_state = [tf.where(finite, new, old.value)
                 for new, old in zip(new_state, variables)]
  for variable, value in zip(variables, sam_lib.sync_model_state(new_state)):
    variable.assign(value)


def _clip_by_global_norm(grads, clip_norm: float):
  """Clips by the norm of the summed gradient (what the optimizer applies).

  Not each replica's part of it, as Keras' clipnorm would.
  """
  if not clip_norm:
    return grads
  norm = tf.linalg.global_norm(
      tf.distribute.get_replica_context().all_reduce(_SUM, grads))
  scale = tf.minimum(1.0, clip_norm / (norm + 1e-12))
  return [g * scale for g in grads]


def _update_ema(state: TrainState, decay: float, finite) -> None:
  """Moves the averages towards the weights; not on a skipped step."""
  model = state.model
  for averages, variables in zip(state.ema, (model.trainable_variables,
                                             model.non_trainable_variables)):
    for average, variable in zip(averages, variables):
      if tf.as_dtype(variable.dtype).is_floating:
        new = decay * average + (1 - decay) * variable.value
      else:  # Seeds are not averaged.
        new = variable.value
      if finite is not None:
        # A step that loss scaling skipped changed nothing: nor does it here.
        new = tf.where(finite, new, average.read_value())
      average.assign(new)


def _noise_sums(logits, labels, correct, flipped):
  """This replica's NOISE_FIELDS: the clean and the flipped examples apart."""
  loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
  sums = []
  for part in (~flipped, flipped):
    part = tf.cast(part, tf.float32)
    sums += [tf.reduce_sum(loss * part), tf.reduce_sum(correct * part),
             tf.reduce_sum(part)]
  return sums


def _add_train_metrics(state: TrainState, out: sam_lib.SAMOutput, logits,
                       labels, finite, sam_now: bool, flipped=None) -> None:
  """Adds this step's metric sums, over the replicas, to the state's.

  TRAIN_FIELDS, SAM_FIELDS, and NOISE_FIELDS under label noise (`flipped`).
  """
  ctx = tf.distribute.get_replica_context()
  num_replicas = ctx.num_replicas_in_sync
  # The perturbed loss and the gradient norm of SAM steps only: a plain step
  # between them has neither.
  sam = 1.0 if sam_now else 0.0
  per_example = tf.cast(
      tf.equal(tf.argmax(logits, -1, output_type=labels.dtype), labels),
      tf.float32)
  correct = tf.reduce_sum(per_example)
  count = tf.cast(tf.shape(labels)[0], tf.float32)
  skipped = 0.0 if finite is None else 1.0 - tf.cast(finite, tf.float32)
  local = tf.stack([out.loss, sam * out.perturbed_loss,
                    sam * out.grad_norm / num_replicas, correct, count,
                    1.0 / num_replicas, skipped / num_replicas,
                    # SAM_FIELDS:
                    sam * out.loss, sam / num_replicas,
                    *([] if flipped is None else _noise_sums(
                        logits, labels, per_example, flipped))])
  if finite is not None:
    # A skipped step's figures (its gradient norm overflowed) stay out of
    # the sums, but a non-finite loss does not: that is divergence, which
    # loss scaling cannot cure, and it must stop the run.
    keep = finite | ~tf.math.is_finite(out.loss)
    local = tf.where(keep | tf.equal(tf.range(local.shape[0]),
                                     TRAIN_FIELDS.index('skipped')),
                     local, 0.0)
  total = ctx.all_reduce(_SUM, local)
  sam_end = len(TRAIN_FIELDS) + len(SAM_FIELDS)
  state.train_sums.assign_add(total[:len(TRAIN_FIELDS)])
  state.sam_sums.assign_add(total[len(TRAIN_FIELDS):sam_end])
  if flipped is not None:
    state.noise_sums.assign_add(total[sam_end:])


def eval_step(state: TrainState, batch, ema: bool) -> None:
  """Adds a padded eval batch's loss, correct, top-5 and count to the sums.

  Args:
    state: the run's state.
    batch: (images, labels, mask) of this replica; mask is 0 on padding.
    ema: evaluate the moving average of the weights instead.
  """
  images, labels, mask = batch
  model = state.model
  if ema:
    trainable, model_state = ([v.read_value() for v in variables]
                              for variables in state.ema)
    logits, _ = model.stateless_call(trainable, model_state, images,
                                     training=False)
  else:
    logits = model(images, training=False)
  logits = tf.cast(logits, tf.float32)
  loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
  correct = tf.cast(
      tf.equal(tf.argmax(logits, -1, output_type=labels.dtype), labels),
      tf.float32)
  top5 = tf.cast(tf.math.in_top_k(labels, logits, min(5, state.num_classes)),
                 tf.float32)
  local = tf.stack([tf.reduce_sum(loss * mask), tf.reduce_sum(correct * mask),
                    tf.reduce_sum(top5 * mask), tf.reduce_sum(mask)])
  ctx = tf.distribute.get_replica_context()
  state.eval_sums.assign_add(ctx.all_reduce(_SUM, local))
