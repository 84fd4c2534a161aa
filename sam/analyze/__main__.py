"""`python -m sam.analyze`: see the package docstring."""

from absl import app
from absl import flags

from sam import analyze
from sam.analyze import cli

__doc__ = analyze.__doc__  # What --help prints first: the usage.
# So that --help lists them (they are defined in cli).
flags.adopt_module_key_flags(cli)

if __name__ == '__main__':
  app.run(cli.main)
