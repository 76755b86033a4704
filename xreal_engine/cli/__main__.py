"""``python -m xreal_engine.cli``: the launcher's way to start the engine with a given Python."""

import sys

from . import main

sys.exit(main())
