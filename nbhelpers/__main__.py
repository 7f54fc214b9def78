"""``python -m nbhelpers <subcommand> ...``: the ``workbook`` program (:mod:`nbhelpers.tools.cli`)."""

import sys

from nbhelpers.tools.cli import main

sys.exit(main())
