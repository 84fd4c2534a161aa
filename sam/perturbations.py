"""SAM's perturbations by name: how the ascent gradient becomes eps.

Each variant is a function `perturb(grads, params, rho, options, state) ->
(eps, norm, state)` registered with its paper, reference code, deviations
and options; `sam.registry` says what each argument holds, the gradient
contract every variant may rely on (g is the mean gradient of the examples
that share eps) and the hooks of a variant with state. The same function
serves the custom loop, `sam.keras.SAMModel` and a user's own loop through
`sam_step(..., variant=NAME)`. The registry's lookups are re-exported here:
the loops and the configs ask this module, so every variant below is
registered before any lookup.

To add a variant: write its function here and register it with its paper
(and equation), the reference code it follows (or why there is none), every
way it differs from that code, and its options, each an `Option` with its
default, check and a value away from the default. That declaration makes
the `config.sam.<option>` fields, their start-up checks, what the custom
loop and `SAMModel` pass, `SAMModel`'s keyword arguments and the
benchmark's row. Then add a NumPy reference written independently to
tests/perturbations_test.py: the conformance harness there fails for a
registered variant without one, and runs each at its options' test values.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import tensorflow as tf

# The registry's names, also those that only the loops, configs and tests use
# (noqa: F401): they look the variants up here, where all are registered.
from sam.registry import all_options  # noqa: F401
from sam.registry import conflict  # noqa: F401
from sam.registry import defaults  # noqa: F401
from sam.registry import describe
from sam.registry import EPSILON
from sam.registry import get  # noqa: F401
from sam.registry import is_offset
from sam.registry import is_real
from sam.registry import LOOP_INPUTS  # noqa: F401
from sam.registry import NORMALIZATION_LAYERS  # noqa: F401
from sam.registry import Option
from sam.registry import parameter_mask  # noqa: F401
from sam.registry import Perturbation  # noqa: F401
from sam.registry import register
from sam.registry import REGISTRY  # noqa: F401
from sam.registry import State


@register(
    'sam',
    paper='Foret et al., "Sharpness-Aware Minimization for Efficiently '
    'Improving Generalization", ICLR 2021, eq. 2 (p = 2)',
    reference='github.com/google-research/sam, sam_jax/training_utils/'
    'flax_training.py (dual_vector)',
    deviations='the norm is guarded by 1e-12; the reference divides by the '
    'norm alone (a zero gradient gives NaN there, eps = 0 here).')
def sam(grads, params, rho, options, state):
  """eps = rho g / (||g|| + 1e-12), the norm over all params jointly."""
  del params, options
  eps, norm = _normalized(grads, rho)
  return eps, norm, state


def _normalized(grads, rho):
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
    'which adaptive_biases=False (config.sam.adaptive_biases) follows. '
    'The norm is guarded by 1e-12, the reference\'s by 1e-16.',
    options=(
        Option('eta', 0.01, "ASAM's offset in T = |w| + eta, which keeps "
               'zero weights perturbable (their 0.01).',
               lambda v: is_real(v) and v >= 0,
               'it must be a finite number >= 0 (ASAM uses 0.01)', 0.2),
        Option('adaptive_biases', True, "ASAM's T = |w| + eta also on "
               'biases and normalization offsets; False leaves T = 1 there, '
               'as their code does.', lambda v: isinstance(v, bool),
               'it must be True or False', False),
    ))
def asam(grads, params, rho, options, state):
  """eps = rho T^2 g / (||T g|| + 1e-12), T = |w| + eta (options['eta']).

  With options['adaptive_biases'] False, T = 1 on the params whose name
  (options['names']) ends in 'bias' or 'beta'.
  """
  offsets = [False] * len(params)
  if not options['adaptive_biases']:
    if options.get('names') is None:
      raise ValueError('ASAM with adaptive_biases=False needs the names of '
                       'the parameters (sam_step(names=...)).')
    offsets = [is_offset(n) for n in options['names']]
  scales = [tf.ones_like(p) if o else tf.abs(p) + options['eta']
            for p, o in zip(params, offsets)]
  scaled = [s * g for s, g in zip(scales, grads)]
  norm = tf.linalg.global_norm(scaled)
  return [rho * s * sg / (norm + EPSILON)
          for s, sg in zip(scales, scaled)], norm, state


def _momentum_and_started(params: Sequence[tf.Tensor]) -> State:
  return [tf.zeros_like(p) for p in params] + [tf.zeros([])]


@register(
    'fsam',
    paper='Li et al., "Friendly Sharpness-Aware Minimization", CVPR 2024: '
    'the ascent along g - sigma m, m an exponential moving '
    "average of the ascent gradients (an estimate of the full-data "
    "gradient, whose part of eps the paper finds harmful)",
    reference='github.com/nblt/F-SAM, utils.py (FriendlySAM.first_step); '
    'run.sh: sigma = 1, lambda = 0.6',
    deviations='none for its default adaptive=False; its adaptive form '
    '(p^2 in eps, |p| in the norm) is not offered.',
    options=(
        Option('fsam_sigma', 1.0, "F-SAM's sigma, the weight of the moving "
               'average taken off g (their run.sh: 1).', is_real,
               'it must be a finite number (F-SAM uses 1)', 0.5),
        Option('fsam_lambda', 0.6, "F-SAM's lambda, the decay of that "
               'moving average (their run.sh: 0.6, with rho = 0.2).',
               lambda v: is_real(v) and 0 <= v < 1,
               'it must be in [0, 1) (F-SAM uses 0.6)', 0.3),
    ),
    init=_momentum_and_started)
def fsam(grads, params, rho, options, state):
  """eps = rho d / ||d||, d = g - sigma m; then m = lambda m + (1 - lambda) g.

  State: m per param and a flag; at the first step d = g and m = g, as the
  reference code starts. Options: `fsam_sigma`, `fsam_lambda`.
  """
  del params
  *momentum, started = state
  sigma, decay = options['fsam_sigma'], options['fsam_lambda']
  started = [tf.cast(started, g.dtype) for g in grads]
  d = [g - sigma * s * m for g, m, s in zip(grads, momentum, started)]
  momentum = [s * (decay * m + (1 - decay) * g) + (1 - s) * g
              for g, m, s in zip(grads, momentum, started)]
  eps, norm = _normalized(d, rho)
  return eps, norm, momentum + [tf.ones([])]


@register(
    'vasso',
    paper='Li & Giannakis, "Enhancing Sharpness-Aware Optimization Through '
    'Variance Suppression", NeurIPS 2023: eps = rho d / ||d|| along d, an '
    'exponential moving average of the ascent gradients, '
    'd = (1 - theta) d + theta g (d = g at the first step)',
    reference='github.com/BingcongLi/VaSSO, solver/vasso.py '
    '(VASSO.first_step); train.sh: theta = 0.9, rho = 0.2',
    deviations='the norm is guarded by 1e-12, the reference\'s by 1e-7. A '
    'parameter outside the mask keeps d = 0 here; the reference has no mask.',
    options=(
        Option('vasso_theta', 0.9, "VaSSO's theta, the weight of the new "
               'gradient in the moving average d (their train.sh: 0.9; 1 is '
               'SAM).', lambda v: is_real(v) and 0 <= v <= 1,
               'it must be in [0, 1] (VaSSO uses 0.9; 1 is SAM)', 0.4),
    ),
    init=_momentum_and_started)
def vasso(grads, params, rho, options, state):
  """eps = rho d / ||d||, d = (1 - theta) d + theta g; d = g at first."""
  del params
  *average, started = state
  theta = options['vasso_theta']
  started = [tf.cast(started, g.dtype) for g in grads]
  average = [s * ((1 - theta) * d + theta * g) + (1 - s) * g
             for g, d, s in zip(grads, average, started)]
  eps, norm = _normalized(average, rho)
  return eps, norm, average + [tf.ones([])]


def _msam_descend(state: State, grads: list[tf.Tensor],
                  options: Mapping[str, Any]) -> State:
  """v = mu v + g, g the gradient at w + eps (the PyTorch SGD buffer).

  mu: option `msam_momentum`, or the base optimizer's momentum if it is -1.
  """
  momentum = options['msam_momentum']
  if momentum == -1:
    momentum = options['base_momentum']
    if momentum is None:
      raise ValueError('MSAM follows the momentum of the base optimizer, and '
                       'it has none: set msam_momentum (0.9 is usual).')
  return [momentum * v + g for v, g in zip(state, grads)]


@register(
    'msam',
    paper='Becker et al., "Momentum-SAM: Sharpness Aware Minimization '
    'without Computational Overhead", arXiv:2401.12033 (2024): '
    'eps = -rho v / ||v||, v the momentum of the descent gradients; no pass '
    'at w, so a step costs one forward-backward pass',
    reference='github.com/MarlonBecker/MSAM, optimizer/msam.py (MSAM.step)',
    deviations='the reference is an SGD that perturbs along its own momentum '
    'buffer; here the variant keeps its own v = mu v + g (mu: '
    'msam_momentum, by default the base optimizer\'s momentum), so any base '
    'optimizer works, at the cost of one more copy of the params and a '
    'cross-replica sum of the gradient (with Keras SGD at that momentum, '
    'its velocity is -lr v while the learning rate is constant). The '
    'reference adds weight decay to g before the buffer, as L2 in the loss '
    "does here; decoupled decay leaves it out of v. The logged loss is at "
    'w + eps (there is no pass at w).',
    options=(
        Option('msam_momentum', -1.0, "MSAM's mu in v = mu v + g; -1 takes "
               "the base optimizer's (SGD's momentum, Adam's beta_1), as the "
               'reference perturbs along its SGD\'s momentum buffer.',
               lambda v: is_real(v) and (v == -1 or 0 <= v < 1),
               "it must be in [0, 1), or -1 for the base optimizer's",
               0.5),
    ),
    init=lambda params: [tf.zeros_like(p) for p in params],
    ascent=False, descend=_msam_descend)
def msam(grads, params, rho, options, state):
  """eps = -rho v / (||v|| + 1e-12) of the momentum v; 0 before any step."""
  del grads, params
  mask = options.get('mask') or [True] * len(state)  # A loop input.
  velocity = [v if m else tf.zeros_like(v) for v, m in zip(state, mask)]
  eps, norm = _normalized(velocity, -rho)
  return eps, norm, state


def swp_keep(seed, count: int, beta: float) -> tf.Tensor:
  """ESAM's stochastic weight perturbation: which of `count` param tensors
  are perturbed, each with probability `beta`: a float [count] of 0 and 1,
  a function of `seed` (a [2] integer tensor; the trainer's is (config.seed,
  step), so every replica draws the same and a resume the same again)."""
  # Philox named: the default lets XLA pick another algorithm (other draws).
  draws = tf.random.stateless_uniform([count], tf.cast(seed, tf.int32),
                                      alg='philox')
  return tf.cast(draws < beta, tf.float32)


@register(
    'esam',
    paper='Du et al., "Efficient Sharpness-aware Minimization for Improved '
    'Training of Neural Networks", ICLR 2022: stochastic weight '
    'perturbation (SWP, eps on a random subset of the params, scaled by '
    '1 / beta); its sharpness-sensitive data selection (SDS, the pass at '
    'w + eps on the top gamma of the batch by loss increase) is '
    "sam_step's select_examples (config.sam.esam_gamma, SAMModel's "
    'esam_gamma)',
    reference='github.com/dydjw9/Efficient_SAM, utils/Esam.py (ESAM.step, '
    'first_step, second_step); run.sh: beta = gamma = 0.5',
    deviations='the reference draws, at the end of each step, which param '
    'tensors the next ascent pass leaves without a gradient (Python random, '
    'per process; every tensor on the first step) and so saves their part '
    'of that backward pass; here the draw is per step from (seed, step), '
    'the same on every replica, and TensorFlow still computes every '
    "gradient: SWP saves no compute. The reference's first pass skips "
    "DDP's all-reduce (each process perturbs with its own gradient); here "
    'sync_perturbation chooses, as for SAM. The norm is guarded by 1e-12, '
    "the reference's by 1e-7. Its data selection keeps the examples whose "
    'rise is strictly above the int(gamma b)-th largest, int(gamma b) - 1 '
    'of them; here int(gamma b) (tools/golden/esam.json: their gamma 0.5 is '
    'our 0.375 on 8 examples).',
    options=(
        Option('esam_beta', 0.5, "ESAM's beta: each weight tensor is "
               'perturbed with this probability, eps scaled by 1 / beta '
               '(their run.sh: 0.5; 1 perturbs every tensor).',
               lambda v: is_real(v) and 0 < v <= 1,
               'it must be in (0, 1] (ESAM uses 0.5; 1 perturbs every weight)',
               0.7),
        Option('esam_gamma', 0.5, "ESAM's gamma: the fraction of each "
               "replica's batch the pass at w + eps takes, the examples whose "
               'loss rose most from w to w + eps, found by one more forward '
               'pass (their run.sh: 0.5; 1 keeps every example).',
               lambda v: is_real(v) and 0 < v <= 1,
               'it must be in (0, 1] (ESAM uses 0.5; 1 keeps every example)',
               0.75),
    ))
def esam(grads, params, rho, options, state):
  """eps = rho (m g) / (||m g|| + 1e-12) / beta, m one draw per param tensor.

  Options: `esam_beta`, the probability that a tensor is perturbed; the
  loop's `esam_seed`, the draw's seed (see `swp_keep`), required. (Its data
  selection, `esam_gamma`, is the loop's: `sam_step(select_examples=...)`.)
  """
  del params
  if options.get('esam_seed') is None:
    raise ValueError("ESAM's stochastic weight perturbation needs a seed per "
                     'step: sam_step(esam_seed=[seed, step]).')
  beta = options['esam_beta']
  keep = tf.unstack(swp_keep(options['esam_seed'], len(grads), beta))
  eps, norm = _normalized(
      [tf.cast(k, g.dtype) * g for k, g in zip(keep, grads)], rho / beta)
  return eps, norm, state


@register(
    'fisher',
    paper='Kim et al., "Fisher SAM: Information Geometry and Sharpness Aware '
    'Minimisation", ICML 2022 (arXiv:2206.04920): the ascent in the '
    'ellipsoid eps^T F eps <= rho^2 of the Fisher information F, taken as '
    'the diagonal f = 1 + eta g^2: eps = rho f^-1 g / sqrt(g^T f^-1 g)',
    reference='none: the authors published no code (Papers with Code lists '
    'none). The paper\'s own equations could not be read here: the update '
    'is the one a third-party PyTorch FisherSAM computes, which matches '
    'the abstract\'s description; check it against the paper before '
    'relying on it',
    deviations='the normalizer is guarded by 1e-12. g is the mean gradient '
    'of the examples that share eps (the module\'s contract), so f does not '
    'depend on the number of replicas.',
    options=(
        Option('fisher_eta', 1.0, "Fisher SAM's eta in f = 1 + eta g^2 "
               '(1 is a starting point, not a value sourced from the paper; '
               '0 is SAM).', lambda v: is_real(v) and v >= 0,
               'it must be a finite number >= 0 (0 is SAM)', 4.0),
    ))
def fisher(grads, params, rho, options, state):
  """eps = rho g / f / (sqrt(sum g^2 / f) + 1e-12), f = 1 + eta g^2."""
  del params
  inverse = [g / (1 + options['fisher_eta'] * tf.square(g)) for g in grads]
  norm = tf.sqrt(tf.add_n([tf.reduce_sum(g * u)
                           for g, u in zip(grads, inverse)]))
  return [rho * u / (norm + EPSILON) for u in inverse], norm, state


def _wsam_combine(at_w, at_eps, options):
  """(1 - a) g + a g~, a = gamma / (1 - gamma): the gradient of
  L + a (L(w + eps) - L(w)), the sharpness weighted as a regularizer."""
  weight = options['wsam_gamma'] / (1 - options['wsam_gamma'])
  return [(1 - weight) * g + weight * h for g, h in zip(at_w, at_eps)]


@register(
    'wsam',
    paper='Yue et al., "Sharpness-Aware Minimization Revisited: Weighted '
    'Sharpness as a Regularization Term", KDD 2023: minimize '
    'L(w) + gamma / (1 - gamma) (L(w + eps) - L(w)), eps SAM\'s; the '
    'descent gradient is (1 - a) g + a g~, a = gamma / (1 - gamma), g at w '
    'and g~ at w + eps',
    reference='github.com/kozistr/pytorch_optimizer, pytorch_optimizer/'
    'optimizer/sam.py (WSAM with decouple=False; gamma = 0.9 its default)',
    deviations="the reference's default decouple=True steps the base "
    'optimizer with g and then adds -lr a (g~ - g) outside it; only the '
    'coupled form (decouple=False, the weighted gradient into the base '
    'optimizer) is offered here, which works with any base optimizer. The '
    'reference averages g over processes before eps, as sync_perturbation '
    'does here.',
    options=(
        Option('wsam_gamma', 0.9, "WSAM's gamma: the sharpness enters the "
               'loss with weight gamma / (1 - gamma) (the reference\'s '
               'default 0.9; 0.5 is SAM).',
               lambda v: is_real(v) and 0 <= v < 1,
               'it must be in [0, 1) (WSAM uses 0.9; 0.5 is SAM)', 0.8),
    ),
    combine=_wsam_combine)
def wsam(grads, params, rho, options, state):
  """SAM's eps; the weighting is in the descent (`_wsam_combine`)."""
  return sam(grads, params, rho, options, state)


if __name__ == '__main__':
  print(describe())  # Every variant registered above, from its register().
