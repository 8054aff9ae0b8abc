"""``python -m med2e3.server --model DIR ...`` runs ``med2e3 serve``."""

import sys

from med2e3.server.cli import main

sys.exit(main())
