"""``python -m tensormoe``: the ``tensormoe`` command line (see :mod:`tensormoe.cli`)."""

import sys

from .cli import main

sys.exit(main())
