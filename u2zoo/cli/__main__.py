"""``python -m u2zoo.cli``: the same as the ``u2zoo`` command."""

import sys

from u2zoo.cli import main

sys.exit(main())
