"""``python -m pipeline`` is the ``frcnn`` command."""

import sys

from pipeline.cli import main

sys.exit(main())
