"""Allow `python -m userservice`."""

import sys

from userservice.cli import main

sys.exit(main())
