r"""Throughput of SAM and plain steps, side by side in one process.

  python -m sam.benchmark --models=resnet20_b,wrn16_4 --batch_size=128 \
      --json=/tmp/benchmark.json

Measures images/s and ms/step (best and median over `--repeats` timed loops,
after one warm-up loop) on synthetic 32x32x3 data. For each model of
`--models` (default resnet20_b and wrn16_4), the rows are, in this order:

* this codebase's custom loop (`sam.Trainer`), one `train_loop` call of
  `--steps` steps per timed loop: the plain base optimizer (rho = 0), SAM,
  each other variant of `sam.perturbations.REGISTRY` (`sam.variant`),
  SAM-ON (`sam.perturb_only='normalization'`; for models with
  normalization layers), SAM with 2 ascent steps (`sam.ascent_steps`), SAM
  accumulated over 2 micro-batches (`sam.accumulate_micro_batches`), SAM
  every 2nd step (`sam.every_k_steps`) and
  LookSAM with k = 5, alpha = 0.7 (`sam.looksam_alpha`; time a multiple of
  5 steps per loop);
* with `--xla`: the plain and SAM custom loop with the replica step compiled
  by XLA; and once, before the models, one 3x3 convolution (16 to 16
  channels on 32x32, the first stage of a ResNet-20) forward and backward,
  in graph mode and with XLA, to show how much of XLA's cost on a CPU the
  convolutions alone account for;
* with `--loop_rows` (default): the plain custom loop with steps_per_loop 1,
  10 and 100, that is 100 steps timed as 100 calls of `train_loop` with 1
  step, 10 calls of 10, and 1 call of 100, each call followed by the read of
  the metric sums that `train.train_and_evaluate` does after every loop; the
  difference is the cost of the host loop;
* with `--precision_rows` (default): the plain and SAM custom loop with
  `config.dtype_policy = 'mixed_bfloat16'` and, where TensorFlow sees a GPU,
  `'mixed_float16'` (with its dynamic loss scaling);
* `sam.keras.SAMModel` under Keras 3 `fit`;
* with `--keras2` (default): plain `tf_keras` `fit`, and the Keras 2
  `tf_keras.models.experimental.SharpnessAwareMinimization` model under
  `fit`, on the same architecture built with Keras 2 layers
  (`models.get_model(..., keras_module=tf_keras)`; needs
  `pip install tf_keras`; skipped without it).

With `--profile_dir`, one more loop of the first model's plain and SAM
custom loop rows, and of its Keras 2 SAM row, runs under tf.profiler, and a
second table gives their op self time by op type (where the time of a step
goes).

A first row times the input pipeline alone (with augmentation) for 20 times
`--steps` batches, from a fresh iterator each time, to show it is no
bottleneck.
With `--stream_row` (default), a second times `--steps` batches of the
streamed input of `dataset.name='tfds:...'` over ImageNet-sized JPEGs that
it writes first (sam/benchmark/stream.py): decoding, Inception crop, resize
to 224 x 224, flip; its images/s over the CPU count is the rate per core a
host needs to feed its accelerators.

Every row is set up and warmed up first (one untimed loop); then each of
`--repeats` rounds times every row once, in table order. A slow spell of a
shared machine thus falls on all rows alike, not on the rows that happened
to be timed during it.

The output is a line naming the machine (CPU model, CPU count, GPUs) and a
markdown table; `--json=PATH` (local or gs://) also writes every figure:
the headline figures of the first model (`sgd_images_per_sec`: the plain
custom loop; `sam_images_per_sec`: the SAM custom loop;
`keras_sam_images_per_sec`: the Keras 2 (tf_keras) SAM model under `fit`,
the issue's reference, null when skipped; `keras3_sam_images_per_sec`:
`sam.keras.SAMModel` under Keras 3 `fit`; all best of the repeats;
`sam_over_sgd_step_time`: SAM's best step time over the plain one's),
every row under `rows` (name -> images/s and ms/step, best and median; null
when skipped) and the run's `context`.

The Keras 2 SAM is cheaper than two plain steps partly because its ascent
pass runs batch norm in inference mode and it keeps the moving statistics of
the perturbed pass; ours computes the exact update of the paper (the
module docstring of sam/sam.py).

The rows are built in `rows.py` (one function per kind of row, each returning
a warmed-up timer), timed and reported in `runner.py`, profiled in
`profile.py`; `python -m sam.benchmark` is `__main__.py`.
"""

from sam.benchmark.runner import headline_rows
from sam.benchmark.runner import run_all
from sam.benchmark.runner import table
from sam.benchmark.runner import write_json

__all__ = ['headline_rows', 'run_all', 'table', 'write_json']
