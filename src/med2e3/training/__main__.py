"""``python -m med2e3.training CONFIG [key=value ...]`` (the same as ``med2e3 train``), e.g. under torchrun."""

import sys

from med2e3.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
