"""``python -m functim_compare``."""

import sys

from . import main

sys.exit(main())
