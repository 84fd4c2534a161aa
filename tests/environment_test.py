"""What main.py sets before TensorFlow loads: jax off the accelerator, a
named pod slice's client, PJRT on a TPU VM (sam/environment.py)."""

import os
import subprocess
import sys

import pytest

from sam import environment
from tests.conftest import ROOT

LIBTPU = '/site-packages/libtpu/libtpu.so'
PJRT = {'NEXT_PLUGGABLE_DEVICE_USE_C_API': 'true',
        'TF_PLUGGABLE_DEVICE_LIBRARY_PATH': LIBTPU, 'PJRT_DEVICE': 'TPU'}


@pytest.mark.parametrize('argv,environ,on_tpu_vm,libtpu,expected', [
    # A CPU or GPU machine: jax on the CPU, nothing else.
    ([], {}, False, LIBTPU, {'JAX_PLATFORMS': 'cpu'}),
    # A TPU VM with the libtpu package (base images): PJRT.
    ([], {}, True, LIBTPU, {'JAX_PLATFORMS': 'cpu', **PJRT}),
    (['--config.tpu=local'], {}, True, LIBTPU,
     {'JAX_PLATFORMS': 'cpu', **PJRT}),
    # ... without it (the TPU images' own runtime): nothing to load.
    ([], {}, True, None, {'JAX_PLATFORMS': 'cpu'}),
    # The user's own settings win, and one PJRT variable means "mine".
    ([], {'JAX_PLATFORMS': 'cuda'}, True, LIBTPU, PJRT),
    ([], {'TF_PLUGGABLE_DEVICE_LIBRARY_PATH': '/lib/libtpu.so'}, True, LIBTPU,
     {'JAX_PLATFORMS': 'cpu'}),
    ([], {'TPU_LOAD_LIBRARY': '0'}, True, LIBTPU, {'JAX_PLATFORMS': 'cpu'}),
    # A named pod slice: this process is its one client, its own chips off.
    (['--config.tpu=my-pod'], {}, True, LIBTPU,
     {'JAX_PLATFORMS': 'cpu', 'TPU_LOAD_LIBRARY': '0'}),
    (['--config.tpu', 'my-pod'], {}, False, LIBTPU,
     {'JAX_PLATFORMS': 'cpu', 'TPU_LOAD_LIBRARY': '0'}),
    ([], {'TPU_NAME': 'my-pod'}, True, LIBTPU,
     {'JAX_PLATFORMS': 'cpu', 'TPU_LOAD_LIBRARY': '0'}),
    # --config.tpu overrides TPU_NAME, as in distribute.tpu_name.
    (['--config.tpu=local'], {'TPU_NAME': 'my-pod'}, True, LIBTPU,
     {'JAX_PLATFORMS': 'cpu', **PJRT}),
])
def test_prepare_sets_only_what_is_missing(argv, environ, on_tpu_vm, libtpu,
                                           expected):
  before = dict(environ)
  done = environment.prepare(['main.py', *argv], environ, on_tpu_vm, libtpu)
  assert done == expected
  assert environ == {**before, **expected}


def test_libtpu_is_found_without_being_loaded(tmp_path, monkeypatch):
  package = tmp_path / 'libtpu'
  package.mkdir()
  (package / '__init__.py').write_text('raise ImportError("loaded")\n')
  (package / 'libtpu.so').write_bytes(b'')
  monkeypatch.syspath_prepend(str(tmp_path))
  # The TPU install's own libtpu, imported by tensorflow-tpu, would answer.
  monkeypatch.delitem(sys.modules, 'libtpu', raising=False)
  assert environment.libtpu_path() == str(package / 'libtpu.so')
  assert 'libtpu' not in sys.modules


@pytest.mark.slow  # Starts a process; prepare() itself is tested above.
def test_main_sets_it_before_tensorflow_and_jax_load():
  """main.py's import of sam.environment precedes TensorFlow's and jax's."""
  code = ('import sys; sys.argv = ["main.py", "--config.tpu=my-pod"]; '
          'import main, os; '
          'print(os.environ["TPU_LOAD_LIBRARY"], os.environ["JAX_PLATFORMS"]); '
          'import jax; print(jax.devices()[0].platform)')
  env = {k: v for k, v in os.environ.items()
         if k not in ('TPU_LOAD_LIBRARY', 'JAX_PLATFORMS', 'TPU_NAME')}
  run = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
  assert run.stdout.split() == ['0', 'cpu', 'cpu'], run.stderr
  with open(os.path.join(ROOT, 'main.py')) as f:
    source = f.read()
  assert source.index('environment.prepare(') < source.index(
      'import tensorflow')
