"""Shake-Shake's and ShakeDrop's true gradient, for SAM's ascent pass.

In training, both layers mix with one random draw (alpha) in the forward
pass and backpropagate with another (beta). The SAM code computes the
ascent gradient with `true_gradient=True` (google-research/sam,
sam_jax/training_utils/flax_training.py, get_sam_gradient): the backward
pass uses alpha too, so that eps follows the gradient of the function the
forward pass computed; the descent pass at w + eps keeps beta. A Keras
functional model passes no such argument to its layers, so they read it
from this context while they are called (traced): `sam.step` and
`sam.keras.SAMModel` enter it around the ascent pass. Both draws are made
either way, so the draws and the seed state the pass returns are the same.
"""

import contextlib
import threading

# Per thread: MirroredStrategy traces each replica in a thread of its own.
_LOCAL = threading.local()


@contextlib.contextmanager
def true_gradient(on: bool = True):
  """Layers called inside backpropagate with their forward draws if `on`."""
  saved = active()
  _LOCAL.on = on
  try:
    yield
  finally:
    _LOCAL.on = saved


def active() -> bool:
  """Whether a layer called now should use its true gradient."""
  return getattr(_LOCAL, 'on', False)
