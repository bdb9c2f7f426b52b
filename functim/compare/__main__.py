"""``python -m functim.compare``."""

import sys

from . import main

sys.exit(main())
