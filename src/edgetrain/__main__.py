"""``python -m edgetrain`` works like the ``edgetrain`` command."""

import sys

from edgetrain.cli import main

sys.exit(main())
