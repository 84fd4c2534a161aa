"""SAM for Keras 3 `fit`: a model wrapper whose `train_step` is SAM.

  with strategy.scope():
    model = sam.models.get_model('resnet20', 10, (32, 32, 3))
    sam_model = SAMModel(model, rho=0.05)
    sam_model.compile(
        optimizer='adam',
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=['accuracy'])
  sam_model.fit(x, y, validation_split=0.1, callbacks=[...])

The SAM rule itself is `sam.sam.sam_step`, the same function the custom
training loop (`sam.train`) calls; this module only feeds it a loss and
applies what it returns, the Keras way. Keras 3 has no SAM of its own (the
Keras 2 `SharpnessAwareMinimization` model lives on only in `tf_keras`).

Why a wrapper, `SAMModel(model)`, and not a `train_step` mix-in: it is the
shape of the original TF 2 SAM notebook and of Keras 2's
`SharpnessAwareMinimization(model, rho)`, so code written for either ports by
changing one line; it takes any Keras model (functional, `Sequential`,
subclassed, the `sam.models` zoo) without a new class per model, which a
functional model could not get from a mix-in without being rebuilt; and the
wrapped model stays a plain Keras model that `sam_model.model` hands back for
export, inference or a later run without SAM.
"""

import numbers
import textwrap
from typing import Any

import keras
import tensorflow as tf

from sam import perturbations
from sam import sam as sam_lib
from sam.models import true_gradient

__all__ = ['SAMModel']


def _check(ok: bool, argument: str, value: Any, allowed: str) -> None:
  if not ok:
    raise ValueError(f'SAMModel: {argument}={value!r} is invalid: {allowed}.')


def _is_number(value: Any) -> bool:
  # bool is an int to Python, but rho=True is a bug, not a radius of 1.
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


# SAMModel's own arguments, kept as attributes and in its config, with the
# registered variants' options (`sam.perturbations.all_options()`).
_SAM_ARGUMENTS = ('rho', 'adaptive', 'sync_perturbation', 'variant',
                  'perturb_only', 'inner_group_size', 'ascent_steps',
                  'ascent_mode', 'esam_seed', 'micro_batches')
_FLAGS = ('adaptive', 'sync_perturbation')
_INTS = {'inner_group_size': 0, 'ascent_steps': 1, 'esam_seed': 0,
         'micro_batches': 1}


def _check_arguments(model: Any, arguments: dict[str, Any]) -> None:
  """SAMModel's arguments, checked: one line naming a bad one."""
  if not isinstance(model, keras.Model):
    raise TypeError(
        f'SAMModel: model must be a Keras 3 model (keras.Model), got '
        f'{type(model).__module__}.{type(model).__qualname__}.')
  a = arguments
  _check(_is_number(a['rho']) and a['rho'] >= 0, 'rho', a['rho'],
         'it must be a number >= 0')
  for option in perturbations.all_options():
    _check(option.check(a[option.name]), option.name, a[option.name],
           option.allowed)
  if a['variant'] == 'esam' and a['esam_gamma'] < 1:
    _check(a['ascent_mode'] == 'train' and a['micro_batches'] == 1,
           'esam_gamma', a['esam_gamma'], "ESAM's data selection needs "
           "ascent_mode='train' and micro_batches=1; or set it to 1")
  for name in _FLAGS:
    _check(isinstance(a[name], bool), name, a[name], 'it must be True or False')
  _check(a['variant'] in perturbations.REGISTRY, 'variant', a['variant'],
         f'it must be one of {sorted(perturbations.REGISTRY)}')
  _check(isinstance(a['perturb_only'], str), 'perturb_only',
         a['perturb_only'], "it must be a string ('' for all parameters)")
  _check(a['ascent_mode'] in ('train', 'inference'), 'ascent_mode',
         a['ascent_mode'], "it must be 'train' or 'inference'")
  for name, least in _INTS.items():
    _check(isinstance(a[name], int) and not isinstance(a[name], bool) and
           a[name] >= least, name, a[name], f'it must be an int >= {least}')
  problem = perturbations.conflict(
      a['variant'], a['adaptive'], a['sync_perturbation'],
      a['inner_group_size'], a['ascent_steps'])
  if problem:
    raise ValueError(f'SAMModel: {problem}.')
  if perturbations.get(a['variant']).stateful and not model.built:
    raise ValueError(f"SAMModel: variant {a['variant']!r} keeps a state the "
                     'size of the weights: build the model first '
                     '(keras.Input, or model.build(input_shape)).')


def _loss_fn(sam_model: 'SAMModel', data: Any, state_vars: list[Any],
             ascent: bool, share: float = 1.0):
  """The compiled loss of a batch as a pure function of the trainable values.

  `ascent`: of SAM's ascent pass (in inference mode if
  `sam_model.ascent_mode` is 'inference', else with Shake-Shake's and
  ShakeDrop's true gradient, `sam.models.true_gradient`). `share`: the
  batch's share of the replica's (a micro-batch's), which scales the loss.
  """
  x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
  trainable = sam_model.trainable_variables
  metric_vars = sam_model.metrics_variables
  state = [v.value for v in state_vars]
  training = not ascent or sam_model.ascent_mode == 'train'

  def loss_fn(params):
    # All passes start from the same state (batch-norm statistics, the
    # dropout seed); `collect_losses` gathers `add_loss` terms and the
    # scope maps regularizers to `params`, so they see w + eps too.
    mapping = list(zip(trainable, params)) + list(zip(state_vars, state))
    with keras.StatelessScope(state_mapping=mapping,
                              collect_losses=True) as scope, \
        true_gradient.true_gradient(ascent):
      y_pred = sam_model(x, training=training)
      # Under a strategy, Keras scales this to the replica's share of the
      # global-batch loss (sum over the replicas = the global loss).
      loss = sam_model.compute_loss(x=x, y=y, y_pred=y_pred,
                                    sample_weight=sample_weight,
                                    training=True)
    new_state = [scope.get_current_value(v) for v in state_vars]
    # Per-output loss metrics of a multi-output model update inside the
    # scope; None where nothing was updated.
    new_metrics = [scope.get_current_value(v) for v in metric_vars]
    # A LossScaleOptimizer's scale is sam_step's loss_scale (train_step).
    return loss * share, (
        loss, y_pred, new_state, new_metrics)

  return loss_fn


def _loss_fns(sam_model: 'SAMModel', data: Any, state_vars: list[Any],
              ascent: bool):
  """`_loss_fn` of the batch, or a list of them, one per micro-batch."""
  count = sam_model.micro_batches
  if count == 1:
    return _loss_fn(sam_model, data, state_vars, ascent)

  def split(t):
    if t is None:
      return [None] * count
    check = tf.debugging.assert_equal(
        tf.shape(t)[0] % count, 0, message=(
            f'SAMModel(micro_batches={count}): the batch of each replica must '
            f'divide into {count} (batch the data with drop_remainder=True)'))
    with tf.control_dependencies([check]):
      return tf.split(t, count)

  flat = [split(t) for t in tf.nest.flatten(data)]
  parts = [tf.nest.pack_sequence_as(data, [f[i] for f in flat])
           for i in range(count)]
  return [_loss_fn(sam_model, part, state_vars, ascent, 1 / count)
          for part in parts]


def _esam_selection(sam_model: 'SAMModel', data: Any, state_vars: list[Any]):
  """ESAM's data selection (see `sam.step.esam_selection`) for `sam_step`:
  the pass at w + eps on the int(esam_gamma b) examples whose compiled loss
  rose most from w to w + eps (one more forward pass, in training mode)."""
  x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
  loss = sam_model.loss
  if not isinstance(loss, (str, keras.losses.Loss)) and not callable(loss):
    raise ValueError('SAMModel: ESAM\'s data selection (esam_gamma < 1) '
                     'needs one compiled loss, not a list or dict of them.')
  loss = keras.losses.get(loss)
  per_example = loss.call if isinstance(loss, keras.losses.Loss) else loss
  batch = tf.nest.flatten(x)[0].shape[0]  # Static where known (XLA).
  if batch is not None:
    keep = max(1, int(batch * sam_model.esam_gamma))
  else:
    batch = tf.cast(tf.shape(tf.nest.flatten(x)[0])[0], tf.float32)
    keep = tf.maximum(1, tf.cast(batch * sam_model.esam_gamma, tf.int32))
  trainable = sam_model.trainable_variables
  state = [v.value for v in state_vars]

  def select(aux, moved):
    mapping = list(zip(trainable, moved)) + list(zip(state_vars, state))
    with keras.StatelessScope(state_mapping=mapping):
      after = sam_model(x, training=True)
    rise = per_example(y, after) - per_example(y, aux[1])
    _, kept = tf.math.top_k(tf.stop_gradient(rise), keep)
    part = tf.nest.map_structure(  # None: train_on_batch's sample_weight.
        lambda t: None if t is None else tf.gather(t, kept), data)
    return _loss_fn(sam_model, part, state_vars, ascent=False)

  return select


def _sam_arguments(sam_model: 'SAMModel', data: Any,
                   state_vars: list[Any]) -> dict[str, Any]:
  """`sam_step`'s arguments from the wrapper's, for this batch."""
  m = sam_model
  select = None
  if m.variant == 'esam' and m.esam_gamma < 1:
    select = _esam_selection(m, data, state_vars)
  return dict(
      adaptive=m.adaptive, sync_perturbation=m.sync_perturbation,
      variant=m.variant, inner_group_size=m.inner_group_size,
      ascent_steps=m.ascent_steps,
      mask=perturbations.parameter_mask(m, m.perturb_only),
      names=[v.path for v in m.trainable_variables],
      state=[v.value for v in m.sam_state], select_examples=select,
      base_momentum=_momentum(m.optimizer),
      esam_seed=tf.stack([tf.constant(m.esam_seed, tf.int64),
                          tf.cast(m.optimizer.iterations, tf.int64)]),
      **{o.name: getattr(m, o.name) for o in perturbations.all_options()})


def _momentum(optimizer: keras.optimizers.Optimizer) -> float | None:
  """The base optimizer's momentum (SGD's, Adam's beta_1), or None."""
  optimizer = getattr(optimizer, 'inner_optimizer', optimizer)
  for name in ('momentum', 'beta_1'):
    if _is_number(getattr(optimizer, name, None)):
      return float(getattr(optimizer, name))
  return None


def _joined(aux: Any, metric_vars: list[Any]) -> Any:
  """The micro-batches' auxes as one of the whole batch: the mean loss, the
  predictions concatenated, the mean of the new float states (the others
  advance alike from one start), the metric updates added up."""
  if not isinstance(aux, list):
    return aux
  losses, predictions, states, metrics = zip(*aux)
  state = [tf.add_n(s) / len(s) if s[0].dtype.is_floating else s[0]
           for s in zip(*states)]
  metrics = [values[0] if values[0] is None else
             v.value + tf.add_n([m - v.value for m in values])
             for v, values in zip(metric_vars, zip(*metrics))]
  return (tf.add_n(losses) / len(losses),
          tf.nest.map_structure(lambda *p: tf.concat(p, 0), *predictions),
          state, metrics)


@keras.saving.register_keras_serializable(package='sam')
class SAMModel(keras.Model):
  """Wraps a Keras model so that `fit` trains it with SAM (or ASAM).

  Build the model and the wrapper under the strategy's scope, then compile
  and fit the wrapper as any Keras model: metrics, `validation_data` or
  `validation_split`, `class_weight`, `sample_weight`, callbacks
  (`ModelCheckpoint`, `EarlyStopping`, `ReduceLROnPlateau`, `TensorBoard`),
  `steps_per_execution` and `jit_compile` all work; `evaluate` and `predict`
  run the wrapped model. Each training step:

  1. evaluates the compiled loss (with `add_loss` and regularizer terms and
     the sample weights) at the weights w, and its gradient g, through
     `keras.StatelessScope`, so no variable is touched;
  2. perturbs to w + eps, eps = rho g / ||g|| (ASAM: rho T^2 g / ||T g||),
     with g summed across replicas first (`sync_perturbation`), exactly as
     `sam.sam.sam_step` does in the custom loop;
  3. hands the gradient at w + eps to the compiled optimizer, which updates
     w (never w + eps; the variables never hold w + eps, so no callback,
     checkpoint or `save` can see it);
  4. keeps the batch-norm moving statistics (and any other state) of the
     first pass only, averaged across replicas so every copy stays
     identical, and updates the loss and metrics with the first pass: the
     logged loss and accuracy are those at w.

  Under a `tf.distribute` strategy Keras scales the compiled loss to each
  replica's share of the global-batch loss and its optimizers sum the
  replicas' gradients, so the update is that of SAM on the global batch.
  Both passes run in training mode with the same dropout masks.

  Saving: `sam_model.save('x.keras')` and `ModelCheckpoint` write the
  wrapper (unperturbed weights, optimizer state, compile config);
  `keras.saving.load_model('x.keras')` (with this module imported) gives a
  `SAMModel` back, ready to resume, whose `.model` is the plain Keras model.
  A weights file written by the wrapper loads into a plain model through a
  fresh wrapper: `SAMModel(plain).load_weights('x.weights.h5')`. To export a
  plain model, save `sam_model.model`.

  XLA: `compile(jit_compile=True)` compiles both passes into one program.
  On CPU, XLA cannot compile the cross-replica sum, so under a strategy with
  several CPU replicas leave `jit_compile` at 'auto' (off under a strategy).

  Clipping: a Keras optimizer's `clipnorm`/`global_clipnorm` clips each
  replica's part of the gradient, not the summed gradient; under a strategy
  with several replicas prefer `sam.train`, which clips the global norm.

  Attributes:
    model: the wrapped Keras model, whose variables are trained.
    sam_state: the variant's state (F-SAM's momentum, ...), or [].
    rho, ...: the constructor's other arguments, by their names.
  """

  def __init__(self, model: keras.Model, rho: float = 0.05, *,
               adaptive: bool = False, sync_perturbation: bool = True,
               variant: str = 'sam', perturb_only: str = '',
               inner_group_size: int = 0, ascent_steps: int = 1,
               ascent_mode: str = 'train', esam_seed: int = 0,
               micro_batches: int = 1, **kwargs: Any):
    """Wraps `model`.

    Args:
      model: the Keras 3 model to train, built or not (it is built on the
        first batch if not).
      rho: the neighbourhood radius, >= 0; 0 trains with the plain compiled
        optimizer, one pass per step. The paper's default for SGD is 0.05;
        with Adam, 0.5 to 1 have paid off, notably on noisy labels.
      adaptive: ASAM (Kwon et al., 2021), the same as variant='asam'.
      sync_perturbation: with several replicas, sum the ascent gradient
        across replicas before its norm so every replica perturbs by the
        same eps (SAM on the global batch). False: each replica perturbs with
        its own gradient (m-sharpness, m = the per-replica batch).
      variant: the perturbation, by its name in `sam.perturbations.REGISTRY`
        (the class docstring lists them); `adaptive=True` is 'asam'. A
        variant with a state (F-SAM's momentum, ...) keeps it in variables
        of the wrapper, saved with it, and needs a built model.
      perturb_only: '' perturbs every parameter; 'normalization' only those
        of the normalization layers (SAM-ON); else a regular expression
        searched in the variable paths
        (`sam.perturbations.parameter_mask`).
      inner_group_size: with `sync_perturbation`, share eps within groups
        of this many consecutive replicas only; 0: all replicas.
      ascent_steps: ascent steps per update (1 is SAM; see `sam_step`).
      ascent_mode: 'train' runs the ascent pass in training mode, with
        Shake-Shake's and ShakeDrop's true gradient (as the SAM code);
        'inference' in inference mode (batch norm on its moving statistics,
        as tf_keras's SharpnessAwareMinimization for its first pass); the
        loss, metrics and batch-norm statistics then come from the pass at
        w + eps.
      esam_seed: the seed of ESAM's draws (variant='esam'; one per
        iteration).
      micro_batches: gradient accumulation: each replica's batch as this many
        micro-batches one after the other, one eps for all.
      **kwargs: the variants' options by name (the class docstring lists
        them, from `sam.perturbations`), each at its default unless given;
        the others go to `keras.Model` (e.g. `name`).
    Raises:
      TypeError: if `model` is not a Keras 3 model.
      ValueError: naming the argument, if one is of a wrong type or value,
        or `variant` refuses the others.
    """
    arguments = {name: value for name, value in locals().items()
                 if name in _SAM_ARGUMENTS}
    for name, default in perturbations.defaults().items():
      arguments[name] = kwargs.pop(name, default)
    # Checked before anything is built: a bad argument fails here, not at
    # the first trace inside `fit`.
    _check_arguments(model, arguments)
    super().__init__(**kwargs)
    self.model = model
    for name, value in arguments.items():
      # Python floats: `sam_step` recognizes a Python 0 and runs one pass.
      setattr(self, name, float(value) if name == 'rho' else value)
    self.sam_state = [
        keras.Variable(value, trainable=False, name=f'sam_state_{i}')
        for i, value in enumerate(perturbations.get(variant).init(
            [v.value for v in model.trainable_variables]))]
    if model.built:
      self.built = True

  def call(self, inputs: Any, training: bool | None = None) -> Any:
    return self.model(inputs, training=training)

  def train_step(self, data: Any) -> dict[str, Any]:
    """One SAM step on a (per-replica) batch; returns the metrics' results."""
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    if not self.model.built:
      # Without a strategy, Keras builds a model at the first trace of its
      # step, but SAM needs the variables before its first pass. Building
      # on symbolic inputs runs nothing and updates no state.
      self.compute_output_spec(
          tf.nest.map_structure(
              lambda t: keras.KerasTensor(t.shape, t.dtype.name), x),
          training=False)
    ctx = tf.distribute.get_replica_context()
    num_replicas = ctx.num_replicas_in_sync
    trainable = self.trainable_variables
    sam_state = {id(v) for v in self.sam_state}
    state_vars = [v for v in self.non_trainable_variables
                  if id(v) not in sam_state]
    loss_fn, ascent_loss_fn = (
        _loss_fns(self, data, state_vars, ascent) for ascent in (False, True))
    # Under a LossScaleOptimizer, sam_step scales the loss before each
    # backward pass and unscales the gradients, so that eps sees the
    # unscaled one; the optimizer unscales (and checks) what it is handed.
    scale = None
    if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
      scale = self.optimizer.scale_loss(tf.constant(1.0))
    out = sam_lib.sam_step(
        loss_fn, [v.value for v in trainable], self.rho,
        ascent_loss_fn=ascent_loss_fn, loss_scale=scale,
        **_sam_arguments(self, data, state_vars))
    # The loss, metrics and new state of the pass at w, unless that one ran
    # in inference mode: then of the pass at w + eps.
    loss, y_pred, new_state, new_metrics = _joined(
        out.aux if self.ascent_mode == 'train' else out.perturbed_aux,
        self.metrics_variables)
    for variable, value in zip(self.sam_state, out.state):
      variable.assign(value)  # The same on every replica.
    for variable, value in zip(state_vars,
                               sam_lib.sync_model_state(new_state)):
      variable.assign(value)
    for variable, value in zip(self.metrics_variables, new_metrics):
      # Metric variables are per replica (ON_READ): each keeps its own.
      if value is not None:
        variable.assign(value)
    grads = out.grads if scale is None else [g * scale for g in out.grads]
    # Keras 3 optimizers sum the per-replica gradients themselves.
    self.optimizer.apply_gradients(zip(grads, trainable))
    # As Keras's own train_step: the tracker averages per-replica means
    # weighted by the replica batch, so undo the 1/R share scaling.
    batch_size = tf.shape(tf.nest.flatten(x)[0])[0]
    self._loss_tracker.update_state(
        loss * tf.cast(num_replicas, loss.dtype), sample_weight=batch_size)
    return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

  def get_config(self) -> dict[str, Any]:
    return {
        'name': self.name,
        'trainable': self.trainable,
        'model': keras.saving.serialize_keras_object(self.model),
        **{name: getattr(self, name) for name in _SAM_ARGUMENTS},
        **{o.name: getattr(self, o.name) for o in perturbations.all_options()},
    }

  @classmethod
  def from_config(cls, config: dict[str, Any],
                  custom_objects: dict[str, Any] | None = None) -> 'SAMModel':
    config = dict(config)
    model = keras.saving.deserialize_keras_object(
        config.pop('model'), custom_objects=custom_objects)
    return cls(model, **config)


def _variants_doc() -> str:
  """The registered variants and their options, for SAMModel's docstring."""
  lines = ['', '  Variants (`variant=`) and their options (keyword '
           'arguments, from', '  `sam.perturbations.REGISTRY`):', '']
  for name, entry in perturbations.REGISTRY.items():
    lines += textwrap.wrap(f'{name}: {entry.paper.split(":")[0]}', 76,
                           initial_indent='    ', subsequent_indent='      ')
    for o in entry.options:
      lines += textwrap.wrap(f'{o.name}={o.default!r}: {o.doc}', 76,
                             initial_indent='      ',
                             subsequent_indent='        ')
  return '\n'.join(lines) + '\n'


SAMModel.__doc__ += _variants_doc()

