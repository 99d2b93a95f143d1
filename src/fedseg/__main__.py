"""`python -m fedseg`: the study's command line (see fedseg.run.cli)."""

import sys

from fedseg.run import main

sys.exit(main())
