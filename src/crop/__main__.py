"""`python -m crop` is the `crop` command."""

import sys

from crop.cli import main

sys.exit(main())
