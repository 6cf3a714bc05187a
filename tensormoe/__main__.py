"""``python -m tensormoe``: the ``tensormoe`` command line (see :mod:`tensormoe.tools.cli`)."""

import sys

from .tools.cli import main

sys.exit(main())
