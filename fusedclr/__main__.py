"""``python -m fusedclr``: the same as the ``fusedclr`` console script."""

from fusedclr.cli import main

raise SystemExit(main())
