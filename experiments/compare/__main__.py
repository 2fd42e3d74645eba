"""``python -m experiments.compare``: the command line of :mod:`experiments.compare.cli`."""
import sys

from .cli import main

sys.exit(main())
