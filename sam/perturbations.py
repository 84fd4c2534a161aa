"""SAM's perturbations by name: how the ascent gradient becomes eps.

A perturbation is a pure function of tensors,

  perturb(grads, params, rho, options) -> (eps, norm)

of the ascent gradient g (summed over the replicas that share eps, which
`sam.sam.sam_step` does before it calls this), the trainable values w, the
radius rho and the variant's options (a mapping: `eta`, ...). It returns eps
per param and the norm that scaled it (logged as train/grad_norm). The same
function serves the custom loop, `sam.keras.SAMModel` and a user's own loop
through `sam_step(..., variant=NAME)`.

To add a variant: write its function here, register it with the paper (and
equation), the reference code it follows and every way it differs from
that code, and add a NumPy reference written independently to
tests/perturbations_test.py: the conformance harness there fails for a
registered variant without one.
"""

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import re
from typing import Any

import keras
import tensorflow as tf

# Guards the division by the norm when the gradient vanishes (as in the
# reference code of SAM and ASAM).
EPSILON = 1e-12

PerturbFn = Callable[
    [Sequence[tf.Tensor], Sequence[tf.Tensor], Any, Mapping[str, Any]],
    tuple[list[tf.Tensor], tf.Tensor]]


@dataclasses.dataclass(frozen=True)
class Perturbation:
  """A registered perturbation and where it comes from."""
  perturb: PerturbFn
  paper: str
  reference: str
  deviations: str


REGISTRY: dict[str, Perturbation] = {}


def register(name: str, *, paper: str, reference: str,
             deviations: str) -> Callable[[PerturbFn], PerturbFn]:
  """Registers the decorated function as the perturbation `name`."""
  def decorator(fn: PerturbFn) -> PerturbFn:
    if name in REGISTRY:
      raise ValueError(f'A perturbation named {name!r} is registered already.')
    REGISTRY[name] = Perturbation(fn, paper, reference, deviations)
    return fn
  return decorator


def get(name: str) -> Perturbation:
  """The perturbation `name`, or one line naming the registered ones."""
  try:
    return REGISTRY[name]
  except KeyError:
    raise ValueError(f'sam variant {name!r} is not one of '
                     f'{sorted(REGISTRY)} (sam.perturbations).') from None


@register(
    'sam',
    paper='Foret et al., "Sharpness-Aware Minimization for Efficiently '
    'Improving Generalization", ICLR 2021, eq. 2 (p = 2)',
    reference='github.com/google-research/sam, sam_jax/training_utils/'
    'flax_training.py (dual_vector)',
    deviations='none')
def sam(grads, params, rho, options):
  """eps = rho g / (||g|| + 1e-12), the norm over all params jointly."""
  del params, options
  norm = tf.linalg.global_norm(grads)
  return [rho * g / (norm + EPSILON) for g in grads], norm


@register(
    'asam',
    paper='Kwon et al., "ASAM: Adaptive Sharpness-Aware Minimization for '
    'Scale-Invariant Learning of Deep Neural Networks", ICML 2021: the '
    'p = 2 maximizer of adaptive sharpness, T_w = |w| + eta elementwise',
    reference='github.com/SamsungLabs/ASAM, asam.py (ASAM.ascent_step)',
    deviations='by default T = |w| + eta scales every parameter; the '
    "reference scales those whose PyTorch name holds 'weight' (kernels and "
    'batch-norm gammas) and leaves biases and batch-norm betas at T = 1, '
    'which adaptive_biases=False (config.sam.adaptive_biases) follows.')
def asam(grads, params, rho, options):
  """eps = rho T^2 g / (||T g|| + 1e-12), T = |w| + eta (options['eta']).

  With options['adaptive_biases'] False, T = 1 on the params whose name
  (options['names']) ends in 'bias' or 'beta'.
  """
  offsets = [False] * len(params)
  if not options.get('adaptive_biases', True):
    if options.get('names') is None:
      raise ValueError('ASAM with adaptive_biases=False needs the names of '
                       'the parameters (sam_step(names=...)).')
    offsets = [is_offset(n) for n in options['names']]
  scales = [tf.ones_like(p) if o else tf.abs(p) + options['eta']
            for p, o in zip(params, offsets)]
  scaled = [s * g for s, g in zip(scales, grads)]
  norm = tf.linalg.global_norm(scaled)
  return [rho * s * sg / (norm + EPSILON)
          for s, sg in zip(scales, scaled)], norm


def is_offset(name: str) -> bool:
  """Whether a variable path names a bias or a normalization offset."""
  return name.rsplit('/', 1)[-1] in ('bias', 'beta')


# What config.sam.perturb_only='normalization' selects (SAM-ON).
NORMALIZATION_LAYERS = (keras.layers.BatchNormalization,
                        keras.layers.LayerNormalization,
                        keras.layers.GroupNormalization)


def parameter_mask(model: keras.Model,
                   perturb_only: str) -> list[bool] | None:
  """Which of `model.trainable_variables` SAM perturbs.

  Args:
    model: the Keras model.
    perturb_only: '' for all (None is returned); 'normalization' for the
      parameters of its normalization layers (SAM-ON: Mueller et al.,
      "Normalization Layers Are All That Sharpness-Aware Minimization
      Needs", NeurIPS 2023; their code, github.com/mueller-mp/SAM-ON
      sam_on.py, selects by the names 'norm' and 'bn'; here by layer type);
      else a regular expression searched in each variable's path.

  Returns:
    One bool per trainable variable, or None for all.

  Raises:
    ValueError: if no trainable variable is selected, or the expression is
      invalid.
  """
  if not perturb_only:
    return None
  variables = model.trainable_variables
  if perturb_only == 'normalization':
    chosen = {id(v) for layer in _layers(model)
              if isinstance(layer, NORMALIZATION_LAYERS)
              for v in layer.trainable_variables}
    mask = [id(v) in chosen for v in variables]
  else:
    try:
      pattern = re.compile(perturb_only)
    except re.error as e:
      raise ValueError(f'config.sam.perturb_only={perturb_only!r} is no '
                       f'regular expression ({e}).') from None
    mask = [bool(pattern.search(v.path)) for v in variables]
  if not any(mask):
    raise ValueError(
        f'config.sam.perturb_only={perturb_only!r} selects none of the '
        f'{len(variables)} trainable variables of the model (the first: '
        f'{[v.path for v in variables[:3]]}); use \'\' for all.')
  return mask


def _layers(layer: keras.layers.Layer):
  yield layer
  for sub in getattr(layer, 'layers', []):
    yield from _layers(sub)
