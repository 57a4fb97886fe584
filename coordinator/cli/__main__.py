"""``python -m coordinator.cli``: the ``cgmirror`` command."""

import sys

from . import main

sys.exit(main())
