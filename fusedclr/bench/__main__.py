"""``python -m fusedclr.bench``: the same as ``fusedclr bench``."""

import sys

from .cli import main

sys.exit(main())
