"""``python -m experiments.receptive_field``: the command line of :mod:`experiments.receptive_field.cli`."""
import sys

from .cli import main

sys.exit(main())
