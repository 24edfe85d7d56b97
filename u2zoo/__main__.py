import sys

from u2zoo.cli import main

sys.exit(main())
