"""`python -m lanternlm` is the `lantern` command."""

import sys

from .cli import main

sys.exit(main())
