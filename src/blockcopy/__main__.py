"""``python -m blockcopy`` runs the command."""

import sys

from blockcopy.cli import main

sys.exit(main())
