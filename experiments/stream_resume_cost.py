"""What resuming a streamed run costs: skipping the epoch's records read so far.

Writes `--num_images` ImageNet-sized JPEGs as a TFDS data set
(sam/benchmark/stream.py) in `--data_dir` (once), then times the first batch
of the training stream started at step 0 and at the epoch's last step
(which reads, but does not decode, the records before it), alternately.

  python -m experiments.stream_resume_cost --data_dir=/tmp/stream_resume
"""

import os
import time

from absl import app
from absl import flags
import tensorflow as tf

from configs import default
from sam import input_pipeline
from sam.benchmark import stream

_DATA_DIR = flags.DEFINE_string('data_dir', '/tmp/stream_resume',
                                'Where to write the data set.')
_NUM_IMAGES = flags.DEFINE_integer('num_images', 2048, 'Training images.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 32, 'Global batch size.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timings of each start.')


def main(argv):
  del argv
  if not os.path.exists(os.path.join(_DATA_DIR.value, stream.NAME)):
    stream.prepare(_DATA_DIR.value, _NUM_IMAGES.value)
  config = default.get_config()
  config.dataset.update(name=f'tfds:{stream.NAME}', data_dir=_DATA_DIR.value,
                        augment='inception_crop', image_size=224)
  config.batch_size = _BATCH_SIZE.value
  data = input_pipeline.load(config)
  last = input_pipeline.steps_per_epoch(data, config.batch_size) - 1
  seconds = {0: [], last: []}
  for _ in range(_REPEATS.value):
    for start in seconds:
      begin = time.perf_counter()
      next(iter(input_pipeline.train_dataset(
          data, config, tf.distribute.InputContext(), start)))
      seconds[start].append(time.perf_counter() - begin)
  extra = min(seconds[last]) - min(seconds[0])
  skipped = last * config.batch_size
  kilobytes = stream.mean_jpeg_bytes(_DATA_DIR.value) / 1e3
  print(f'{len(data.train)} records of {kilobytes:.0f} KB; first batch from '
        f'step 0: {min(seconds[0]):.2f} s, from step {last}: '
        f'{min(seconds[last]):.2f} s (best of {_REPEATS.value}); '
        f'{skipped} records skipped at {skipped / extra:.0f} records/s')


if __name__ == '__main__':
  app.run(main)
