"""``python -m spo`` is the ``spo`` console script."""

import sys

from spo.cli import main

sys.exit(main())
