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
from typing import Any

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
    deviations='T = |w| + eta scales every parameter; the reference scales '
    "those whose PyTorch name holds 'weight' (kernels and batch-norm gammas) "
    'and leaves biases and batch-norm betas at T = 1.')
def asam(grads, params, rho, options):
  """eps = rho T^2 g / (||T g|| + 1e-12), T = |w| + eta (options['eta'])."""
  scales = [tf.abs(p) + options['eta'] for p in params]
  scaled = [s * g for s, g in zip(scales, grads)]
  norm = tf.linalg.global_norm(scaled)
  return [rho * s * sg / (norm + EPSILON)
          for s, sg in zip(scales, scaled)], norm
