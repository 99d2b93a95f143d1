"""`python -m fedseg`: the study's command line (see fedseg.run)."""

import sys

from fedseg.run import main

sys.exit(main())
