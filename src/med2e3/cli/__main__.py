"""``python -m med2e3.cli ARGS``: the same as ``med2e3 ARGS``."""

import sys

from med2e3.cli import main

if __name__ == "__main__":
    sys.exit(main())
