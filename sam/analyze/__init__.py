r"""See the sharpness: measures, loss landscapes and curves of trained runs.

Each command rebuilds the model and the data from a workdir's config.json,
restores the model weights of its latest checkpoint, and writes its results
(JSON, .npz, PNG) to --out (default WORKDIR/analysis; may be gs://):

  python -m sam.analyze --what=sharpness --workdir=/tmp/sam/sam \
    --other_workdir=/tmp/sam/sgd        # m-sharpness, rho=0.05, both runs
  python -m sam.analyze --what=hessian --workdir=/tmp/sam/sam \
    --other_workdir=/tmp/sam/sgd        # top Hessian eigenvalue
  python -m sam.analyze --what=landscape --workdir=/tmp/sam/sam \
    --other_workdir=/tmp/sam/sgd        # 2-D and 1-D slices, side by side
  python -m sam.analyze --what=line --workdir=/tmp/sam/sgd \
    --other_workdir=/tmp/sam/sam        # the line from one to the other
  python -m sam.analyze --what=curves --workdir=/tmp/sam/sam \
    --other_workdir=/tmp/sam/sgd        # train/test loss and accuracy

Measures use the data loss (cross-entropy, no weight decay) in inference
mode, on --num_batches batches of --batch_size examples of each of --splits
('train' in the run's epoch-0 order without augmentation, 'validation' or
'test'), under the run's strategy (config.strategy, or --strategy).
"""

from sam.analyze.measures import curves
from sam.analyze.measures import interpolate
from sam.analyze.measures import landscapes
from sam.analyze.measures import measure_hessian
from sam.analyze.measures import measure_sharpness
from sam.analyze.runs import default_label
from sam.analyze.runs import load_config
from sam.analyze.runs import restore_run
from sam.analyze.runs import Run

__all__ = ['Run', 'curves', 'default_label', 'interpolate', 'landscapes',
           'load_config', 'measure_hessian', 'measure_sharpness',
           'restore_run']
