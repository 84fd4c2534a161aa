"""The benchmark runs (its figures come from running it, never from tests)."""

from sam import benchmark


def test_benchmark_table_has_every_custom_loop_row():
  lines = benchmark.run_all(['cnn'], batch_size=8, steps=1, repeats=1,
                            rho=0.05, keras2=False)
  rows = [row for row in lines if row.startswith('| cnn: custom loop')]
  assert len(rows) == 3
  assert all('skipped' not in r for r in rows)
  assert any(row.startswith('| input pipeline alone') for row in lines)
