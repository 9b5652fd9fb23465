"""`python -m qbd` is the `qbd` command."""

import sys

from qbd.cli import main

sys.exit(main())
