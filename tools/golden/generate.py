"""Golden values from the authors' own code, for tests/perturbations_test.py.

Runs each variant's reference implementation (PyTorch, read from a clone of
its repository at the commit named in REFERENCES, never copied here) on the
conformance harness's problem: a linear softmax classifier of 5 features and
3 classes, 3 steps of plain SGD on batches of 8 at a learning rate of 0.5,
rho 0.5 (MSAM: SGD with momentum 0.5, its own), and each option at the
harness's test value. It writes one JSON file
per variant: the problem, the options and the weights after each step, in
Keras's layout (kernel = the torch weight transposed). WSAM's reference is a
class of the pytorch_optimizer package (PACKAGE_REFERENCES), imported from
its wheel.

  python3 -m venv /tmp/golden && /tmp/golden/bin/pip install torch numpy \
      pytorch_optimizer==4.1.0
  mkdir -p /tmp/repos && for r in SamsungLabs/ASAM nblt/F-SAM \
      BingcongLi/VaSSO juntang-zhuang/GSAM MarlonBecker/MSAM \
      mueller-mp/SAM-ON dydjw9/Efficient_SAM; do
    git clone -q https://github.com/$r /tmp/repos/${r/\\//+}; done
  /tmp/golden/bin/python tools/golden/generate.py --repos=/tmp/repos \
      --out=tools/golden

Not part of the package or its Bazel build: it needs torch, which nothing
else here does.
"""

import argparse
import ast
import collections
import contextlib
import importlib
import importlib.metadata
import json
import math
import os
import random
import subprocess

import numpy as np
import torch

DIM, CLASSES, BATCH, STEPS = 5, 3, 8, 3
RHO, LR = 0.5, 0.5

# variant -> (repository, commit, file, class, our options, their kwargs).
# The options are the harness's test values (sam.perturbations' Option).
REFERENCES = {
    'sam': ('SamsungLabs/ASAM', 'f156a680171db16d551c0d85cba2514fa3bff6a2',
            'asam.py', 'SAM', {}, {}),
    # Their ASAM scales the params whose name holds 'weight' only: our
    # adaptive_biases=False.
    'asam': ('SamsungLabs/ASAM', 'f156a680171db16d551c0d85cba2514fa3bff6a2',
             'asam.py', 'ASAM', {'eta': 0.2, 'adaptive_biases': False},
             {'eta': 0.2}),
    'fsam': ('nblt/F-SAM', '2e2f9899ab473880430640fa5def4ad8f5aa2401',
             'utils.py', 'FriendlySAM',
             {'fsam_sigma': 0.5, 'fsam_lambda': 0.3},
             {'sigma': 0.5, 'lmbda': 0.3}),
    'vasso': ('BingcongLi/VaSSO', 'c68bcb0423c8e3332b08f01ffa4ce7dbc31f1a5d',
              'solver/vasso.py', 'VASSO', {'vasso_theta': 0.4},
              {'theta': 0.4}),
    # GSAM is our SAM with gsam_alpha (a sam_step argument, not a variant).
    # MSAM is an SGD with momentum: the base optimizer's momentum too.
    'msam': ('MarlonBecker/MSAM', '780fa4f623fe0c99760fd7cfb1a94d14f00179ee',
             'optimizer/msam.py', 'MSAM', {'msam_momentum': 0.5},
             {'momentum': 0.5, 'weight_decay': 0.0}),
    'gsam': ('juntang-zhuang/GSAM', 'a770275b3324a3ed4bf4a1cddb976b2782ba852b',
             'gsam/gsam.py', 'GSAM', {'gsam_alpha': 0.3},
             {'gsam_alpha': 0.3}),
    # SAM-ON is our SAM (or ASAM) with some params masked out
    # (config.sam.perturb_only). Their code selects the params whose names
    # hold 'norm' or 'bn': the harness's bias is named 'norm_bias' there, and
    # our mask perturbs only it.
    'samon': ('mueller-mp/SAM-ON', '8b8869ad1e03a83cc9e71bf4bca605ecc9f89080',
              'sam_on.py', 'SAM_ON', {'mask': [False, True]},
              {'only_norm': True}),
    'asamon': ('mueller-mp/SAM-ON', '8b8869ad1e03a83cc9e71bf4bca605ecc9f89080',
               'sam_on.py', 'ASAM_ON',
               {'mask': [False, True], 'eta': 0.2, 'adaptive_biases': True},
               {'only_norm': True, 'eta': 0.2, 'normalize_bias': True}),
    # ESAM at beta 1 (their draws are Python's random per process: at 1 every
    # tensor is perturbed whatever the draw). Their data selection keeps the
    # examples whose loss rose strictly more than the int(gamma b)-th
    # largest rise: int(gamma b) - 1 of them, 3 of 8 at gamma 0.5; ours
    # keeps int(gamma b), 3 of 8 at 0.375 (sam.perturbations' deviations).
    'esam': ('dydjw9/Efficient_SAM', '1e06840c466beaebfafb049096d6a1733cb77a8c',
             'utils/Esam.py', 'ESAM', {'esam_beta': 1.0, 'esam_gamma': 0.375},
             {'beta': 1.0, 'gamma': 0.5}),
}
# Their helpers that a class's module imports, executed beside it.
HELPERS = {'juntang-zhuang/GSAM': 'gsam/util.py'}
# variant -> (distribution, module, class, our options, their kwargs).
PACKAGE_REFERENCES = {
    # The coupled form (decouple=False), the one sam.perturbations offers.
    'wsam': ('pytorch_optimizer', 'pytorch_optimizer.optimizer.sam', 'WSAM',
             {'wsam_gamma': 0.8}, {'gamma': 0.8, 'decouple': False}),
}
# Their ascent_step/descent_step wrappers of a base optimizer.
WRAPPERS = ('sam', 'asam', 'samon', 'asamon')
# The golden file's variant, where it is not the file's name.
VARIANTS = {'gsam': 'sam', 'samon': 'sam', 'asamon': 'asam'}
# The momentum of the base SGD (v = mu v + g, w -= lr v), where not 0.
BASE_MOMENTUM = {'msam': 0.5}


def _problem():
  """The harness's problem (tests/perturbations_test.py::_problem)."""
  rng = np.random.default_rng(7)
  xs = rng.normal(size=(STEPS, BATCH, DIM)).astype(np.float32)
  ys = rng.integers(0, CLASSES, (STEPS, BATCH))
  w = [rng.normal(size=(DIM, CLASSES)).astype(np.float32),
       rng.normal(size=(CLASSES,)).astype(np.float32)]
  return xs, ys, w


class _Registry:
  """VaSSO's OPTIMIZER_REGISTRY and `configurable`: decorators that keep
  the class as it is (they only register it with their trainer)."""

  def register(self):
    return lambda cls: cls


def _git_show(repos: str, repository: str, commit: str, path: str) -> str:
  """The text of `path` at `commit` in the clone of `repository`."""
  clone = os.path.join(repos, repository.replace('/', '+'))
  return subprocess.run(['git', '-C', clone, 'show', f'{commit}:{path}'],
                        check=True, capture_output=True, text=True).stdout


def _load_class(repos: str, repository: str, commit: str, path: str,
                name: str) -> type:
  """The class `name` of `path` at `commit`, executed with what it uses."""
  source = _git_show(repos, repository, commit, path)
  tree = ast.parse(source)
  node, = [n for n in tree.body
           if isinstance(n, ast.ClassDef) and n.name == name]
  bases = [b.id for b in node.bases if isinstance(b, ast.Name)]
  namespace = {'torch': torch, 'math': math, 'defaultdict':
               collections.defaultdict, 'OPTIMIZER_REGISTRY': _Registry(),
               'configurable': lambda: (lambda f: f), 'contextlib': contextlib,
               'ReduceOp': torch.distributed.ReduceOp, 'random': random,
               'F': torch.nn.functional}
  if repository in HELPERS:
    helpers = _git_show(repos, repository, commit, HELPERS[repository])
    exec(helpers, namespace)  # pylint: disable=exec-used
  for base in bases:  # SamsungLabs' SAM extends their ASAM.
    namespace[base] = _load_class(repos, repository, commit, path, base)
  exec(ast.get_source_segment(source, node), namespace)  # pylint: disable=exec-used
  return namespace[name]


class _ConstantRho:
  """GSAM's rho_scheduler, at rho throughout."""

  def step(self) -> float:
    return RHO


class _NormLinear(torch.nn.Module):
  """torch.nn.Linear whose bias SAM-ON's name rule counts as a norm's."""

  def __init__(self, w: list):
    super().__init__()
    self.weight = torch.nn.Parameter(torch.from_numpy(w[0].T.copy()))
    self.norm_bias = torch.nn.Parameter(torch.from_numpy(w[1].copy()))

  def forward(self, x):
    return x @ self.weight.T + self.norm_bias


def _model(name: str, w: list) -> torch.nn.Module:
  """The harness's linear model at the weights w (in Keras's layout)."""
  if name in ('samon', 'asamon'):
    return _NormLinear(w)
  model = torch.nn.Linear(DIM, CLASSES)
  with torch.no_grad():
    model.weight.copy_(torch.from_numpy(w[0].T))
    model.bias.copy_(torch.from_numpy(w[1]))
  return model


def _run(name: str, cls: type, kwargs: dict) -> list:
  """STEPS steps of the authors' optimizer: the weights after each."""
  xs, ys, w = _problem()
  torch.manual_seed(0)
  model = _model(name, w)
  loss_fn = torch.nn.CrossEntropyLoss()
  if name in WRAPPERS:  # Wrap the base optimizer.
    minimizer = cls(torch.optim.SGD(model.parameters(), lr=LR), model,
                    rho=RHO, **kwargs)
  elif name in ('vasso', 'esam'):  # Take the base optimizer built.
    minimizer = cls(model.parameters(),
                    torch.optim.SGD(model.parameters(), lr=LR), rho=RHO,
                    **kwargs)
  elif name == 'gsam':  # rho from a scheduler: a constant one here.
    minimizer = cls(model.parameters(),
                    torch.optim.SGD(model.parameters(), lr=LR), model,
                    rho_scheduler=_ConstantRho(), **kwargs)
  elif name == 'msam':  # The SGD itself.
    minimizer = cls(model.parameters(), lr=LR, rho=RHO, **kwargs)
  elif name == 'wsam':  # The model first.
    minimizer = cls(model, model.parameters(), torch.optim.SGD, rho=RHO,
                    lr=LR, **kwargs)
  else:  # Builds the base optimizer from its class.
    minimizer = cls(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR,
                    **kwargs)
  weights = []
  for x, y in zip(xs, ys):
    x, y = torch.from_numpy(x), torch.from_numpy(y)

    def closure(x=x, y=y):
      loss = loss_fn(model(x), y)
      loss.backward()
      return loss

    if name == 'gsam':  # Its closure zeroes the gradients and returns the
      # outputs too; its step takes both passes.
      def gsam_closure(x=x, y=y):
        minimizer.base_optimizer.zero_grad()
        with torch.enable_grad():
          outputs = model(x)
          loss = loss_fn(outputs, y)
        loss.backward()
        return outputs, loss.detach()

      minimizer.step(gsam_closure)
    elif name == 'esam':  # Its step takes both passes, from per-example
      # losses.
      minimizer.paras = (x, y, torch.nn.CrossEntropyLoss(reduction='none'),
                         model, lambda loss: loss.backward())
      minimizer.step()
    elif name == 'wsam':  # Its step takes both passes.
      minimizer.step(closure)
      minimizer.zero_grad()
    elif name == 'msam':  # The params stay at w + eps between steps.
      closure()
      minimizer.step()
      minimizer.zero_grad()
      minimizer.move_back_from_momentumAscent()  # To w, to record it.
      weights.append(_weights(model))
      minimizer.move_up_to_momentumAscent()
      continue
    elif name in WRAPPERS:
      closure()  # The gradient at w, which the ascent reads.
      minimizer.ascent_step()
      closure()
      minimizer.descent_step()
    else:
      closure()  # The gradient at w, which the first step reads.
      minimizer.step(closure)
      minimizer.zero_grad()
    weights.append(_weights(model))
  return weights


def _weights(model) -> list:
  """In Keras's layout: the kernel is the torch weight transposed."""
  weight, bias = model.parameters()
  return [weight.detach().numpy().T.tolist(), bias.detach().numpy().tolist()]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--repos', required=True,
                      help='a directory of clones named OWNER+NAME')
  parser.add_argument('--out', default=os.path.dirname(__file__))
  args = parser.parse_args()
  xs, ys, w = _problem()
  references = {}
  for name, (repository, commit, path, cls_name, options,
             kwargs) in REFERENCES.items():
    references[name] = (
        _load_class(args.repos, repository, commit, path, cls_name),
        f'github.com/{repository} at {commit}, {path} ({cls_name})',
        options, kwargs)
  for name, (package, module, cls_name, options,
             kwargs) in PACKAGE_REFERENCES.items():
    references[name] = (
        getattr(importlib.import_module(module), cls_name),
        f'{package} {importlib.metadata.version(package)} (PyPI), '
        f'{module.replace(".", "/")}.py ({cls_name})', options, kwargs)
  for name, (cls, reference, options, kwargs) in references.items():
    golden = {
        'reference': reference, 'variant': VARIANTS.get(name, name),
        'torch': torch.__version__, 'rho': RHO, 'learning_rate': LR,
        'base_momentum': BASE_MOMENTUM.get(name, 0.0),
        'options': options, 'xs': xs.tolist(), 'ys': ys.tolist(),
        'weights0': [wi.tolist() for wi in w],
        'weights': _run(name, cls, kwargs)}
    with open(os.path.join(args.out, f'{name}.json'), 'w') as f:
      json.dump(golden, f, indent=1)
      f.write('\n')
    print(f'{name}: {golden["reference"]}')


if __name__ == '__main__':
  main()
