"""`python -m mmpeft.cli`: the `mmpeft` command."""

import sys

from . import main

sys.exit(main())
