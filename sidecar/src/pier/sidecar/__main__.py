"""`python -m pier.sidecar …` is `pier sidecar …` (what local sessions run in `process` mode)."""

import sys

from pier.sidecar.main import main

sys.exit(main())
