"""`python -m sam.benchmark`: see the package docstring for the rows."""

from absl import app
from absl import flags
from absl import logging

from sam import benchmark
from sam.benchmark import runner

__doc__ = benchmark.__doc__  # What --help prints first: the usage.


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  results = runner.run_all(f.models, f.batch_size, f.steps, f.repeats,
                           f.rho, xla=f.xla, keras2=f.keras2,
                           loop_rows=f.loop_rows,
                           precision_rows=f.precision_rows,
                           profile_dir=f.profile_dir,
                           stream_row=f.stream_row,
                           variant_rows=f.variant_rows,
                           image_size=f.image_size)
  print('\n'.join(runner.table(results)))
  if f.json:
    runner.write_json(results, f.json)
    logging.info('Wrote %s.', f.json)


def _define_flags():
  flags.DEFINE_list('models', ['resnet20_b', 'wrn16_4'], 'Models to time '
                    '(the headline figures of --json are the first one\'s).')
  flags.DEFINE_integer('batch_size', 128, 'Global batch size.')
  flags.DEFINE_integer('steps', 20, 'Steps per timed loop (the host-loop '
                       'rows time lcm(1, 10, 100) = 100).')
  flags.DEFINE_integer('repeats', 5, 'Rounds of timing; each round times '
                       'every row once.')
  flags.DEFINE_float('rho', 0.05, 'SAM radius.')
  flags.DEFINE_bool('xla', False, 'Also time XLA-compiled steps.')
  flags.DEFINE_bool('keras2', True, 'Time the tf_keras rows.')
  flags.DEFINE_bool('stream_row', True, 'Time the streamed ImageNet-style '
                    'input (sam/benchmark/stream.py).')
  flags.DEFINE_bool('variant_rows', True, 'Time the SAM variants and '
                    'options (ASAM, ESAM, ..., LookSAM) beside plain and SAM.')
  flags.DEFINE_integer('image_size', 32, "Side of the models' synthetic "
                       'images (224 for the ImageNet models).')
  flags.DEFINE_bool('loop_rows', True, 'Time the plain custom loop with '
                    'steps_per_loop 1, 10 and 100 (the host loop\'s cost).')
  flags.DEFINE_bool('precision_rows', True, 'Time the custom loop with '
                    "config.dtype_policy = 'mixed_bfloat16' (and "
                    "'mixed_float16' where there is a GPU).")
  flags.DEFINE_string('profile_dir', None, 'Also trace the first model\'s '
                      'plain and SAM custom loop and its Keras 2 SAM with '
                      'tf.profiler into PROFILE_DIR/{plain,sam,keras2_sam}, '
                      'and print the op time by op type (needs xprof).')
  flags.DEFINE_string('json', None, 'Also write every figure as JSON to '
                      'this path (local or gs://).')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
