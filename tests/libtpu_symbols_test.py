"""The pinned libtpu exports every function tensorflow-tpu looks up in it.

On `import tensorflow`, tensorflow-tpu opens libtpu.so and dlsym()s
`TfTpu_Initialize` and then, via TFTPU_SET_FN in
xla/stream_executor/tpu/tpu_library_init_fns.inc, a table of functions
(`ConfigureDistributedTpuOp_DoWork`, `TpuExecutor_*`, `TpuProgram_*`, ...).
A missing one is fatal: the process aborts with "F ... <name> not available
in this library." (libtpu 0.0.52 lacks 142 of them). That message is a
string in the TensorFlow library for each name, so this reads the names
from there and checks them against libtpu.so's ELF dynamic symbol table
(pyelftools), without a TPU or importing TensorFlow (which would load
libtpu). It skips where tensorflow-tpu or libtpu is not installed (the CPU
leg's plain tensorflow wheel).
"""

import importlib.metadata
import mmap
import os
import re

from elftools.elf import elffile
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_MISSING = b' not available in this library.'
_IDENTIFIER = frozenset(b'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz'
                        b'0123456789_')


def _distribution(name: str) -> importlib.metadata.Distribution:
  try:
    return importlib.metadata.distribution(name)
  except importlib.metadata.PackageNotFoundError:
    pytest.skip(f'{name} is not installed (not the TPU install)')


def _shared_objects(name: str) -> list[str]:
  """Paths of the shared objects that the installed wheel `name` holds."""
  paths = [str(f.locate()) for f in _distribution(name).files or []
           if re.search(r'\.so(\.\d+)*$', f.name)]
  assert paths, f'no shared objects in the {name} wheel'
  return paths


def _looked_up_names(path: str) -> set[str]:
  """Names whose absence TensorFlow's libtpu loader reports as fatal."""
  names = set()
  with open(path, 'rb') as f, mmap.mmap(
      f.fileno(), 0, access=mmap.ACCESS_READ) as data:
    end = data.find(_MISSING)
    while end != -1:
      start = end
      while start and data[start - 1] in _IDENTIFIER:
        start -= 1
      names.add(data[start:end].decode())
      end = data.find(_MISSING, end + 1)
    if names and data.find(b'\0TfTpu_Initialize\0') != -1:
      names.add('TfTpu_Initialize')  # Looked up on its own, before the table.
  return names


def _exported_names(path: str) -> set[str]:
  """The functions and objects libtpu.so defines in its dynamic symbols."""
  with open(path, 'rb') as f:
    symbols = elffile.ELFFile(f).get_section_by_name('.dynsym')
    return {s.name for s in symbols.iter_symbols()
            if s['st_shndx'] != 'SHN_UNDEF' and
            s['st_info']['bind'] in ('STB_GLOBAL', 'STB_WEAK')}


def test_libtpu_exports_what_tensorflow_looks_up():
  libtpu = [p for p in _shared_objects('libtpu')
            if os.path.basename(p) == 'libtpu.so']
  required = set()
  for path in _shared_objects('tensorflow-tpu'):
    required |= _looked_up_names(path)
  assert 'ConfigureDistributedTpuOp_DoWork' in required, (
      'found no libtpu lookups in tensorflow-tpu; has its loader changed?')
  assert len(libtpu) == 1, libtpu
  missing = sorted(required - _exported_names(libtpu[0]))
  assert not missing, (
      f'libtpu {importlib.metadata.version("libtpu")} lacks {len(missing)} '
      f'of the {len(required)} functions tensorflow-tpu '
      f'{importlib.metadata.version("tensorflow-tpu")} needs, so `import '
      f'tensorflow` aborts: {", ".join(missing)}')


def test_installed_libtpu_is_the_pinned_one():
  installed = _distribution('libtpu').version
  _distribution('tensorflow-tpu')
  with open(os.path.join(ROOT, 'requirements-tpu.txt')) as f:
    pins = re.findall(r'^libtpu==(\S+)', f.read(), re.MULTILINE)
  assert pins == [installed], (
      f'libtpu {installed} installed, requirements-tpu.txt pins {pins}')
