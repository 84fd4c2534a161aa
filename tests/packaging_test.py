"""The TPU install path (requirements.txt) never pulls the plain tensorflow.

Cloud TPU VMs bring `tensorflow-tpu`; the `tensorflow` wheel provides the same
module, so pulling it in beside the image's would break TPU support.
"""

import importlib.metadata
import os
import re

from tests.conftest import requirement_lines

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TF_WHEELS = ('tensorflow', 'tensorflow-cpu', 'tensorflow-gpu', 'tf-nightly',
              'tensorflow-intel')


def _name(requirement: str) -> str:
  return re.split(r'[\s\[<>=!~;]', requirement.strip(), maxsplit=1)[0].lower(
  ).replace('_', '-')


def _unconditional_deps(package: str) -> list[str]:
  try:
    requires = importlib.metadata.requires(package) or []
  except importlib.metadata.PackageNotFoundError:
    return []
  # Dependencies behind an extra ('; extra == "x"') are not installed.
  return [_name(r) for r in requires if 'extra ==' not in r]


def test_tpu_path_installs_no_tensorflow_wheel():
  top = [_name(r) for r in requirement_lines('requirements.txt')]
  assert not set(top) & set(_TF_WHEELS), top
  # Walk what those requirements pull in, as installed here.
  seen, todo = set(), list(top)
  while todo:
    package = todo.pop()
    if package in seen:
      continue
    seen.add(package)
    deps = _unconditional_deps(package)
    assert not set(deps) & set(_TF_WHEELS), (package, deps)
    todo += deps
  assert 'clu' in seen and 'tensorflow-datasets' in seen


def test_cpu_and_gpu_paths_pin_a_supported_tensorflow_each():
  # CPU: the wheel without CUDA, so that no GPU probe (an error line on a
  # machine without one) starts the console. GPU: with CUDA's libraries.
  assert [r for r in requirement_lines('requirements-cpu.txt')
          if _name(r) in _TF_WHEELS] == ['tensorflow-cpu>=2.20,<2.22']
  assert [r for r in requirement_lines('requirements-gpu.txt')
          if _name(r) in _TF_WHEELS] == ['tensorflow[and-cuda]>=2.20,<2.22']


def test_pyproject_dependencies_matchrequirement_lines():
  try:
    import tomllib  # pylint: disable=g-import-not-at-top
  except ModuleNotFoundError:  # Python 3.10.
    import tomli as tomllib  # pylint: disable=g-import-not-at-top
  with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
    project = tomllib.load(f)['project']
  assert sorted(project['dependencies']) == sorted(
      requirement_lines('requirements.txt'))
  extras = project['optional-dependencies']
  assert extras['cpu'] == ['tensorflow-cpu>=2.20,<2.22']
  assert extras['gpu'] == [r for r in requirement_lines('requirements-gpu.txt')
                           if _name(r) in _TF_WHEELS]
  test_only = [r for r in requirement_lines('requirements-test.txt')
               if r not in requirement_lines('requirements-cpu.txt')]
  assert sorted(extras['test']) == sorted(test_only)
  assert [_name(r) for r in extras['tpu']] == ['tensorflow-tpu']
