"""`python -m pier.cli …` is `pier …`."""

import sys

from pier.cli.main import main

sys.exit(main())
