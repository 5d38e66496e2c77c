"""``python -m launchers`` is ``lars-run``."""

import sys

from launchers.cli import main

sys.exit(main())
