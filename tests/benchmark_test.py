"""The benchmark runs (its figures come from running it, never from tests)."""

import json
import numbers

import pytest

from sam import benchmark
from sam import perturbations
from tests.conftest import requires_xla_cpu

pytestmark = pytest.mark.slow  # Not in the fast subset (pytest.ini).

ROW_KEYS = ('images_per_sec_best', 'images_per_sec_median',
            'ms_per_step_best', 'ms_per_step_median')

_VARIANT_ROWS = len(perturbations.REGISTRY) - 1


def _positive(value) -> bool:
  return (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and value > 0)


def test_every_row_is_in_the_table_and_the_json(tmp_path):
  # One tiny run of every row serves both (25 to 50 s on 2 cores): one test,
  # since pytest-xdist computes a module fixture in each of its processes
  # (its loadgroup, which would keep them in one, does nothing on pytest 9).
  results = benchmark.run_all(['cnn'], batch_size=8, steps=2, repeats=1,
                              rho=0.05, keras2=False)
  _assert_table_has_every_custom_loop_row(results)
  _assert_json_has_the_required_positive_figures(results, tmp_path)


def _assert_table_has_every_custom_loop_row(results):
  lines = benchmark.table(results)
  assert lines[0].startswith('machine: ')
  rows = [row for row in lines if row.startswith('| cnn: custom loop')]
  names = [row.split(' | ')[0][2:] for row in rows]
  assert names == [
      'cnn: custom loop, plain (rho=0)',
      'cnn: custom loop, SAM',
      # A row per registered variant.
      *(f'cnn: custom loop, SAM variant={name}'
        for name in sorted(perturbations.REGISTRY) if name != 'sam'),
      'cnn: custom loop, SAM, ascent pass in inference mode',
      'cnn: custom loop, SAM, 2 ascent steps',
      'cnn: custom loop, SAM, 2 accumulated micro-batches',
      'cnn: custom loop, SAM every 2nd step',
      'cnn: custom loop, LookSAM (k=5, alpha=0.7)',
      'cnn: custom loop, plain, steps_per_loop=1 (100 calls of 1)',
      'cnn: custom loop, plain, steps_per_loop=10 (10 calls of 10)',
      'cnn: custom loop, plain, steps_per_loop=100 (1 call of 100)',
      'cnn: custom loop, plain, mixed_bfloat16',
      'cnn: custom loop, SAM, mixed_bfloat16',
  ]
  assert all('skipped' not in r for r in rows)
  assert any(row.startswith('| input pipeline alone') for row in lines)
  assert any(row.startswith('| streamed TFDS JPEGs alone') for row in lines)
  assert not any('tf_keras' in row for row in lines)


def _assert_json_has_the_required_positive_figures(results, tmp_path):
  path = tmp_path / 'out' / 'benchmark.json'
  benchmark.write_json(results, str(path))
  figures = json.loads(path.read_text())
  for key in ('sgd_images_per_sec', 'sam_images_per_sec',
              'keras3_sam_images_per_sec', 'sam_over_sgd_step_time'):
    assert _positive(figures[key]), key
  # The Keras 2 SAM's row is off here (tf_keras is a benchmark-only extra).
  assert figures['keras_sam_images_per_sec'] is None
  rows = figures['rows']
  assert figures['sgd_images_per_sec'] == (
      rows['cnn: custom loop, plain (rho=0)']['images_per_sec_best'])
  # Each headline key names its row: X_images_per_sec is row X's best.
  for key, row in benchmark.headline_rows('cnn').items():
    if figures[f'{key}_images_per_sec'] is not None:
      assert figures[f'{key}_images_per_sec'] == (
          rows[row]['images_per_sec_best']), key
  # Input, streamed input, the custom loop's rows (12 and one per variant
  # but SAM), Keras 3 SAMModel.
  assert len(rows) == 15 + _VARIANT_ROWS
  for name, row in rows.items():
    for key in ROW_KEYS:
      assert _positive(row[key]), (name, key)
  assert rows['cnn: custom loop, plain, steps_per_loop=1 (100 calls of 1)'][
      'steps'] == 100
  context = figures['context']
  assert context['tensorflow_version']
  assert (context['batch_size'], context['steps'], context['repeats']) == (
      8, 2, 1)
  assert _positive(context['num_cpus'])
  assert _positive(context['stream_record_bytes'])
  assert 'cpu_model' in context
  assert isinstance(context['gpus'], list)


def test_loop_and_precision_rows_off_and_the_profile(tmp_path):
  # Without the variants' rows (the fixture's run times them all), which
  # would only repeat their compiles here.
  results = benchmark.run_all(['cnn'], batch_size=8, steps=1, repeats=1,
                              rho=0.05, keras2=False, loop_rows=False,
                              stream_row=False, precision_rows=False,
                              variant_rows=False, profile_dir=str(tmp_path))
  names = list(results['rows'])
  # Input, the custom loop's plain and SAM rows, Keras 3 SAMModel.
  assert len(names) == 4
  assert not any('steps_per_loop' in n or 'bfloat16' in n for n in names)
  # A trace for TensorBoard's profile plugin per profiled row.
  for subdir in ('plain', 'sam'):
    assert list(tmp_path.glob(f'{subdir}/plugins/profile/*/*.xplane.pb'))
  try:
    import xprof  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    assert results['profile'] == {}
    return
  profiles = results['profile']
  assert list(profiles) == names[1:3]  # Plain and SAM.
  for profile in profiles.values():
    assert 'IDLE' not in profile
    assert all(v >= 0 for v in profile.values())
    assert list(profile.values()) == sorted(profile.values(), reverse=True)
    assert any('Conv2D' in op for op in profile), profile
  lines = benchmark.table(results)
  start = lines.index('op self time of one profiled loop (tf.profiler):')
  assert lines[start + 2].startswith('| op type | cnn: custom loop, plain')
  total = lines[-1].split(' | ')
  assert total[0] == '| all op types'
  assert [float(v.strip(' |')) for v in total[1:]] == pytest.approx(
      [sum(p.values()) for p in profiles.values()], abs=0.01)


def test_float16_rows_on_request():
  # On a CPU the float16 rows are off unless asked for (GPU-only format).
  results = benchmark.run_all(['cnn'], batch_size=8, steps=1, repeats=1,
                              rho=0.05, keras2=False, loop_rows=False,
                              stream_row=False, variant_rows=False,
                              precisions=['mixed_float16'])
  names = [n for n in results['rows'] if 'float16' in n]
  assert names == ['cnn: custom loop, plain, mixed_float16',
                   'cnn: custom loop, SAM, mixed_float16']
  assert results['context']['steps_per_loop'] == []


@requires_xla_cpu
def test_xla_rows():
  results = benchmark.run_all(['cnn'], batch_size=8, steps=1, repeats=1,
                              rho=0.05, keras2=False, loop_rows=False,
                              stream_row=False, variant_rows=False,
                              precision_rows=False, xla=True)
  names = list(results['rows'])
  assert names[1:3] == [
      'one 3x3 conv (32x32, 16 channels), forward and backward, graph',
      'one 3x3 conv (32x32, 16 channels), forward and backward, XLA']
  assert {'cnn: custom loop, plain, XLA', 'cnn: custom loop, SAM, XLA'} <= (
      set(names))
  assert all(results['rows'][n] for n in names)


def test_keras2_rows():
  # tf_keras is a benchmark extra (pip install .[bench]), not in CI.
  pytest.importorskip('tf_keras')
  results = benchmark.run_all(['cnn'], batch_size=8, steps=1, repeats=1,
                              rho=0.05, loop_rows=False, precision_rows=False,
                              stream_row=False, variant_rows=False)
  keras2_sam = benchmark.headline_rows('cnn')['keras_sam']
  assert 'Keras 2' in keras2_sam
  assert results['keras_sam_images_per_sec'] == (
      results['rows'][keras2_sam]['images_per_sec_best'])
  assert _positive(results['rows']['cnn: tf_keras (Keras 2) fit, plain'][
      'images_per_sec_best'])


def test_plain_and_sam_rows_only_at_another_image_size():
  results = benchmark.run_all(['cnn'], batch_size=8, steps=1, repeats=1,
                              rho=0.05, keras2=False, loop_rows=False,
                              stream_row=False, precision_rows=False,
                              variant_rows=False, image_size=16)
  assert list(results['rows']) == [
      'input pipeline alone (basic augmentation)',
      'cnn: custom loop, plain (rho=0)', 'cnn: custom loop, SAM',
      'cnn: Keras 3 fit, sam.keras.SAMModel']
  assert results['context']['image_size'] == 16
