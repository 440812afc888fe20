"""``python -m sitq`` runs the ``sitq`` command."""

import sys

from sitq.cli import main

sys.exit(main())
