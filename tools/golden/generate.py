"""Golden values from the authors' own code, for tests/perturbations_test.py.

Runs each variant's reference implementation (PyTorch, read from a clone of
its repository at the commit named in REFERENCES, never copied here) on the
conformance harness's problem: a linear softmax classifier of 5 features and
3 classes, 3 steps of plain SGD on batches of 8 at a learning rate of 0.5,
rho 0.5, and each option at the harness's test value. It writes one JSON file
per variant: the problem, the options and the weights after each step, in
Keras's layout (kernel = the torch weight transposed).

  python3 -m venv /tmp/golden && /tmp/golden/bin/pip install torch numpy
  mkdir -p /tmp/repos && for r in SamsungLabs/ASAM nblt/F-SAM \
      BingcongLi/VaSSO; do
    git clone -q https://github.com/$r /tmp/repos/${r/\\//+}; done
  /tmp/golden/bin/python tools/golden/generate.py --repos=/tmp/repos \
      --out=tools/golden

Not part of the package or its Bazel build: it needs torch, which nothing
else here does.
"""

import argparse
import ast
import collections
import json
import math
import os
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
}


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


def _load_class(repos: str, repository: str, commit: str, path: str,
                name: str) -> type:
  """The class `name` of `path` at `commit`, executed with what it uses."""
  clone = os.path.join(repos, repository.replace('/', '+'))
  source = subprocess.run(['git', '-C', clone, 'show', f'{commit}:{path}'],
                          check=True, capture_output=True,
                          text=True).stdout
  tree = ast.parse(source)
  node, = [n for n in tree.body
           if isinstance(n, ast.ClassDef) and n.name == name]
  bases = [b.id for b in node.bases if isinstance(b, ast.Name)]
  namespace = {'torch': torch, 'math': math, 'defaultdict':
               collections.defaultdict, 'OPTIMIZER_REGISTRY': _Registry(),
               'configurable': lambda: (lambda f: f)}
  for base in bases:  # SamsungLabs' SAM extends their ASAM.
    namespace[base] = _load_class(repos, repository, commit, path, base)
  exec(ast.get_source_segment(source, node), namespace)  # pylint: disable=exec-used
  return namespace[name]


def _run(name: str, cls: type, kwargs: dict) -> list:
  """STEPS steps of the authors' optimizer: the weights after each."""
  xs, ys, w = _problem()
  torch.manual_seed(0)
  model = torch.nn.Linear(DIM, CLASSES)
  with torch.no_grad():
    model.weight.copy_(torch.from_numpy(w[0].T))
    model.bias.copy_(torch.from_numpy(w[1]))
  loss_fn = torch.nn.CrossEntropyLoss()
  if name in ('sam', 'asam'):  # A wrapper of the base optimizer.
    minimizer = cls(torch.optim.SGD(model.parameters(), lr=LR), model,
                    rho=RHO, **kwargs)
  elif name == 'vasso':  # Takes the base optimizer built.
    minimizer = cls(model.parameters(),
                    torch.optim.SGD(model.parameters(), lr=LR), rho=RHO,
                    **kwargs)
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

    closure()  # The gradient at w, which the first step reads.
    if name in ('sam', 'asam'):
      minimizer.ascent_step()
      closure()
      minimizer.descent_step()
    else:
      minimizer.step(closure)
      minimizer.zero_grad()
    weights.append([model.weight.detach().numpy().T.tolist(),
                    model.bias.detach().numpy().tolist()])
  return weights


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--repos', required=True,
                      help='a directory of clones named OWNER+NAME')
  parser.add_argument('--out', default=os.path.dirname(__file__))
  args = parser.parse_args()
  xs, ys, w = _problem()
  for name, (repository, commit, path, cls_name, options,
             kwargs) in REFERENCES.items():
    cls = _load_class(args.repos, repository, commit, path, cls_name)
    golden = {
        'reference': f'github.com/{repository} at {commit}, {path} '
                     f'({cls_name})',
        'torch': torch.__version__, 'rho': RHO, 'learning_rate': LR,
        'options': options, 'xs': xs.tolist(), 'ys': ys.tolist(),
        'weights0': [wi.tolist() for wi in w],
        'weights': _run(name, cls, kwargs)}
    with open(os.path.join(args.out, f'{name}.json'), 'w') as f:
      json.dump(golden, f, indent=1)
      f.write('\n')
    print(f'{name}: {golden["reference"]}')


if __name__ == '__main__':
  main()
