"""The registry of SAM's perturbations: what a variant declares, and what
the loops ask of it.

A perturbation is a pure function of tensors,

  perturb(grads, params, rho, options, state) -> (eps, norm, state)

of the ascent gradient g, the trainable values w, the radius rho, the
options (a mapping) and the variant's state (a list of tensors, [] for
most). It returns eps per param, the norm that scaled it (logged as
train/grad_norm) and the new state.

The gradient contract: g is the gradient of the mean loss over the examples
that share this eps, whatever shares it (all replicas, a group of replicas,
one replica, one micro-batch) and whatever the loss scale: `sam.sam.sam_step`
sums the replicas' shares and rescales before it calls `perturb`, so a
variant whose eps depends on the size of g (Fisher SAM) sees the same g on
any slice. The tests hold every variant to it (tests/perturbations_test.py).

`options` holds every registered variant's options, at the run's values, and
what the loop provides (`LOOP_INPUTS`): `mask` (which params are perturbed,
`parameter_mask`), `names` (their variable paths), `esam_seed` (a [2] seed
per step) and `base_momentum` (the base optimizer's momentum). A variant with
state also gives `init(params) -> state`, and one that perturbs from its
state alone gives `ascent=False` (no pass at w: `perturb` gets grads=None)
and `descend(state, grads, options) -> state`, which sees the mean gradient
at w + eps. The state is one for all replicas and is checkpointed with the
run. The variants themselves are in `sam.perturbations`, which is also
where the loops look them up.
"""

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import math
import numbers
import re
from typing import Any

import keras
import tensorflow as tf

# Guards the division by the norm when the gradient vanishes. The reference
# codes differ: google-research/sam divides by the norm alone, SamsungLabs/
# ASAM adds 1e-16, Efficient_SAM 1e-7.
EPSILON = 1e-12

State = list[tf.Tensor]
PerturbFn = Callable[
    [Sequence[tf.Tensor] | None, Sequence[tf.Tensor], Any, Mapping[str, Any],
     State], tuple[list[tf.Tensor], tf.Tensor, State]]


def _no_state(params: Sequence[tf.Tensor]) -> State:
  del params
  return []


def is_real(value: Any) -> bool:
  """A finite int or float, not a bool (True is a bug, not a 1)."""
  return (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and math.isfinite(value))


@dataclasses.dataclass(frozen=True)
class Option:
  """A hyperparameter of a variant: `config.sam.<name>`, `SAMModel(<name>=)`.

  Attributes:
    name: the config field's and keyword's name, unique over all variants.
    default: its value unless set (the paper's or the reference code's).
    doc: what it is, with the source of the default (one sentence).
    check: whether a value is allowed.
    allowed: what `check` allows, as the error line says it ('it must ...').
    test_value: a value away from the default: the conformance harness runs
      every variant at it, so an option that never reaches eps fails there.
    structural: whether a resume may not change it (`sam.config_checks`).
  """
  name: str
  default: Any
  doc: str
  check: Callable[[Any], bool]
  allowed: str
  test_value: Any
  structural: bool = False


@dataclasses.dataclass(frozen=True)
class Perturbation:
  """A registered perturbation and where it comes from.

  Attributes:
    perturb: the function (see the module docstring).
    paper: the paper and equation it follows.
    reference: the reference code it was checked against, or 'none: ' and
      why there is none.
    deviations: every way it differs from that code (or from the paper).
    options: its hyperparameters.
    init: the initial state, from the params.
    ascent: whether eps needs the gradient at w (a pass there).
    descend: the new state from the gradient at w + eps, or None.
    combine: the descent gradient from this replica's gradients at w and
      at w + eps, `combine(at_w, at_eps, options)`, linear in both (each
      replica combines its own parts; the optimizer sums them); None: the
      gradient at w + eps (SAM).
  """
  perturb: PerturbFn
  paper: str
  reference: str
  deviations: str
  options: tuple[Option, ...] = ()
  init: Callable[[Sequence[tf.Tensor]], State] = _no_state
  ascent: bool = True
  descend: Callable[[State, list[tf.Tensor], Mapping[str, Any]],
                    State] | None = None
  combine: Callable[[list[tf.Tensor], list[tf.Tensor], Mapping[str, Any]],
                    list[tf.Tensor]] | None = None

  @property
  def stateful(self) -> bool:
    return self.init is not _no_state


REGISTRY: dict[str, Perturbation] = {}


def register(name: str, *, paper: str, reference: str, deviations: str,
             options: Sequence[Option] = (),
             **hooks: Any) -> Callable[[PerturbFn], PerturbFn]:
  """Registers the decorated function as the perturbation `name`.

  `options`: its hyperparameters. `hooks`: `init`, `ascent` and `descend` of
  `Perturbation`, for variants with state; `combine`, for a variant that
  descends along another direction than the gradient at w + eps.
  """
  def decorator(fn: PerturbFn) -> PerturbFn:
    if name in REGISTRY:
      raise ValueError(f'A perturbation named {name!r} is registered already.')
    taken = {o.name for o in all_options()} | set(LOOP_INPUTS)
    for option in options:
      if option.name in taken:
        raise ValueError(f'Option {option.name!r} of {name!r} is declared '
                         'already: option names are unique over all variants.')
      if not option.check(option.default) or not option.check(
          option.test_value) or option.test_value == option.default:
        raise ValueError(f'Option {option.name!r} of {name!r}: its default '
                         'and test value must pass its check and differ.')
    REGISTRY[name] = Perturbation(fn, paper, reference, deviations,
                                  tuple(options), **hooks)
    return fn
  return decorator


# What the loops pass to every perturbation beside the options.
LOOP_INPUTS = ('mask', 'names', 'esam_seed', 'base_momentum')


def all_options() -> list[Option]:
  """Every registered variant's options, in the order they were registered."""
  return [o for entry in REGISTRY.values() for o in entry.options]


def defaults() -> dict[str, Any]:
  """Every option at its default."""
  return {o.name: o.default for o in all_options()}


def describe() -> str:
  """Every registered variant as Markdown: its options (with defaults and
  docs), paper, reference code and deviations (`python -m
  sam.perturbations` prints it; docs/configs.md points here)."""
  lines = []
  for name, entry in REGISTRY.items():
    lines += [f"## `sam.variant='{name}'`", '',
              f'- paper: {entry.paper}', f'- reference: {entry.reference}',
              f'- deviations: {entry.deviations}']
    lines += [f'- `sam.{o.name}` (default {o.default!r}): {o.doc}'
              for o in entry.options]
    lines.append('')
  return '\n'.join(lines)


def get(name: str) -> Perturbation:
  """The perturbation `name`, or one line naming the registered ones."""
  try:
    return REGISTRY[name]
  except KeyError:
    raise ValueError(f'sam variant {name!r} is not one of '
                     f'{sorted(REGISTRY)} (sam.perturbations).') from None


def conflict(name: str, adaptive: bool = False, sync_perturbation: bool = True,
             inner_group_size: int = 0, ascent_steps: int = 1,
             gsam_alpha: float = 0.0) -> str | None:
  """What keeps the variant `name` from these sam_step arguments, or None."""
  entry = get(name)
  if adaptive and name not in ('sam', 'asam'):
    return (f'variant {name!r} and adaptive=True (which is variant '
            "'asam') exclude each other")
  if entry.stateful and (not sync_perturbation or inner_group_size or
                         ascent_steps > 1):
    return (f'variant {name!r} keeps one state for all replicas and steps: '
            'it needs sync_perturbation=True, inner_group_size=0, '
            'ascent_steps=1 and no micro-batch m-sharpness')
  if not entry.ascent and gsam_alpha:
    return (f'variant {name!r} takes no pass at w, which GSAM needs: set '
            'gsam_alpha=0')
  if entry.combine is not None and gsam_alpha:
    return (f'variant {name!r} sets its own descent direction, as GSAM '
            'does: set gsam_alpha=0')
  if gsam_alpha and inner_group_size:
    return 'GSAM over groups of replicas (inner_group_size) is not supported'
  return None


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
