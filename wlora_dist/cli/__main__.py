"""``python -m wlora_dist.cli ...``: the same as ``wlora-dist ...``."""

import sys

from wlora_dist.cli import main

sys.exit(main())
