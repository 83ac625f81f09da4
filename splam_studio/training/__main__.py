"""`python -m splam_studio.training ...`: the trainer's command line (flags: splam_studio/training/cli.py)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
