"""`python -m stablediff`: the command line."""

import sys

from stablediff.cli import main

sys.exit(main())
