"""What must be set in the environment before TensorFlow (or jax) loads.

`main.py` and `python -m sam.tpu_check` call `prepare()` before their first
import of TensorFlow; it imports neither TensorFlow nor jax itself. Each
setting is a default: a variable the user set is never changed.

- `JAX_PLATFORMS=cpu`: clu imports jax, which would otherwise open the TPU
  (or a GPU) that TensorFlow needs.
- A named TPU (`--config.tpu=NAME` or `TPU_NAME`, other than 'local') is
  driven from this one process, TensorFlow's model for pod slices:
  `TPU_LOAD_LIBRARY=0` keeps this host's own libtpu from opening its chips
  as a local TPU.
- PJRT, the TPU runtime of the v5e, v5p and v6e base images: on a TPU VM
  with the `libtpu` package and no TPU name, TensorFlow loads libtpu as a
  pluggable device when `NEXT_PLUGGABLE_DEVICE_USE_C_API=true` and
  `TF_PLUGGABLE_DEVICE_LIBRARY_PATH` names its `libtpu.so` (and
  `PJRT_DEVICE=TPU`), as Google's TensorFlow-on-TPU CI does for single-host
  PJRT runs (GoogleCloudPlatform/ml-auto-solutions,
  dags/solutions_team/configs/tensorflow/common.py) and the keras-io
  TensorFlow TPU example for tensorflow-tpu 2.19 on v5p/v6e. A pod slice's
  client sets none of them (the same CI).
"""

from collections.abc import MutableMapping, Sequence
import glob
import importlib.util
import os

PJRT_VARIABLES = ('NEXT_PLUGGABLE_DEVICE_USE_C_API',
                  'TF_PLUGGABLE_DEVICE_LIBRARY_PATH')


def has_tpu_chips() -> bool:
  """Whether this machine's TPU chips are visible (a Cloud TPU VM): /dev/accel*
  on v2-v4, /dev/vfio/N on v5e and later."""
  return bool(glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*'))


def libtpu_path() -> str | None:
  """libtpu.so of the installed `libtpu` package, found without loading it."""
  spec = importlib.util.find_spec('libtpu')
  if spec is None or not spec.submodule_search_locations:
    return None
  for directory in spec.submodule_search_locations:
    path = os.path.join(directory, 'libtpu.so')
    if os.path.exists(path):
      return path
  return None


def tpu_name_in(argv: Sequence[str], environ: MutableMapping[str, str]
                ) -> str:
  """The TPU a run names: its last --config.tpu flag, else TPU_NAME."""
  name = environ.get('TPU_NAME', '')
  for i, arg in enumerate(argv):
    if arg.startswith('--config.tpu='):
      name = arg.split('=', 1)[1]
    elif arg == '--config.tpu' and i + 1 < len(argv):
      name = argv[i + 1]
  return name


def prepare(argv: Sequence[str],
            environ: MutableMapping[str, str] | None = None,
            on_tpu_vm: bool | None = None,
            libtpu: str | None = '') -> dict[str, str]:
  """Sets the defaults above in `environ`; returns what it set.

  Args:
    argv: the command line (for --config.tpu).
    environ: the environment to complete; os.environ if None.
    on_tpu_vm: whether TPU chips are visible here; looked up if None.
    libtpu: the libtpu.so to load with PJRT; '' looks for the package.
  """
  environ = os.environ if environ is None else environ
  wanted = {'JAX_PLATFORMS': 'cpu'}
  name = tpu_name_in(argv, environ)
  if name and name != 'local':
    wanted['TPU_LOAD_LIBRARY'] = '0'
  elif environ.get('TPU_LOAD_LIBRARY') != '0' and not any(
      v in environ for v in PJRT_VARIABLES):
    if on_tpu_vm is None:
      on_tpu_vm = has_tpu_chips()
    if on_tpu_vm:
      path = libtpu_path() if libtpu == '' else libtpu
      if path:
        wanted.update(NEXT_PLUGGABLE_DEVICE_USE_C_API='true',
                      TF_PLUGGABLE_DEVICE_LIBRARY_PATH=path,
                      PJRT_DEVICE='TPU')
  done = {k: v for k, v in wanted.items() if k not in environ}
  environ.update(done)
  return done
