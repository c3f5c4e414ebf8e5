"""`python -m vitlab ...` and `torchrun -m vitlab ...`, the same as the `vitlab` command."""

import sys

from .app.cli import main

sys.exit(main())
